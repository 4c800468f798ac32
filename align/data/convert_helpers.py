"""Helpers shared by the ``align data`` converters: image preparation, long-caption samples, JSONL
reading, input lookup, and the common command-line options.

Kept apart from :mod:`align.data.writer`, which holds only the shard-writing machinery these
converters feed.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from align.data.writer import Skip, Unit

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class ImageError(ValueError):
    """Image bytes that cannot be decoded."""


def prepare_jpeg(data: bytes, max_side: int = 0, shorter_side: int = 0, quality: int = 95) -> bytes:
    """Validated RGB JPEG bytes, downscaled so the longer side is <= ``max_side`` and the shorter
    side is <= ``shorter_side`` (0 = no limit; never upscales). A JPEG that needs no change is
    decoded (so truncated data is caught) and returned as is;
    anything else is re-encoded at ``quality``.
    Raises :class:`ImageError` for bytes that cannot be decoded."""
    from PIL import Image

    if not data:
        raise ImageError("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            scale = 1.0
            if max_side and max(width, height) > max_side:
                scale = min(scale, max_side / max(width, height))
            if shorter_side and min(width, height) > shorter_side:
                scale = min(scale, shorter_side / min(width, height))
            if scale == 1.0 and image.format == "JPEG" and image.mode == "RGB":
                # Validation only: DCT-scaled decoding still reads every entropy-coded byte (so
                # truncation is caught) at half the cost of a full decode.
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
                return bytes(data)
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
            if image.format == "JPEG" and scale < 1.0:
                # DCT-domain downscale to >= target: much faster decoding
                image.draft("RGB", target)
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (
                image.mode == "P" and "transparency" in image.info
            ):
                rgba = image.convert("RGBA")
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
        jpg = prepare_jpeg(
            image, opts.get("max_side", 0), opts.get("shorter_side", 0), opts.get("quality", 95)
        )
    except ImageError:
        return Skip("undecodable_image")
    sample = {"jpg": jpg, "txt": caption, "json": meta}
    if key is not None:
        sample["__key__"] = key
    return sample


def image_options(args) -> dict:
    """The image options of parsed :func:`add_image_args` arguments
    (they are part of the fingerprint)."""
    return {"max_side": args.max_side, "shorter_side": args.shorter_side, "quality": args.quality}


def chunk_units(
    rows: list, shard_size: int, name: str, payload: Callable[[list], Any]
) -> list[Unit]:
    """Split an in-memory list of rows into units of one shard each:
    ``Unit(f"{name}:{k}", len, payload(chunk))``."""
    return [
        Unit(
            f"{name}:{k // shard_size}",
            len(rows[k : k + shard_size]),
            payload(rows[k : k + shard_size]),
        )
        for k in range(0, len(rows), shard_size)
    ]


def iter_jsonl(path: str | os.PathLike, start: int = 0) -> Iterator[tuple[int, Any]]:
    """(byte offset, parsed object or None when the line is not JSON) for every non-blank line."""
    with open(path, "rb") as handle:
        handle.seek(start)
        while True:
            offset = handle.tell()
            line = handle.readline()
            if not line:
                return
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
    for suffix in IMAGE_SUFFIXES:
        path = Path(directory) / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def add_image_args(parser, max_side: int = 0, shorter_side: int = 0) -> None:
    parser.add_argument(
        "--max-side",
        type=int,
        default=max_side,
        help=f"downscale so the longer side is at most this (0 = keep; default {max_side})",
    )
    parser.add_argument(
        "--shorter-side",
        type=int,
        default=shorter_side,
        help=f"downscale so the shorter side is at most this (0 = keep; default {shorter_side})",
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")


def add_writer_args(parser, prefix: str, shard_size: int = 1000) -> None:
    parser.add_argument("--out", required=True, help="output folder (created; resumable)")
    parser.add_argument("--prefix", default=prefix, help=f"shard name prefix (default {prefix})")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=shard_size,
        help=f"input rows per shard (default {shard_size})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="worker processes (output is identical for any number)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
