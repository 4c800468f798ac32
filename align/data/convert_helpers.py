"""Helpers shared by the ``align data`` converters: image preparation, long-caption samples, JSONL
reading, input lookup, the common command-line options, and running the shard writer.

Kept apart from :mod:`align.data.writer`, which holds only the shard-writing machinery these
converters feed.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from align.data.writer import Skip, Unit, die_with_parent, run_command, write_shards

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class ImageError(ValueError):
    """Image bytes that cannot be decoded."""


def prepare_jpeg(data: bytes, max_side: int = 0, shorter_side: int = 0, quality: int = 95) -> bytes:
    """Validated RGB JPEG bytes, downscaled so the longer side is <= ``max_side`` and the shorter
    side is <= ``shorter_side`` (0 = no limit; never upscales). A JPEG that needs no change is
    returned as is; anything else is re-encoded at ``quality``. Raises :class:`ImageError` for
    bytes that cannot be decoded."""
    from PIL import Image

    if not data:
        raise ImageError("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            scale = min(
                1.0,
                max_side / max(width, height) if max_side else 1.0,
                shorter_side / min(width, height) if shorter_side else 1.0,
            )
            if scale == 1.0 and image.format == "JPEG" and image.mode == "RGB":
                # Validation only: DCT-scaled decoding still reads every entropy-coded byte (so
                # truncation is caught) at half the cost of a full decode.
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
                return bytes(data)
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
            if image.format == "JPEG" and scale < 1.0:
                image.draft("RGB", target)  # DCT-domain downscale to >= target: much faster
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (
                image.mode == "P" and "transparency" in image.info
            ):
                rgba = image.convert("RGBA")  # transparent -> white, not black
                converted = Image.new("RGB", rgba.size, (255, 255, 255))
                converted.paste(rgba, mask=rgba.getchannel("A"))
            else:
                converted = image.convert("RGB")
            if converted.size != target:
                converted = converted.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            out = io.BytesIO()
            converted.save(out, "JPEG", quality=quality)
            return out.getvalue()
    except Exception as exn:  # any failure of a third-party decoder on bad bytes is a bad image
        raise ImageError(f"{type(exn).__name__}: {exn}") from None


def long_caption_sample(
    image: bytes | None, caption: str | None, meta: dict, opts: dict, key: str | None = None
) -> dict | Skip:
    """A long-caption sample (``jpg``, ``txt``, ``json``) or the reason it cannot be one. ``opts``
    carries ``max_side``, ``shorter_side`` and ``quality`` (see :func:`prepare_jpeg`)."""
    caption = caption.strip() if isinstance(caption, str) else ""
    if not caption:
        return Skip("missing_caption")
    if not image:
        return Skip("missing_image")
    try:
        jpg = prepare_jpeg(image, opts["max_side"], opts["shorter_side"], opts["quality"])
    except ImageError:
        return Skip("undecodable_image")
    sample = {"jpg": jpg, "txt": caption, "json": meta}
    if key is not None:
        sample["__key__"] = key
    return sample


def convert_image_rows(payload: tuple, need):
    """Writer converter: a chunk of ``(image file under the folder, caption or None, json meta,
    sample key or None)`` rows as long-caption samples (payload: the folder, the rows, ``opts``)."""
    images, rows, opts = payload
    for j, (file, caption, meta, key) in enumerate(rows):
        if not need(j):
            yield None
            continue
        path = Path(images) / file
        image = path.read_bytes() if caption and path.is_file() else None
        yield long_caption_sample(image, caption, meta, opts, key=key)


def chunk_units(
    rows: list, shard_size: int, name: str, payload: Callable[[list], Any]
) -> list[Unit]:
    """An in-memory list of rows as units of one shard each: ``Unit(f"{name}:{k}", ...)``."""
    chunks = [rows[k : k + shard_size] for k in range(0, len(rows), shard_size)]
    return [Unit(f"{name}:{k}", len(chunk), payload(chunk)) for k, chunk in enumerate(chunks)]


def iter_jsonl(path: str | os.PathLike, start: int = 0) -> Iterator[tuple[int, Any]]:
    """(byte offset, parsed object or None when the line is not JSON) for every non-blank line."""
    with open(path, "rb") as handle:
        handle.seek(start)
        while line := handle.readline():
            offset = handle.tell() - len(line)
            if not line.strip():
                continue
            try:
                yield offset, json.loads(line)
            except ValueError:
                yield offset, None


def read_jsonl_at(handle, offset: int) -> Any:
    handle.seek(offset)
    return json.loads(handle.readline())


def dotted(obj: Any, path: str) -> Any:
    """``obj["a"]["b"]`` for ``path`` "a.b"; None when any step is missing."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def norm_relpath(path: str) -> str:
    """A relative path as a stable key: forward slashes, no leading ``./`` or ``/``."""
    path = str(path).replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path.lstrip("/")


def find_image(directory: str | os.PathLike, stem: str) -> Path | None:
    """``directory/<stem>.jpg|.jpeg|.png|.webp`` (first that exists), or None."""
    paths = (Path(directory) / f"{stem}{suffix}" for suffix in IMAGE_SUFFIXES)
    return next((path for path in paths if path.is_file()), None)


def fail(message: str, prog: str | None = None) -> int:
    """Print ``[<prog>: ]error: <message>``; the exit status of bad arguments or inputs (2)."""
    print(f"{prog}: error: {message}" if prog else f"error: {message}", file=sys.stderr)
    return 2


def out_dir_command(argv: list[str], command: str, write: Callable) -> int:
    """``align data <command> OUT_DIR`` (else its usage, exit status 2): ``write(OUT_DIR)``, then
    the path it returns, or one ``<name> <path>`` line per entry of the dict it returns."""
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"usage: align data {command} OUT_DIR", file=sys.stderr)
        return 2
    written = write(argv[0])
    if isinstance(written, dict):
        for name, path in written.items():
            print(f"{name:<12} {path}")
    else:
        print(f"{command.replace('-', ' ')}: {written}")
    return 0


def map_in_processes(function: Callable, items: list, workers: int) -> Iterable:
    """``map(function, items)``, in up to ``workers`` processes (which die with this one) when
    there are several items."""
    if workers <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(
        min(workers, len(items)),
        mp_context=ctx,
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        yield from pool.map(function, items)
    finally:
        pool.shutdown(cancel_futures=True)


def command_parser(command: str, doc: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of ``align data <command>``, described by the first paragraph of ``doc`` (on one
    line, so that a raw formatter prints it as the others do)."""
    description = " ".join(doc.strip().split("\n\n")[0].split())
    return argparse.ArgumentParser(prog=f"align data {command}", description=description, **kwargs)


def add_image_args(parser, max_side: int = 0, shorter_side: int = 0) -> None:
    for flag, default, which in (
        ("--max-side", max_side, "longer"),
        ("--shorter-side", shorter_side, "shorter"),
    ):
        parser.add_argument(
            flag,
            type=int,
            default=default,
            help=f"downscale so the {which} side is at most this (0 = keep; default {default})",
        )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")


def image_options(args) -> dict:
    """The options of :func:`add_image_args` (they are part of the fingerprint)."""
    return {"max_side": args.max_side, "shorter_side": args.shorter_side, "quality": args.quality}


def add_writer_args(parser, prefix: str, shard_size: int = 1000, workers: bool = True) -> None:
    parser.add_argument("--out", required=True, help="output folder (created; resumable)")
    parser.add_argument("--prefix", default=prefix, help=f"shard name prefix (default {prefix})")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=shard_size,
        help=f"input rows per shard (default {shard_size})",
    )
    if workers:
        parser.add_argument(
            "--workers",
            type=int,
            default=max(1, min(8, os.cpu_count() or 1)),
            help="worker processes (output is identical for any number)",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def write_from_args(args, command: str, **kwargs) -> int:
    """:func:`~align.data.writer.write_shards` into ``args.out`` with the options of
    :func:`add_writer_args`; the converter's exit status (:func:`~align.data.writer.run_command`).
    """
    return run_command(
        lambda: write_shards(
            args.out,
            command=command,
            prefix=args.prefix,
            shard_size=args.shard_size,
            workers=args.workers,
            progress=not args.no_progress,
            **kwargs,
        )
    )
