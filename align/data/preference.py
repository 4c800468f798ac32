"""Pick-a-Pic pairs for training a (segment-level) preference model such as Denscore.

Pair shards (``align.data.schema``: ``jpg_0.jpg``, ``jpg_1.jpg``, ``json`` with ``caption``,
``label_0``, ``label_1``) -> batches of B pairs: ``pixel_values`` (2B, 3, S, S) with every pair's
*first* image in rows [:B] and its second in rows [B:] (no winner-first reordering: the labels say
who won), ``label_0`` / ``label_1`` (B,), ``caption`` (B). Ties (0.5 / 0.5) are kept by default:
PickScore's objective trains on them.

Images get CLIP's preprocessing (``align.rewards.base.openai_clip_transform``: bicubic resize of the
shorter side, center crop, the CLIP mean and std), the same as the reward registry applies when
scoring. "Pairs whose captions are long": ``min_segments`` drops pairs whose caption has fewer
segments than that (official splitter), counted as ``train/skipped/short_caption``; a caption with
no segment at all is ``no_segments``.

Synthetic long-caption pairs for the embedded default and tests
(:func:`write_synthetic_long_pairs`): a scene of ``align.data.synthetic_long`` with its long
caption; the preferred image is the scene, the other the same scene with one shape recoloured or
reshaped, so only the sentence about that shape tells the two apart.

    align data synthetic longpairs --out data/synthetic/longpairs
                                   [--samples 256 --shards 4 --resolution 64]
"""

from __future__ import annotations

import copy
import functools
import random
from pathlib import Path

import torch

from align.data.images import decode_image, decode_json, read_pair_meta
from align.data.pipeline import SkipSample, collate
from align.data.schema import PAIR_IMAGE_KEYS
from align.data.shard_module import ShardSetDataModule
from align.data.synthetic import COLORS, SHAPES, _write_shards, pair_sample
from align.data.synthetic_long import render_scene, scene_caption, synthetic_scene
from align.models.splitters import official_split
from align.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_rgb
from align.rewards.segments import split_prompts


def clip_transform(image_size: int = 224, mean=None, std=None):
    from torchvision.transforms import (
        Compose,
        InterpolationMode,
        Normalize,
        Resize,
        CenterCrop,
        ToTensor,
    )

    return Compose(
        [
            Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(image_size),
            to_rgb,
            ToTensor(),
            Normalize(list(mean or OPENAI_CLIP_MEAN), list(std or OPENAI_CLIP_STD)),
        ]
    )


def segment_count(caption: str) -> int:
    """Segments of ``caption`` that hold a letter or a digit (official splitter)."""
    return len(split_prompts([caption], official_split)[0])


def decode_preference_pair(
    sample: dict, transform, drop_ties: bool = False, min_segments: int = 1
) -> dict:
    """One raw pair sample -> both images (in shard order), the caption and the labels;
    SkipSample otherwise."""
    caption, label_0 = read_pair_meta(decode_json(sample), drop_ties)
    label_1 = 1.0 - label_0  # the schema check guarantees label_0 + label_1 == 1
    n = segment_count(caption)
    if n == 0:
        raise SkipSample("no_segments")
    if n < min_segments:
        raise SkipSample("short_caption")
    first, second = (decode_image(sample, key) for key in PAIR_IMAGE_KEYS)
    return {
        "pixel_values": torch.stack([transform(first), transform(second)]),
        "caption": caption,
        "label_0": label_0,
        "label_1": label_1,
        "key": sample.get("__key__", ""),
    }


class PreferencePairDataModule(ShardSetDataModule):
    """Streams pair shards for preference-model training (DDP-safe, equal batches per rank).

    Args:
        train_shards / val_shards: brace patterns, globs, directories or files of pair shards.
        batch_size: pairs per micro-batch per GPU (the image tower sees 2 x batch_size images).
        image_size: the CLIP input size (224 for CLIP-H and the tiny CLIP); ``image_mean`` /
            ``image_std``: the CLIP normalisation (default: OpenAI CLIP's, which laion's CLIP-H uses
            too).
        min_segments: keep pairs whose caption has at least this many segments ("long captions").
        drop_ties: drop 0.5 / 0.5 pairs (default False: PickScore trains on ties).
        Others: the loader settings of ``align.data.shard_module.StreamingDataModule``.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 8,
        image_size: int = 224,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        min_segments: int = 1,
        drop_ties: bool = False,
        **kwargs,
    ):
        super().__init__(train_shards, val_shards, batch_size=batch_size, **kwargs)
        # every pair's first image in rows [:B], its second in [B:]
        self.collate = functools.partial(collate, split=("pixel_values",))
        self.image_size, self.min_segments, self.drop_ties = image_size, min_segments, drop_ties
        self.transform = clip_transform(image_size, image_mean, image_std)

    def decoder(self, train: bool):
        return lambda sample, counter, rng: decode_preference_pair(
            sample, self.transform, self.drop_ties, self.min_segments
        )


# ---- synthetic long-caption pairs ----------------------------------------------------------------
def _perturb(scene: dict, rng: random.Random) -> dict:
    """The scene with one shape recoloured or reshaped (to a (colour, shape) no other shape has)."""
    other = copy.deepcopy(scene)
    target = rng.choice(other["objects"])
    taken = {(o["color"], o["shape"]) for o in other["objects"]}
    if rng.random() < 0.5:
        options = [(c, target["shape"]) for c in COLORS if (c, target["shape"]) not in taken]
    else:
        options = [(target["color"], s) for s in SHAPES if (target["color"], s) not in taken]
    options = options or [(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken]
    target["color"], target["shape"] = rng.choice(options)
    return other


def synthetic_long_pair(
    index: int, size: int, rng: random.Random, tie_fraction: float = 0.05
) -> dict:
    """One pair sample with a long caption (see the module doc);
    winner position and ties drawn at random."""
    scene = synthetic_scene(rng)
    caption = scene_caption(scene, rng)
    good, bad = render_scene(scene, size, rng), render_scene(_perturb(scene, rng), size, rng)
    return pair_sample(index, caption, good, bad, rng, tie_fraction, "synth-long")


def write_synthetic_long_pairs(
    out_dir: str | Path,
    samples: int = 256,
    shards: int = 4,
    resolution: int = 64,
    seed: int = 0,
    tie_fraction: float = 0.05,
) -> list[Path]:
    """Write ``samples`` long-caption pairs into ``shards`` tars ``longpairs-000000.tar`` ...;
    returns them."""

    def make(i: int, rng: random.Random) -> dict:
        return synthetic_long_pair(i, resolution, rng, tie_fraction)

    return _write_shards(out_dir, "longpairs", samples, shards, make, seed)
