"""The LightningDataModule shape shared by every data module that reads one train and one val shard
set."""

from __future__ import annotations

import lightning as L

from align.data.epochs import EpochLoader, EpochStream, MixedSegments, epoch_batches, shard_sizes
from align.data.pipeline import expand_shards


class StreamingDataModule(L.LightningDataModule):
    """What every streaming data module shares: its loader settings, the accumulation window its
    epochs are made of, and the training progress its stateful loaders save (see
    ``align.data.epochs``). A subclass sets ``self.collate`` and implements ``stream(train)``
    (with ``epoch_stream`` and ``mixed_stream``); the loaders follow.

    Args:
        batch_size: samples (pairs for pair data) per micro-batch per GPU.
        num_workers: data-loading processes per GPU.
        shuffle_buffer: samples shuffled together within a worker's stream (training only).
        batches_per_epoch: batches each rank yields per epoch; None: one pass over the data, every
            sample once across ranks and workers (``align.data.epochs``).
        val_batches: batches each rank reads per validation (None: the whole val set).
        seed: the data order's seed (a new order each epoch, the same on resume).
        global_batch_size: samples per optimizer step across GPUs; accumulation follows
            (``align.data.batching``).
    """

    def __init__(
        self,
        batch_size: int = 4,
        num_workers: int = 4,
        shuffle_buffer: int = 256,
        batches_per_epoch: int | None = None,
        val_batches: int | None = 8,
        seed: int = 0,
        global_batch_size: int | None = None,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.val_batches = val_batches
        self.seed = seed
        self.global_batch_size = global_batch_size

    def accumulation(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.accumulate_grad_batches) if trainer is not None else 1

    def consumed_batches(self) -> int | None:
        """Batches the training loop has processed in the current epoch (None outside a Trainer)."""
        trainer = getattr(self, "trainer", None)
        return (
            None
            if trainer is None
            else trainer.fit_loop.epoch_loop.batch_progress.current.processed
        )

    def train_samples(self) -> tuple[int, bool]:
        """(samples in the training set, whether its stream mixes sources by weight)."""
        raise NotImplementedError  # abstract: each data module knows its sources

    def epoch_plan(self, world: int, accumulation: int) -> tuple[int, int]:
        """(training samples, batches per rank per epoch) on ``world`` ranks:
        what ``align plan`` prints."""
        total, mixed = self.train_samples()
        return total, epoch_batches(
            total,
            world=world,
            workers=self.num_workers,
            batch_size=self.batch_size,
            multiple_of=accumulation,
            batches_per_epoch=self.batches_per_epoch,
            mixed=mixed,
        )

    def stream(self, train: bool) -> EpochStream | None:
        """The train or val stream (None: no validation set)."""
        raise NotImplementedError  # abstract: each data module knows its sources

    def epoch_stream(self, urls, sizes, decode, train: bool, **overrides) -> EpochStream:
        """An ``EpochStream`` with this module's train or val settings; ``overrides`` replace them
        (``shuffle`` also decides the shuffle buffer)."""
        shuffle = overrides.pop("shuffle", train)
        settings = dict(
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=shuffle,
            shuffle_buffer=self.shuffle_buffer if shuffle else 0,
            batches_per_epoch=self.batches_per_epoch if train else self.val_batches,
            multiple_of=self.accumulation() if train else 1,
        )
        return EpochStream(urls, sizes, decode, self.collate, **{**settings, **overrides})

    def mixed_stream(self, urls, sizes, parts, weights, train: bool) -> EpochStream:
        """A stream over ``urls`` whose every sample comes from part ``i`` with probability
        ``weights[i] / sum(weights)`` (``MixedSegments``). ``parts``: ``(offset, urls, sizes,
        decode)``, each streamed alone, one sample at a time, seeded ``seed + offset``."""
        alone = dict(batch_size=1, batches_per_epoch=None, multiple_of=1)
        sources = [
            self.epoch_stream(part_urls, part_sizes, decode, train, seed=self.seed + i, **alone)
            for i, part_urls, part_sizes, decode in parts
        ]
        mix = MixedSegments(sources, weights, seed=self.seed)
        return self.epoch_stream(urls, sizes, None, train, segment_samples=mix)

    def loader(self, stream: EpochStream | None, train: bool) -> EpochLoader | list:
        if stream is None:  # no validation set
            return []
        workers = self.num_workers if train else min(self.num_workers, 1)
        consumed = self.consumed_batches if train else None
        return EpochLoader(stream, workers, consumed=consumed, advance=train)

    def train_dataloader(self):
        return self.loader(self.stream(train=True), train=True)

    def val_dataloader(self):
        return self.loader(self.stream(train=False), train=False)


class ShardSetDataModule(StreamingDataModule):
    """Train and val shard sets streamed as data epochs: every sample once per pass across ranks and
    workers, a new order each pass, equal batch counts on every rank, resumable mid-epoch.

    A subclass sets ``self.collate`` and implements ``decoder(train)``:
    ``decode(sample, counter, rng)``, how one raw sample becomes tensors (``rng``: seeded per
    sample, for augmentation). Shard patterns are expanded and counted here, so a pattern that
    matches nothing fails when the module is built.

    Args:
        train_shards: brace patterns, globs, directories or files of shards.
        val_shards: the same for validation (optional).
        Others: the loader settings of ``StreamingDataModule``.
    """

    def __init__(
        self, train_shards: str | list[str], val_shards: str | list[str] | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        self.train_urls = expand_shards(train_shards)
        self.val_urls = expand_shards(val_shards) if val_shards else None
        self.train_sizes = shard_sizes(self.train_urls)
        self.val_sizes = shard_sizes(self.val_urls) if self.val_urls else None

    def train_samples(self) -> tuple[int, bool]:
        return sum(self.train_sizes), False

    def decoder(self, train: bool):
        raise NotImplementedError  # abstract: each data module decodes its own schema

    def stream(self, train: bool) -> EpochStream | None:
        if not train and not self.val_urls:
            return None
        urls, sizes = (
            (self.train_urls, self.train_sizes) if train else (self.val_urls, self.val_sizes)
        )
        return self.epoch_stream(urls, sizes, self.decoder(train), train)
