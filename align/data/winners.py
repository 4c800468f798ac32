"""The preferred image of each Pick-a-Pic pair, for the SFT baselines of the Diffusion-DPO and
Diffusion-KTO papers ("SFT" rows: supervised fine-tuning on the preferred images).

Reads the same pair shards as ``PickAPicDataModule`` through the same ``decode_pair`` (same
validation, the same skip counters, ties always dropped: a tie has no preferred image) and keeps the
winner. An image that won several comparisons appears once per comparison, as it does in the pair
data. The loser is decoded too (that is ``decode_pair``'s cost, paid in the data workers).
"""

from __future__ import annotations

import random

from align.data.pickapic import decode_pair
from align.data.pipeline import collate
from align.data.shard_module import ShardSetDataModule
from align.data.transforms import ImageTransform


def decode_winner(sample: dict, transform: ImageTransform, rng: random.Random = random) -> dict:
    """One raw pair sample -> its preferred image and caption;
    raises SkipSample as ``decode_pair`` does."""
    pair = decode_pair(sample, transform, drop_ties=True, joint_augment=False, rng=rng)
    return {
        "pixel_values": pair["pixel_values"][0],
        "original_size": pair["original_size"][0],
        "crop_top_left": pair["crop_top_left"][0],
        "caption": pair["caption"],
        "key": pair["key"],
        "source": "pickapic",
    }


class WinnersDataModule(ShardSetDataModule):
    """Batches of B preferred images (with captions) from Pick-a-Pic pair shards;
    DDP-safe like PickAPicDataModule.

    Args: as ``PickAPicDataModule`` (``batch_size`` counts images here),
    without the pair-only options.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        resolution: int = 512,
        crop: str = "center",
        flip_prob: float = 0.5,
        **kwargs,
    ):
        super().__init__(train_shards, val_shards, **kwargs)
        self.collate = collate
        self.train_transform = ImageTransform(resolution, crop=crop, flip_prob=flip_prob)
        self.val_transform = ImageTransform(resolution, crop="center", flip_prob=0.0)

    def decoder(self, train: bool):
        transform = self.train_transform if train else self.val_transform
        return lambda sample, counter, rng: decode_winner(sample, transform, rng)
