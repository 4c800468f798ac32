"""Long-caption images for LongAlign's SFT: several shard sources (SAM, JourneyDB, COCO, a LLaVA
subset, ...) mixed with configurable weights into batches of ``B`` images and their captions.

Shards follow the long-caption schema (``align.data.schema``): ``jpg``, ``txt`` (the caption,
UTF-8), ``json`` (source metadata, not needed for training and not read). A sample without a ``txt``
member, or whose caption is empty or not UTF-8, is skipped and counted, as is one without a
decodable ``jpg``; counters are per source (``train/skipped/<source>/missing_caption``).

Mixing: by default (no ``weight`` on any source) the sources are concatenated, as the official
LongAlign code does: one shard set whose every sample is seen once per pass (``align.data.epochs``),
each source in proportion to its size. With a ``weight`` on every source, each source is its own
stream (every sample once per pass of that source) and every sample of a batch is drawn from source
``i`` with probability ``weight_i / sum(weights)``, whatever the sizes; an epoch is then
``batches_per_epoch`` batches.

Images: resize the shorter side, crop (center by default) and, by default, no horizontal flip: long
captions say "on the left" and "on the right", which a flip would make false.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch

from align.data.epochs import EpochStream, shard_sizes
from align.data.cached import CachedShards
from align.data.images import decode_caption, decode_image
from align.data.pipeline import SkipSample, collate, expand_shards
from align.data.schema import LONG_CAPTION_KEYS
from align.data.shard_module import StreamingDataModule
from align.data.transforms import ImageTransform

IMAGE_KEY, CAPTION_KEY = LONG_CAPTION_KEYS


@dataclass
class CaptionSource:
    """One long-caption source: ``shards`` (brace patterns, globs, directories or files), its mixing
    ``weight`` (relative, >= 0; None: concatenate, each source by its size) and a ``name`` for its
    skip counters (default: ``source<i>``)."""

    shards: str | list[str]
    weight: float | None = None
    name: str | None = None


def decode_long_caption(
    sample: dict, transform: ImageTransform, source: str = "", rng: random.Random = random
) -> dict:
    """One raw long-caption sample -> an image tensor and its caption;
    raises SkipSample for unusable ones."""
    caption = decode_caption(sample.get(CAPTION_KEY))
    aug = transform(decode_image(sample, IMAGE_KEY), rng)
    return {
        "pixel_values": aug.pixels,
        "original_size": torch.tensor(aug.original_size),
        "crop_top_left": torch.tensor(aug.crop_top_left),
        "caption": caption,
        "key": sample.get("__key__", ""),
        "source": source,
    }


def resolve_sources(sources: list[CaptionSource | dict] | str | None) -> list[CaptionSource]:
    """Sources with names and expanded shard lists; a plain pattern string is one source named
    ``default``. A pattern that matches nothing, a negative weight, all-zero weights or weights on
    some sources only fail here, before training."""
    if sources is None:
        return []
    if isinstance(sources, str):
        sources = [CaptionSource(shards=sources, name="default")]
    out = []
    for i, src in enumerate(sources):
        src = CaptionSource(**src) if isinstance(src, dict) else src
        if src.weight is not None and src.weight < 0:
            raise ValueError(f"source {src.name or i}: weight must be >= 0, got {src.weight}")
        out.append(
            CaptionSource(
                shards=expand_shards(src.shards),
                weight=None if src.weight is None else float(src.weight),
                name=src.name or f"source{i}",
            )
        )
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    weighted = [s.weight is not None for s in out]
    if any(weighted) and not all(weighted):
        raise ValueError(
            f"give a weight to every source or to none (none: concatenate them by size); weights: "
            f"{ {s.name: s.weight for s in out} }"
        )
    if all(weighted) and out and sum(s.weight for s in out) <= 0:
        raise ValueError("at least one source needs a weight > 0")
    return out


def source_decoder(decode, name: str):
    """``decode`` whose skips are counted per source (``<source>/<reason>``)."""

    def wrapped(sample, counter, rng):
        try:
            return decode(sample, counter, rng)
        except SkipSample as skip:
            raise SkipSample(f"{name}/{skip.reason}") from skip

    return wrapped


class LongCaptionDataModule(StreamingDataModule):
    """Streams and mixes long-caption shard sources with webdataset; DDP-safe,
    equal epoch lengths per rank.

    Args:
        sources: ``[{shards: ..., weight: ..., name: ...}, ...]``
            (see ``CaptionSource``) or one shard pattern.
        val_sources: the same for validation (optional; mixed with their own weights).
        resolution: square training size in pixels. crop: ``center`` or ``random``. flip_prob:
            see the module doc.
        batches_per_epoch: batches each rank yields per epoch; None: one pass over the concatenated
            sources (with weights: as many samples as the sources hold).
        cached: the sources are latent caches (``align data cache-latents`` on long-caption shards):
            batches carry VAE moments and CLIP embeddings, and the module skips the VAE and text
            encoder (CLIP prompt encoders only: the segment encoder encodes captions itself).
        Others: the loader settings of ``align.data.shard_module.StreamingDataModule``.
    """

    def __init__(
        self,
        sources: list[CaptionSource] | str,
        val_sources: list[CaptionSource] | str | None = None,
        resolution: int = 512,
        crop: str = "center",
        flip_prob: float = 0.0,
        cached: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sources = resolve_sources(sources)
        if not self.sources:
            raise ValueError("LongCaptionDataModule needs at least one source")
        self.val_sources = resolve_sources(val_sources)
        self.train_transform = ImageTransform(resolution, crop=crop, flip_prob=flip_prob)
        self.val_transform = ImageTransform(resolution, crop="center", flip_prob=0.0)
        self.cache, self.collate = None, collate
        if cached:
            self.cache = CachedShards(
                [s.shards for s in self.sources + self.val_sources],
                ("long",),
                resolution,
                flip_prob,
                crop,
            )
            self.collate = functools.partial(collate, extras=self.cache.extras)

    def stream(self, train: bool) -> EpochStream | None:
        sources = self.sources if train else self.val_sources
        if not sources:
            return None
        transform = self.train_transform if train else self.val_transform

        def decoder(name: str):
            if self.cache is not None:
                return source_decoder(
                    self.cache.single_decoder(transform.flip_prob, source=name), name
                )
            return source_decoder(
                lambda sample, counter, rng: decode_long_caption(sample, transform, name, rng), name
            )

        if sources[0].weight is None:  # concatenated: one plan over every source's shards
            urls = [u for src in sources for u in src.shards]
            owner = {u: src.name for src in sources for u in src.shards}

            def decode(sample, counter, rng):
                name = owner.get(sample.get("__url__"), "default")
                return decoder(name)(sample, counter, rng)

            return self.epoch_stream(urls, shard_sizes(urls), decode, train)
        used = [(i, src) for i, src in enumerate(sources) if src.weight > 0]
        parts = [(i, src.shards, shard_sizes(src.shards), decoder(src.name)) for i, src in used]
        urls = [u for _, src in used for u in src.shards]
        weights = [src.weight for _, src in used]
        return self.mixed_stream(urls, shard_sizes(urls), parts, weights, train)

    def train_samples(self) -> tuple[int, bool]:
        urls = [
            u for src in self.sources if src.weight is None or src.weight > 0 for u in src.shards
        ]
        return sum(shard_sizes(urls)), self.sources[0].weight is not None
