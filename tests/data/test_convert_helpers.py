"""align.data.convert_helpers: image preparation shared by the converters."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from align.data.convert_helpers import ImageError, prepare_jpeg


def _image(size, mode="RGB", fmt="JPEG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 0)[: len(mode)] if mode != "L" else 5).save(out, fmt)
    return out.getvalue()


def test_prepare_jpeg() -> None:
    small = _image((16, 12))
    assert prepare_jpeg(small, max_side=16) == small  # nothing to do: bytes pass through
    big = Image.open(io.BytesIO(prepare_jpeg(_image((64, 32)), max_side=16)))
    assert big.format == "JPEG" and big.size == (16, 8)
    short = Image.open(io.BytesIO(prepare_jpeg(_image((64, 32)), shorter_side=16)))
    assert short.size == (32, 16)
    rgba = Image.open(io.BytesIO(prepare_jpeg(_image((8, 8), "RGBA", "PNG"))))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0))[0] > 240  # transparent -> white, not black
    for bad in (b"", b"garbage", small[: len(small) // 2]):
        with pytest.raises(ImageError):
            prepare_jpeg(bad)
