"""Convert JourneyDB (jsonl of img_path + prompt; images in a folder or tar archives) into
long-caption shards.

Usage: align data journeydb --annotations <train_anno_realease_repath.jsonl ...>
       --images <folder | archives...> --out data/journeydb [--caption-field prompt]
       [--shorter-side 512] [--shard-size 1000] [--workers N]

``img_path`` (e.g. ``./268/3c4f....jpg``) is relative to the images folder; with archives
(``268.tgz``, ``268.tar.gz`` or ``268.tar``, given as files, globs or a folder of them) its first
component names the archive and the rest is matched against the archive's member paths.
``--caption-field`` is a dotted path into an annotation (``prompt``, or e.g. ``Task2.Caption``).
Folder mode: one unit per ``--shard-size`` annotation lines. Archive mode: one unit per archive, its
rows are its annotations in archive order; an image in an archive with no annotation is counted as
``missing_caption``, an annotation whose image is in no archive as ``missing_image``. Memory: byte
offsets of annotation lines, not the annotations.
"""

from __future__ import annotations

import tarfile
from array import array
from collections import Counter
from itertools import islice
from pathlib import Path

from align.data.convert_helpers import (
    IMAGE_SUFFIXES,
    add_image_args,
    add_writer_args,
    command_parser,
    dotted,
    fail,
    image_options,
    iter_jsonl,
    long_caption_sample,
    norm_relpath,
    read_jsonl_at,
    write_from_args,
)
from align.data.tars import expand_shard_paths, read_member
from align.data.writer import Skip, Unit, file_identity

ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")


def archive_stem(path: str) -> str:
    name = Path(path).name
    return next((name[: -len(s)] for s in ARCHIVE_SUFFIXES if name.endswith(s)), name)


def _sample(annotation: dict, image: bytes | None, opts: dict):
    caption = dotted(annotation, opts["caption_field"])
    return long_caption_sample(
        image,
        caption if isinstance(caption, str) else None,
        {"source": "journeydb", "img_path": annotation.get("img_path")},
        opts,
    )


def convert_lines(payload: tuple, need):
    """Writer converter (folder mode): ``rows`` annotation lines from a byte offset."""
    annotations, start, rows, images, opts = payload
    for row, (_, annotation) in enumerate(islice(iter_jsonl(annotations, start), rows)):
        if not need(row):
            yield None
        elif not isinstance(annotation, dict) or not annotation.get("img_path"):
            yield Skip("bad_annotation")
        else:
            path = Path(images) / norm_relpath(annotation["img_path"])
            yield _sample(annotation, path.read_bytes() if path.is_file() else None, opts)


def _lookup(wanted: dict, name: str, stem: str) -> str | None:
    """The annotation key of a member path: the full path, ``<stem>/<rest>``, or shorter suffixes
    of it."""
    parts = norm_relpath(name).split("/")
    for i in range(len(parts)):
        candidate = "/".join(parts[i:])
        for key in (candidate, f"{stem}/{candidate}"):
            if key in wanted:
                return key
    return None


def convert_archive(payload: tuple, need):
    """Writer converter (archive mode): the annotated images of one archive, in archive order, then
    a ``missing_image`` skip for each annotation of this archive that was not found in it."""
    archive, offsets, annotations, opts = payload
    stem = archive_stem(archive)
    wanted: dict[str, int] = {}
    duplicates = 0
    with open(annotations, "rb") as handle:
        for offset in offsets:
            key = norm_relpath(read_jsonl_at(handle, offset)["img_path"])
            duplicates += key in wanted
            wanted.setdefault(key, offset)
    seen: set[str] = set()
    with open(annotations, "rb") as handle, tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            key = _lookup(wanted, member.name, stem)
            if key is None:
                yield Skip("missing_caption", row=False)
                continue
            if key in seen:
                continue
            seen.add(key)
            if need(len(seen) - 1):
                yield _sample(read_jsonl_at(handle, wanted[key]), read_member(tar, member), opts)
            else:
                yield None
    yield from (Skip("missing_image") for key in wanted if key not in seen)
    yield from (Skip("duplicate_annotation") for _ in range(duplicates))


def plan_lines(annotations: list[str], images: str, shard_size: int, opts: dict) -> list[Unit]:
    """Folder mode: one unit per ``shard_size`` lines of each annotation file."""
    units = []
    for path in annotations:
        starts, count = [], 0  # the offsets of every unit's first line only (memory)
        for offset, _ in iter_jsonl(path):
            if count % shard_size == 0:
                starts.append(offset)
            count += 1
        for k, start in enumerate(starts):
            rows = min(shard_size, count - k * shard_size)
            units.append(Unit(f"{Path(path).name}:{k}", rows, (path, start, rows, images, opts)))
    return units


def plan_archives(
    annotations: list[str], archives: list[str], opts: dict
) -> tuple[list[Unit], Counter]:
    """Archive mode: one unit per (archive, annotation file); the annotations skipped."""
    by_stem = {archive_stem(a): a for a in archives}
    offsets = {stem: {} for stem in by_stem}  # stem -> annotation file -> array of line offsets
    pre_skipped: Counter = Counter()
    for path in annotations:
        for offset, annotation in iter_jsonl(path):
            img_path = annotation.get("img_path") if isinstance(annotation, dict) else None
            if not img_path:
                pre_skipped["bad_annotation"] += 1
                continue
            stem = norm_relpath(img_path).split("/")[0]
            if stem in by_stem:
                offsets[stem].setdefault(path, array("q")).append(offset)
            else:
                pre_skipped["missing_image"] += 1
    units = [
        Unit(f"{Path(archive).name}:{Path(path).name}", len(lines), (archive, lines, path, opts))
        for archive in archives
        for path, lines in offsets[archive_stem(archive)].items()
    ]
    return units, pre_skipped


def main(argv: list[str]) -> int:
    parser = command_parser("journeydb", __doc__)
    add = parser.add_argument
    add("--annotations", nargs="+", required=True, help="jsonl files with img_path and a caption")
    add(
        "--images",
        nargs="+",
        required=True,
        help="image folder, or tar/tgz archives or a folder of them",
    )
    add("--caption-field", default="prompt", help="dotted path of the caption in an annotation")
    add_writer_args(parser, prefix="journeydb")
    add_image_args(parser, shorter_side=512)
    args = parser.parse_args(argv)

    for path in args.annotations:
        if not Path(path).is_file():
            return fail(f"--annotations not found: {path}")
    opts = {"caption_field": args.caption_field, **image_options(args)}
    folder = args.images[0] if len(args.images) == 1 and Path(args.images[0]).is_dir() else None
    if folder is not None:
        archives = sorted(
            str(p) for p in Path(folder).iterdir() if p.name.endswith(ARCHIVE_SUFFIXES)
        )
    else:
        archives, missing = expand_shard_paths(args.images, suffix=".tgz")
        if missing or not archives:
            return fail(f"--images not found: {', '.join(missing or args.images)}")
    annotations = [str(Path(p).resolve()) for p in args.annotations]
    source = {"annotations": [file_identity(p) for p in annotations]}
    if folder is not None and not archives:
        units = plan_lines(annotations, str(Path(folder).resolve()), args.shard_size, opts)
        pre_skipped, convert = Counter(), convert_lines
        source["images"] = Path(folder).name
    else:
        units, pre_skipped = plan_archives(annotations, archives, opts)
        convert = convert_archive
        source["archives"] = [file_identity(a) for a in archives]
    source["options"] = opts
    return write_from_args(
        args, "journeydb", source=source, units=units, convert=convert, pre_skipped=pre_skipped
    )
