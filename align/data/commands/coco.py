"""Convert COCO 2017 images with a captions_*.json into long-caption shards.

Usage: align data coco --images <val2017 folder> --captions <captions_val2017.json ...>
       --out data/coco [--caption-mode join|longest] [--shorter-side 512] [--shard-size 1000]
       [--workers N]

COCO layout: ``images[]`` with ``id`` / ``file_name``, ``annotations[]`` with ``image_id`` /
``caption``. Rows are the images of the json, by id. An image's captions are ordered by annotation
id; ``--caption-mode join`` (default) joins them into one multi-sentence text (each stripped,
whitespace collapsed, ending with a period), which gives LongAlign's sentence-level segment encoding
one segment per human caption; ``longest`` keeps the longest caption. An image with no caption is
skipped as ``missing_caption``, a listed image absent from the folder as ``missing_image``. Any
caption file in the COCO format works (e.g. long re-captions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from align.data.convert_helpers import (
    add_image_args,
    add_writer_args,
    chunk_units,
    command_parser,
    convert_image_rows,
    fail,
    image_options,
    write_from_args,
)
from align.data.writer import file_identity


def clean(caption: str) -> str:
    caption = re.sub(r"\s+", " ", caption).strip()
    return caption if not caption or caption[-1] in ".!?" else caption + "."


def combine(captions: list[str], mode: str) -> str | None:
    captions = [clean(c) for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        return None
    if mode == "longest":
        return max(captions, key=len)
    return " ".join(captions)


def load_rows(caption_files: list[str], mode: str) -> list[tuple]:
    """``convert_image_rows`` rows: every image of the jsons, by id, with its combined caption."""
    files: dict[int, str] = {}
    captions: dict[int, list[tuple[int, str]]] = {}
    for path in caption_files:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        for image in data.get("images", []):
            files[image["id"]] = image["file_name"]
        for ann in data.get("annotations", []):
            captions.setdefault(ann["image_id"], []).append((ann.get("id", 0), ann.get("caption")))
    rows = []
    for image_id in sorted(files):
        ordered = sorted(captions.get(image_id, []), key=lambda annotation: annotation[0])
        caption = combine([c for _, c in ordered], mode)
        meta = {"source": "coco", "image_id": image_id, "file_name": files[image_id]}
        rows.append((files[image_id], caption, meta, f"coco_{image_id}"))
    return rows


def main(argv: list[str]) -> int:
    parser = command_parser("coco", __doc__)
    parser.add_argument("--images", required=True, help="COCO image folder (e.g. val2017)")
    parser.add_argument("--captions", nargs="+", required=True, help="captions_*.json (COCO)")
    parser.add_argument("--caption-mode", choices=("join", "longest"), default="join")
    add_writer_args(parser, prefix="coco")
    add_image_args(parser, shorter_side=512)
    args = parser.parse_args(argv)

    for path in [args.images, *args.captions]:
        if not Path(path).exists():
            return fail(f"not found: {path}")
    opts = image_options(args)
    images = str(Path(args.images).resolve())
    rows = load_rows(args.captions, args.caption_mode)
    units = chunk_units(rows, args.shard_size, "coco", lambda chunk: (images, chunk, opts))
    source = {
        "captions": [file_identity(p) for p in args.captions],
        "images": Path(args.images).name,
        "caption_mode": args.caption_mode,
        "options": opts,
    }
    return write_from_args(args, "coco", source=source, units=units, convert=convert_image_rows)
