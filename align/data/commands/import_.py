"""Convert a human preference set (parquet or jsonl: a caption, two images and a choice per row)
into pair shards, naming its columns.

Usage: align data import --src <parquet|jsonl files or folders...> --out data/mine
       --caption-column prompt --image-columns image_a image_b --choice-column choice
       [--choice-format label_0|index|name] [--images-root DIR] [--drop-ties] [--max-side 512]

Images are bytes, ``{"bytes": ...}`` (a Hugging Face ``Image`` column) or a path (relative to
``--images-root``, default the source file's folder). The choice says which image was preferred:
``label_0`` (Pick-a-Pic: 1 image 0, 0 image 1, 0.5 a tie), ``index`` (0 or 1; anything else a tie),
``name`` (the preferred image's column name, e.g. ``image_a``; ``tie`` a tie). Rows are converted as
``align data pickapic`` converts its own (same skips, same schema), one file a unit, resumably.
"""

from __future__ import annotations

from pathlib import Path

from align.data.commands.pickapic import convert_row
from align.data.convert_helpers import (
    add_image_args,
    add_writer_args,
    command_parser,
    fail,
    image_options,
    iter_jsonl,
    write_from_args,
)
from align.data.writer import Skip, Unit, file_identity
from align.extras import require

SUFFIXES = (".parquet", ".jsonl")


def label_0(choice, fmt: str, columns: tuple[str, str]) -> float | None:
    """Pick-a-Pic's ``label_0`` for a choice, or None when it cannot be read."""
    if choice is None:
        return None
    if fmt == "label_0":
        try:
            return float(choice)
        except (TypeError, ValueError):
            return None
    if fmt == "index":
        return {0: 1.0, 1: 0.0}.get(choice if isinstance(choice, int) else None, 0.5)
    return {columns[0]: 1.0, columns[1]: 0.0}.get(str(choice), 0.5 if choice == "tie" else None)


def image_bytes(value, root: Path) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else root / value
        return path.read_bytes() if path.is_file() else None
    return None


def convert_file(payload: tuple, need):
    """Writer converter: the rows of one source file, mapped onto Pick-a-Pic's columns."""
    path, opts = payload
    root = Path(opts["images_root"] or Path(path).parent)
    for j, row in enumerate(read_rows(path)):
        if not need(j):
            yield None
            continue
        if row is None:
            yield Skip("bad_json_line")
            continue
        label = label_0(row.get(opts["choice"]), opts["choice_format"], opts["images"])
        if label is None or label not in (0.0, 0.5, 1.0):
            yield Skip("bad_choice")
            continue
        mapped = {
            "caption": row.get(opts["caption"]),
            "label_0": label,
            "label_1": 1.0 - label,
            "jpg_0": image_bytes(row.get(opts["images"][0]), root),
            "jpg_1": image_bytes(row.get(opts["images"][1]), root),
        }
        yield convert_row(mapped, {**opts, "images_dir": None, "drop_unlabeled": False})


def read_rows(path: str):
    """Every row of a parquet or jsonl file (None for a jsonl line that is not JSON)."""
    if path.endswith(".jsonl"):
        yield from (row for _, row in iter_jsonl(path))
        return
    pq = require("pyarrow.parquet", "data", "importing parquet preference sets")
    for batch in pq.ParquetFile(path).iter_batches(batch_size=32, use_threads=False):
        yield from batch.to_pylist()


def count_rows(path: Path) -> int:
    if path.suffix == ".jsonl":
        return sum(1 for _ in iter_jsonl(path))
    pq = require("pyarrow.parquet", "data", "importing parquet preference sets")
    return pq.ParquetFile(path).metadata.num_rows


def main(argv: list[str]) -> int:
    parser = command_parser("import", __doc__)
    parser.add_argument("--src", nargs="+", required=True, help="parquet/jsonl files or folders")
    parser.add_argument("--caption-column", required=True)
    parser.add_argument("--image-columns", nargs=2, required=True, metavar=("IMAGE_0", "IMAGE_1"))
    parser.add_argument("--choice-column", required=True)
    parser.add_argument("--choice-format", choices=("label_0", "index", "name"), default="label_0")
    parser.add_argument("--images-root", default=None, help="folder image paths are relative to")
    parser.add_argument("--drop-ties", action="store_true", help="skip tied rows")
    add_writer_args(parser, prefix="import", shard_size=1000)
    add_image_args(parser, max_side=0)
    args = parser.parse_args(argv)

    files = []
    for src in args.src:
        path = Path(src)
        found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else []
        if path.is_file() and path.suffix in SUFFIXES:
            found = [path]
        if not found:
            return fail(f"no .parquet or .jsonl file at {src}", "align data import")
        files += found
    opts = {
        **image_options(args),
        "caption": args.caption_column,
        "images": tuple(args.image_columns),
        "choice": args.choice_column,
        "choice_format": args.choice_format,
        "images_root": args.images_root,
        "drop_ties": args.drop_ties,
    }
    units = [Unit(str(p), count_rows(p), (str(p), opts)) for p in files]
    source = {"inputs": [file_identity(p) for p in files], "options": opts}
    return write_from_args(args, "import", source=source, units=units, convert=convert_file)
