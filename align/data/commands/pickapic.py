"""Convert Pick-a-Pic v2 parquet files into pair shards (Diffusion-DPO), resumably.

Usage: align data pickapic --src <folder of parquet files | parquet files...>
       --out data/pickapic/train [--drop-ties] [--drop-unlabeled] [--max-side 512]
       [--shard-size 1000] [--workers N] [--images-dir DIR]

Reads parquet row group by row group (bounded memory), one (file, row group) unit per task, so the
shards are the same for any ``--workers``. Each row becomes ``jpg_0.jpg``, ``jpg_1.jpg`` and a
``json`` with caption, label_0, label_1 and the uids, model names, ranking_id, user_id and
best_image_uid (pair schema of ``align.data.schema``). Image order is the source's (the data module
puts the winner first). Rows with a null label, a missing caption or image, or undecodable image
bytes are skipped and counted; an unreadable parquet file is skipped and named in the summary.
``--drop-ties`` drops label 0.5 rows (the official DPO handling); ``--drop-unlabeled`` drops rows
whose ``has_label`` is false. The ``_no_images`` variant (no jpg_0/jpg_1 columns) reads
``<images-dir>/<image_N_uid>.jpg|.jpeg|.png|.webp`` instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from align.data.convert_helpers import (
    ImageError,
    add_image_args,
    add_writer_args,
    command_parser,
    fail,
    find_image,
    image_options,
    prepare_jpeg,
    write_from_args,
)
from align.data.schema import PAIR_OPTIONAL_META, pair_meta_problem
from align.data.writer import Skip, Unit, file_identity
from align.extras import require

PYARROW_PURPOSE = "converting Pick-a-Pic parquet files"

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
UID_COLUMNS = ("image_0_uid", "image_1_uid")
REQUIRED = ("caption", "label_0", "label_1")


def convert_row(row: dict, opts: dict) -> dict | Skip:
    """One Pick-a-Pic row -> a pair sample, or the Skip saying why not."""
    caption = row.get("caption")
    if caption is None:
        return Skip("missing_caption")
    label_0, label_1 = row.get("label_0"), row.get("label_1")
    if label_0 is None or label_1 is None:
        return Skip("null_label")
    if opts["drop_unlabeled"] and "has_label" in row and not row["has_label"]:
        return Skip("unlabeled")
    try:
        label_0, label_1 = float(label_0), float(label_1)
    except (TypeError, ValueError):
        return Skip("bad_label")
    if opts["drop_ties"] and label_0 == 0.5:
        return Skip("tie")
    meta = {"caption": caption, "label_0": label_0, "label_1": label_1}
    meta.update({k: row[k] for k in PAIR_OPTIONAL_META if row.get(k) is not None})
    problem = pair_meta_problem(meta)
    if problem:
        return Skip(problem)
    images = []
    for side in (0, 1):
        data = row.get(IMAGE_COLUMNS[side])
        if not data and opts["images_dir"]:
            uid = row.get(UID_COLUMNS[side])
            if not uid:
                return Skip("missing_uid")
            if "/" in str(uid) or "\\" in str(uid) or str(uid).startswith("."):
                return Skip("bad_uid")
            path = find_image(opts["images_dir"], str(uid))
            data = path.read_bytes() if path else None
        if not data:
            return Skip("missing_image")
        try:
            images.append(
                prepare_jpeg(data, opts["max_side"], opts["shorter_side"], opts["quality"])
            )
        except ImageError:
            return Skip("undecodable_image")
    return {"jpg_0.jpg": images[0], "jpg_1.jpg": images[1], "json": meta}


def convert_row_group(payload: tuple, need):
    """Writer converter: the rows of one (file, row group), streamed in small record batches."""
    pq = require("pyarrow.parquet", "data", PYARROW_PURPOSE)

    path, row_group, columns, opts = payload
    parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    row = 0
    for batch in parquet.iter_batches(
        batch_size=opts["batch_rows"], row_groups=[row_group], columns=columns, use_threads=False
    ):
        needed = [need(row + i) for i in range(batch.num_rows)]
        rows = batch.to_pylist() if any(needed) else [None] * batch.num_rows
        for wanted, values in zip(needed, rows):
            yield convert_row(values, opts) if wanted else None
        row += batch.num_rows


def parquet_files(sources: list[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(path, stable name) of every parquet file named or in a named folder; the missing sources."""
    files, missing = [], []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            files.extend((p, str(p.relative_to(path))) for p in sorted(path.rglob("*.parquet")))
        elif path.is_file():
            files.append((path, path.name))
        else:
            missing.append(src)
    return files, missing


def plan(files: list[tuple[Path, str]], opts: dict) -> tuple[list[Unit], dict, list]:
    """Units (one per row group), the files skipped by reason, and the inputs' identities."""
    pq = require("pyarrow.parquet", "data", PYARROW_PURPOSE)

    units, skipped, inputs = [], {}, []
    for path, name in files:
        inputs.append(file_identity(path) + [name])
        try:
            metadata = pq.ParquetFile(path).metadata
            names = set(metadata.schema.names)
        except Exception:  # truncated or not parquet at all: pyarrow raises several kinds
            skipped.setdefault("unreadable_parquet", []).append(name)
            continue
        inline = set(IMAGE_COLUMNS) <= names
        if not inline and not opts["images_dir"]:
            skipped.setdefault("no_image_columns", []).append(name)
            continue
        if not set(REQUIRED if inline else (*REQUIRED, *UID_COLUMNS)) <= names:
            skipped.setdefault("missing_columns", []).append(name)
            continue
        wanted = list(REQUIRED) + [c for c in ("has_label", *PAIR_OPTIONAL_META) if c in names]
        if inline:
            wanted += list(IMAGE_COLUMNS)
        columns = list(dict.fromkeys(wanted))
        for row_group in range(metadata.num_row_groups):
            rows = metadata.row_group(row_group).num_rows
            payload = (str(path), row_group, columns, opts)
            if rows:
                units.append(Unit(f"{name}#rg{row_group}", rows, payload))
    return units, skipped, inputs


def main(argv: list[str]) -> int:
    parser = command_parser(
        "pickapic", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--src", nargs="+", required=True, help="parquet files or folders of them")
    add("--drop-ties", action="store_true", help="skip rows with label_0 == 0.5")
    add("--drop-unlabeled", action="store_true", help="skip rows whose has_label is false")
    add("--images-dir", help="folder of <uid>.jpg|.png|.webp for the _no_images variant")
    add("--batch-rows", type=int, default=32, help="rows per parquet read (memory bound)")
    add_writer_args(parser, prefix="pickapic", shard_size=1000)
    add_image_args(parser, max_side=512)
    args = parser.parse_args(argv)
    require("pyarrow.parquet", "data", PYARROW_PURPOSE)  # before anything is read or written

    files, missing = parquet_files(args.src)
    if missing:
        return fail(f"--src not found: {', '.join(missing)}")
    if not files:
        return fail(f"no .parquet files in {', '.join(args.src)}")
    if args.images_dir and not os.path.isdir(args.images_dir):
        return fail(f"--images-dir not found: {args.images_dir}")
    opts = {
        "drop_ties": args.drop_ties,
        "drop_unlabeled": args.drop_unlabeled,
        "images_dir": os.path.abspath(args.images_dir) if args.images_dir else None,
        "batch_rows": args.batch_rows,
        **image_options(args),
    }
    units, files_skipped, inputs = plan(files, opts)
    if files_skipped.get("no_image_columns") and not units:
        return fail(
            "the parquet files have no jpg_0/jpg_1 columns (the _no_images variant): "
            "pass --images-dir"
        )
    source = {
        "inputs": inputs,
        "options": {k: v for k, v in opts.items() if k not in ("batch_rows", "images_dir")},
        "images_dir": Path(args.images_dir).name if args.images_dir else None,
    }
    return write_from_args(
        args,
        "pickapic",
        source=source,
        units=units,
        convert=convert_row_group,
        files_skipped=files_skipped,
    )
