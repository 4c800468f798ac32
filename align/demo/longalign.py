"""LongAlign SFT in the shapes world: segment encoding against CLIP's 77-token truncation.

Long captions (``world.caption(scene, long=True)``) put every object's sentence after a 92-token
fact-free preamble, so a truncating encoder never sees a fact. Both arms fine-tune the same base
with ``SFTModule`` on the same long-caption shards (``LongCaptionDataModule``, the real long-caption
schema) and differ only in the prompt encoder: ``segment`` (LongAlign's segment-level CLIP encoding,
``align.models.segment``) or ``truncate`` (the standard CLIP encoder: ``tokenize`` cuts every
caption at 77 tokens). Evaluation samples held-out long captions (never in the shards) with each
arm's own encoder and judges only the facts whose sentence lies past token 77 (``cells_beyond``).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import numpy as np

from align.demo import world
from align.demo.judge import parse_caption

ENCODERS = {"segment": "segment", "truncate": "clip"}  # demo arm -> DiffusionModule prompt_encoder
TRUNCATION = 77  # CLIP's positions: <sot> + 75 content tokens + <eot>


def cells_beyond(caption: str, tokenizer, max_length: int = TRUNCATION) -> set[int]:
    """The cells of the objects whose sentence lies wholly past CLIP's ``max_length`` tokens.

    A 77-token encoder keeps <sot>, the first ``max_length - 2`` content tokens and <eot>; a
    sentence whose first token comes after those is dropped entirely by truncation. Token positions
    are counted with the CLIP tokenizer on the caption's prefix (CLIP's BPE never merges across
    whitespace, so the prefix's tokens are the caption's first tokens).
    """
    cells = set()
    for match in re.finditer(r"[^.]+", caption):
        objs = parse_caption(match.group())
        if not objs:
            continue
        prefix = caption[: match.start()]
        n_prefix = (
            len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix.strip() else 0
        )
        if n_prefix >= max_length - 2:
            cells.update(o.cell for o in objs)
    return cells


def long_eval_captions(n: int, seed: int = 7919, exclude=(), max_objects: int = 1) -> list[str]:
    """``n`` distinct long captions of random scenes (at most ``max_objects`` objects),
    none in ``exclude``.

    With one object per scene the world has 32 distinct captions; the training shards exclude these.
    """
    excluded, out = set(exclude), []
    rng = random.Random(seed)
    for _ in range(100_000):
        cap = world.caption(world.random_scene(rng, max_objects=max_objects), long=True)
        if cap not in excluded and cap not in out:
            out.append(cap)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} distinct long captions outside exclude (asked for {n})")


def write_long_caption_shards(
    out_dir: str | Path,
    n_scenes: int,
    seed: int,
    max_objects: int = 1,
    exclude=(),
    shards: int = 16,
) -> Path:
    """``n_scenes`` rendered scenes (jittered, as the base's) with their correct long captions, as
    long-caption shards (``jpg``, ``txt``, ``json``; ``align.data.schema``)
    ``longcaption-000000.tar`` ... in ``out_dir``.

    Scenes whose long caption is in ``exclude`` (the held-out captions) are redrawn. Scenes are
    written in random order, so shards need no buffer shuffle; many small shards give each training
    seed its own order of shards. Returns ``out_dir``.
    """
    from align.data.synthetic import _write_shards
    from align.demo.prefs import png_free_jpeg

    excluded = set(exclude)

    def make(i, rng):
        for _ in range(10_000):
            scene = world.random_scene(rng, max_objects=max_objects)
            cap = world.caption(scene, long=True)
            if cap not in excluded:
                break
        else:
            raise ValueError("every scene's caption is excluded")
        image = np.asarray(world.render(scene, rng))
        meta = {
            "source": "shapes-world",
            "index": i,
            "objects": [{"cell": o.cell, "color": o.color, "shape": o.shape} for o in scene],
        }
        return {
            "__key__": f"{i:09d}",
            "jpg": png_free_jpeg(image),
            "txt": cap.encode("utf-8"),
            "json": json.dumps(meta).encode(),
        }

    out = Path(out_dir)
    _write_shards(out, "longcaption", n_scenes, min(shards, n_scenes), make, seed)
    return out


def resolve_encoder(components, encoder):
    """A prompt encoder module: ``segment`` / ``truncate`` built on ``components``,
    or a module as given."""
    if isinstance(encoder, str):
        from align.models.prompts import build_prompt_encoder

        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
        return build_prompt_encoder(components, ENCODERS[encoder]).eval()
    return encoder


def evaluate_long(components, unet, encoder, captions: list[str], seeds: list[int], **kw) -> dict:
    """Judge score of samples for long ``captions`` x ``seeds`` (``kw``: ``steps``, ``guidance``),
    counting only the facts past token 77.

    ``encoder``: ``segment``, ``truncate`` or a prompt encoder module (a trained module's
    ``prompt_encoder``); conditional and unconditional embeddings both come from it. Returns
    ``evaluate``'s dict (``score``: mean over images of the fraction of their caption's late facts
    satisfied; ``scores``, ``images``, ``seconds``) plus ``cells`` (the late cells of each caption).
    Captions without late facts are an error.
    """
    from align.demo.evaluate import evaluate, make_pipeline

    t = time.time()
    cells = [cells_beyond(c, components.tokenizers[0]) for c in captions]
    if not all(cells):
        raise ValueError(
            "every evaluation caption needs facts past token 77: "
            f"{[c for c, k in zip(captions, cells) if not k]}"
        )
    pipe = make_pipeline(components, unet=unet)
    encoder = resolve_encoder(components, encoder)
    res = evaluate(pipe, captions, list(seeds), encoder, cells, **kw)
    return {**res, "cells": cells, "seconds": time.time() - t}
