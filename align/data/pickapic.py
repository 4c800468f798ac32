"""Pick-a-Pic pairs for Diffusion-DPO: shards in the pair schema (``align.data.schema``) -> batches
of ``2B`` images, winners in rows ``[:B]`` and losers in rows ``[B:]``,
as the DPO objective expects.

Official handling: ties (label_0 == 0.5) are dropped, the preferred image goes first, images are
resized on the shorter side, cropped (center or random) and flipped. SDXL's original sizes and crop
corners ride along.
"""

from __future__ import annotations

import functools
import random

import torch

from align.data.cached import CachedShards
from align.data.images import decode_image, decode_json, read_pair_meta
from align.data.pipeline import collate
from align.data.schema import PAIR_IMAGE_KEYS
from align.data.shard_module import ShardSetDataModule
from align.data.transforms import ImageTransform, augment_pair


def decode_pair(
    sample: dict,
    transform: ImageTransform,
    drop_ties: bool,
    joint_augment: bool,
    rng: random.Random = random,
) -> dict | None:
    """One raw pair sample -> winner-first tensors; raises SkipSample for unusable samples."""
    caption, label_0 = read_pair_meta(decode_json(sample), drop_ties)
    first, second = (decode_image(sample, key) for key in PAIR_IMAGE_KEYS)
    winner, loser = (first, second) if label_0 >= 0.5 else (second, first)
    w, l = augment_pair(transform, winner, loser, joint=joint_augment, rng=rng)
    return {
        "pixel_values": torch.stack([w.pixels, l.pixels]),
        "original_size": torch.tensor([w.original_size, l.original_size]),
        "crop_top_left": torch.tensor([w.crop_top_left, l.crop_top_left]),
        "caption": caption,
        "label": max(label_0, 1.0 - label_0),
        "key": sample.get("__key__", ""),
    }


# a pair's two rows (winner, loser) of images or cached latents: batches hold every winner, then
# every loser (the order the objective relies on)
PAIR_ROWS = ("pixel_values", "latent_moments", "original_size", "crop_top_left")
collate_pairs = functools.partial(collate, split=PAIR_ROWS)


class PickAPicDataModule(ShardSetDataModule):
    """Streams Pick-a-Pic pair shards with webdataset, DDP-safe,
    with equal epoch lengths on every rank.

    Args:
        train_shards / val_shards: brace patterns, globs, directories or files of pair shards.
        batch_size: pairs per micro-batch per GPU (the UNet sees 2 x batch_size images).
        resolution: square training size in pixels.
        crop: ``center`` or ``random``. flip_prob: probability of a horizontal flip.
        joint_augment: a pair's two images share crop and flip.
        drop_ties: drop pairs labelled 0.5/0.5 (the official default).
        cached: the shards are a latent cache (``align data cache-latents``; ``align.data.cached``):
            batches carry ``latent_moments`` and prompt embeddings instead of pixels, and the module
            skips the VAE and text encoders. The crop is the cache's (center); ``flip_prob > 0``
            needs a cache made with --flip.
        Others: the loader settings of ``align.data.shard_module.StreamingDataModule``.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 1,
        resolution: int = 512,
        crop: str = "random",
        flip_prob: float = 0.5,
        joint_augment: bool = True,
        drop_ties: bool = True,
        cached: bool = False,
        **kwargs,
    ):
        super().__init__(train_shards, val_shards, batch_size=batch_size, **kwargs)
        self.drop_ties, self.joint_augment = drop_ties, joint_augment
        self.train_transform = ImageTransform(resolution, crop=crop, flip_prob=flip_prob)
        self.val_transform = ImageTransform(resolution, crop="center", flip_prob=0.0)
        self.cache, self.collate = None, collate_pairs
        if cached:
            self.cache = CachedShards(
                [self.train_urls, self.val_urls], ("pair",), resolution, flip_prob, crop
            )
            self.collate = functools.partial(collate_pairs, extras=self.cache.extras)

    def decoder(self, train: bool):
        transform = self.train_transform if train else self.val_transform
        if self.cache is not None:
            return self.cache.pair_decoder(transform.flip_prob, self.drop_ties, self.joint_augment)
        return lambda sample, counter, rng: decode_pair(
            sample, transform, self.drop_ties, self.joint_augment, rng
        )
