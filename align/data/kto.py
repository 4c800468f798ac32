"""Unpaired preference data for Diffusion-KTO: single images labelled desirable or undesirable.

Shards follow the single-image schema (``align.data.schema``: ``jpg`` + ``json`` with ``caption``,
boolean ``label``, ``image_uid``); ``align data kto-labels`` makes them from Pick-a-Pic pairs. The
two classes are streamed separately and mixed so that each sample is desirable with probability
``p_desirable`` (0.8 in the paper), whatever their ratio on disk (Pick-a-Pic has about 26% desirable
images). Each class streams every one of its images once per pass across ranks and workers
(``align.data.epochs``), a new order each pass; an epoch is ``batches_per_epoch`` batches per rank
(default: as many images as the shards hold).
"""

from __future__ import annotations

import functools
import random

import torch

from align.data.epochs import EpochStream, shard_sizes
from align.data.cached import CachedShards
from align.data.images import decode_image, decode_json, read_single_meta
from align.data.pipeline import collate, expand_shards
from align.data.schema import SINGLE_IMAGE_KEY
from align.data.shard_module import StreamingDataModule
from align.data.transforms import ImageTransform


def decode_single(
    sample: dict, transform: ImageTransform, want: bool | None = None, rng: random.Random = random
) -> dict | None:
    """One raw single-image sample -> tensors; None when it belongs to the other class's stream."""
    read = read_single_meta(decode_json(sample), want)
    if read is None:
        return None
    caption, desirable = read
    out = transform(decode_image(sample, SINGLE_IMAGE_KEY), rng)
    return {
        "pixel_values": out.pixels,
        "original_size": torch.tensor(out.original_size),
        "crop_top_left": torch.tensor(out.crop_top_left),
        "caption": caption,
        "desirable": desirable,
        "key": sample.get("__key__", ""),
    }


class KTODataModule(StreamingDataModule):
    """Streams desirable and undesirable images, mixed with probability ``p_desirable``, DDP-safe.

    Args:
        shards: single-image shards holding both classes
            (each class's stream reads them and keeps its own).
        desirable_shards / undesirable_shards: or one shard set per class (read once each).
        p_desirable: probability that a sample is desirable (the paper: 0.8).
        cached: the shards are a latent cache of single-image shards (``align data cache-latents``;
            see ``PickAPicDataModule``).
        val_shards: single-image shards for validation (optional).
        resolution, crop, flip_prob: as ``PickAPicDataModule``.
        Others: the loader settings of ``align.data.shard_module.StreamingDataModule``.
    """

    def __init__(
        self,
        shards: str | list[str] | None = None,
        desirable_shards: str | list[str] | None = None,
        undesirable_shards: str | list[str] | None = None,
        p_desirable: float = 0.8,
        batch_size: int = 2,
        resolution: int = 512,
        crop: str = "random",
        flip_prob: float = 0.5,
        val_shards: str | list[str] | None = None,
        cached: bool = False,
        **kwargs,
    ):
        super().__init__(batch_size=batch_size, **kwargs)
        if not 0.0 < p_desirable < 1.0:
            raise ValueError(f"p_desirable must be in (0, 1), got {p_desirable}")
        if shards is None and (desirable_shards is None or undesirable_shards is None):
            raise ValueError(
                "give `shards` (both classes) or both `desirable_shards` and `undesirable_shards`"
            )
        self.p_desirable = p_desirable
        self.desirable_urls = expand_shards(
            desirable_shards if desirable_shards is not None else shards
        )
        self.undesirable_urls = expand_shards(
            undesirable_shards if undesirable_shards is not None else shards
        )
        self.val_urls = expand_shards(val_shards) if val_shards else None
        # both classes' shards, each counted once (the same shards when ``shards`` holds both)
        self.train_urls = list(dict.fromkeys(self.desirable_urls + self.undesirable_urls))
        self.sizes = dict(zip(self.train_urls, shard_sizes(self.train_urls)))
        self.val_sizes = shard_sizes(self.val_urls) if self.val_urls else None
        self.train_transform = ImageTransform(resolution, crop=crop, flip_prob=flip_prob)
        self.val_transform = ImageTransform(resolution, crop="center", flip_prob=0.0)
        self.cache, self.collate = None, collate
        if cached:
            self.cache = CachedShards(
                [self.desirable_urls, self.undesirable_urls, self.val_urls],
                ("single",),
                resolution,
                flip_prob,
                crop,
            )
            self.collate = functools.partial(collate, extras=self.cache.extras)

    def _decoder(self, transform: ImageTransform, want: bool | None = None):
        if self.cache is not None:
            return self.cache.single_decoder(transform.flip_prob, want)
        return lambda sample, counter, rng: decode_single(sample, transform, want, rng)

    def train_samples(self) -> tuple[int, bool]:
        return sum(self.sizes.values()), True

    def stream(self, train: bool) -> EpochStream | None:
        if not train:
            if not self.val_urls:
                return None
            return self.epoch_stream(
                self.val_urls, self.val_sizes, self._decoder(self.val_transform), train
            )
        classes = [(self.desirable_urls, True), (self.undesirable_urls, False)]
        parts = [
            (i, urls, [self.sizes[u] for u in urls], self._decoder(self.train_transform, want))
            for i, (urls, want) in enumerate(classes)
        ]
        weights = [self.p_desirable, 1.0 - self.p_desirable]
        return self.mixed_stream(self.train_urls, list(self.sizes.values()), parts, weights, train)
