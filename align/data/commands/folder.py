"""Convert a folder of images with a jsonl of {file, caption} into long-caption shards.

Usage: align data folder --images <dir> --captions <captions.jsonl ...> --out data/mine
       [--file-field file] [--caption-field caption] [--shorter-side 512] [--shard-size 1000]
       [--workers N]

``file`` is relative to ``--images`` (subfolders allowed). Rows are the union of the image files
found (``.jpg``/``.jpeg``/``.png``/``.webp``, recursively) and the files named in the jsonl, sorted
by path: an image without a caption is skipped as ``missing_caption``, a caption whose image is
absent as ``missing_image``. A file captioned twice keeps its first caption (repeats are counted).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from align.data.convert_helpers import (
    IMAGE_SUFFIXES,
    add_image_args,
    add_writer_args,
    chunk_units,
    command_parser,
    convert_image_rows,
    dotted,
    fail,
    image_options,
    iter_jsonl,
    norm_relpath,
    write_from_args,
)
from align.data.writer import file_identity


def main(argv: list[str]) -> int:
    parser = command_parser("folder", __doc__)
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--captions", nargs="+", required=True, help="jsonl of {file, caption}")
    parser.add_argument("--file-field", default="file")
    parser.add_argument("--caption-field", default="caption", help="dotted path of the caption")
    add_writer_args(parser, prefix="folder")
    add_image_args(parser, shorter_side=512)
    args = parser.parse_args(argv)

    for path in [args.images, *args.captions]:
        if not Path(path).exists():
            return fail(f"not found: {path}")
    root = Path(args.images).resolve()
    files = {
        str(p.relative_to(root).as_posix())
        for p in root.rglob("*")
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
    }
    captions: dict[str, str] = {}
    pre_skipped: Counter = Counter()
    for path in args.captions:
        for _, record in iter_jsonl(path):
            name, text = dotted(record, args.file_field), dotted(record, args.caption_field)
            if not isinstance(name, str) or not isinstance(text, str):
                pre_skipped["bad_caption_line"] += 1
            elif norm_relpath(name) in captions:
                pre_skipped["duplicate_caption"] += 1
            else:
                captions[norm_relpath(name)] = text
    rows = [
        (rel, captions.get(rel), {"source": "folder", "file": rel}, None)
        for rel in sorted(files | set(captions))
    ]
    opts = image_options(args)
    units = chunk_units(rows, args.shard_size, "folder", lambda chunk: (str(root), chunk, opts))
    listing = hashlib.sha256("\n".join(sorted(files)).encode("utf-8")).hexdigest()
    source = {
        "captions": [file_identity(p) for p in args.captions],
        "images": root.name,
        "image_list": listing,
        "fields": [args.file_field, args.caption_field],
        "options": opts,
    }
    return write_from_args(
        args,
        "folder",
        source=source,
        units=units,
        convert=convert_image_rows,
        pre_skipped=pre_skipped,
    )
