"""Convert SA-1B tars (sa_N.jpg + sa_N.json) with a folder of long captions (sa_N.txt) into
long-caption shards.

Usage: align data sam --src <SA-1B tars, globs or folders...> --captions <folder of sa_N.txt>
       --out data/sam [--shorter-side 512] [--max-side 0] [--shard-size 1000] [--workers N]

One unit per input tar (its images are counted first from the tar headers), so the shards do not
depend on ``--workers``. The caption of ``sa_N.jpg`` is ``<captions>/sa_N.txt`` or
``<captions>/<tar name>/sa_N.txt``. The SA-1B mask annotations (``sa_N.json``) are not read. An
image without a caption is skipped and counted (``missing_caption``); an unreadable tar is skipped
and named. Output: ``jpg``, ``txt``, ``json`` (source, image file, tar) per sample, keyed ``sa_N``.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from align.data.convert_helpers import (
    add_image_args,
    add_writer_args,
    command_parser,
    fail,
    image_options,
    long_caption_sample,
    write_from_args,
)
from align.data.tars import expand_shard_paths, read_member
from align.data.writer import Unit, file_identity


def _is_image(member: tarfile.TarInfo) -> bool:
    return member.isfile() and member.name.lower().endswith((".jpg", ".jpeg"))


def caption_for(captions: Path, tar_stem: str, stem: str) -> str | None:
    for path in (captions / f"{stem}.txt", captions / tar_stem / f"{stem}.txt"):
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
    return None


def convert_tar(payload: tuple, need):
    """Writer converter: every image of one SA-1B tar, in tar order."""
    path, captions, opts = payload
    tar_stem = Path(path).name.split(".")[0]
    with tarfile.open(path, "r:*") as tar:
        for row, member in enumerate(m for m in tar if _is_image(m)):
            if not need(row):
                yield None
                continue
            name = PurePosixPath(member.name).name
            stem = name.rsplit(".", 1)[0]
            caption = caption_for(Path(captions), tar_stem, stem)
            image = read_member(tar, member) if caption else None
            meta = {"source": "sa-1b", "image": name, "tar": Path(path).name}
            yield long_caption_sample(image, caption, meta, opts, key=stem)


def main(argv: list[str]) -> int:
    parser = command_parser("sam", __doc__)
    add = parser.add_argument
    add("--src", nargs="+", required=True, help="SA-1B tars: paths, globs, braces or folders")
    add("--captions", required=True, help="folder of sa_N.txt captions")
    add_writer_args(parser, prefix="sam")
    add_image_args(parser, shorter_side=512)
    args = parser.parse_args(argv)

    from tqdm import tqdm

    paths, missing = expand_shard_paths(args.src)
    if missing or not paths:
        return fail(f"--src not found: {', '.join(missing or args.src)}")
    if not Path(args.captions).is_dir():
        return fail(f"--captions folder not found: {args.captions}")
    opts = image_options(args)
    captions = str(Path(args.captions).resolve())
    units, files_skipped = [], {}
    for path in tqdm(paths, desc="sam: counting images", unit="tar", disable=args.no_progress):
        try:
            with tarfile.open(path, "r:*") as tar:
                rows = sum(1 for m in tar if _is_image(m))
        except (tarfile.TarError, OSError, EOFError):
            files_skipped.setdefault("unreadable_tar", []).append(Path(path).name)
            continue
        if rows:
            units.append(Unit(Path(path).name, rows, (path, captions, opts)))
    source = {
        "inputs": [file_identity(p) for p in paths],
        "captions": Path(args.captions).name,
        "options": opts,
    }
    return write_from_args(
        args, "sam", source=source, units=units, convert=convert_tar, files_skipped=files_skipped
    )
