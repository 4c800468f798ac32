"""Decoding the members of a shard sample (image bytes, json),
with failures turned into counted skips."""

from __future__ import annotations

import io
import json

from PIL import Image

from align.data.pipeline import SkipSample
from align.data.schema import pair_meta_problem, single_meta_problem


def decode_image(sample: dict, key: str) -> Image.Image:
    """The RGB image stored under ``key``; a missing member or undecodable bytes raise
    SkipSample."""
    data = sample.get(key)
    if data is None:
        raise SkipSample(f"missing_{key.split('.')[0]}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exn:
        raise SkipSample("corrupt_image", repr(exn)) from None
    return image.convert("RGB")


def decode_caption(raw: object) -> str:
    """A caption member or json field as stripped text; SkipSample when missing,
    not UTF-8 or empty."""
    if raw is None:
        raise SkipSample("missing_caption")
    try:
        caption = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    except UnicodeDecodeError:
        raise SkipSample("bad_caption") from None
    caption = caption.strip()
    if not caption:
        raise SkipSample("empty_caption")
    return caption


def decode_json(sample: dict) -> object:
    """The sample's ``json`` member parsed; a missing or unparsable one raises SkipSample."""
    try:
        return json.loads(sample["json"])
    except KeyError:
        raise SkipSample("missing_json") from None
    except (ValueError, UnicodeDecodeError):
        raise SkipSample("bad_json") from None


def read_pair_meta(meta: object, drop_ties: bool) -> tuple[str, float]:
    """(caption, label_0) of a pair's parsed json; SkipSample for an unusable pair or a tie being
    dropped. Shared by the image and the latent-cache decoders,
    so both skip exactly the same pairs."""
    problem = pair_meta_problem(meta)
    if problem:
        raise SkipSample(problem)
    caption = meta["caption"].strip()
    if not caption:
        raise SkipSample("empty_caption")
    label_0 = float(meta["label_0"])
    if label_0 == 0.5 and drop_ties:
        raise SkipSample("tie")
    return caption, label_0


def read_single_meta(meta: object, want: bool | None = None) -> tuple[str, bool] | None:
    """(caption, label) of a single image's parsed json; None when its label is not ``want`` (the
    other class's stream); SkipSample for an unusable one. Shared by the image and the latent-cache
    decoders, so both skip exactly the same samples."""
    problem = single_meta_problem(meta)
    if problem:
        raise SkipSample(problem)
    if want is not None and meta["label"] is not want:
        return None
    caption = meta["caption"].strip()
    if not caption:
        raise SkipSample("empty_caption")
    return caption, meta["label"]


def load_image(path) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, why it could not be read)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB"), None
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"
