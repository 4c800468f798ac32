"""Webdataset plumbing shared by every data module: shard discovery and skip-and-count handling of bad
samples. The image data modules stream through ``align.data.epochs`` (every sample once per pass); the
prompt streams of reward fine-tuning loop over per-rank shares with the stages below.

Why not ``wds.WebDataset(...)`` as is: its default node splitter raises under DDP, a finite stream gives ranks
unequal batch counts (a DDP hang at the epoch's end), and its handlers drop bad samples without telling the
training loop. Here each rank reads a disjoint slice of the shards (``wds.split_by_node``), loops over it
until it has produced exactly ``batches`` batches per epoch, and every sample carries the count of samples
skipped (by reason) since the previous one, so the module can log ``train/skipped/<reason>``. A whole pass
over a rank's shards that yields no usable sample (the wrong schema for the module, every shard corrupt) is an
error naming the skip counts, not an endless loop of skips.
"""

from __future__ import annotations

import glob
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import braceexpand
import torch
import webdataset as wds

log = logging.getLogger(__name__)

SKIPPED = "__skipped__"
FILTERED = frozenset({"tie"})  # skipped by choice, not because the data is bad: logged at debug level


class SkipSample(Exception):
    """Raised by a decode function for a sample that cannot be used; ``reason`` names a skip counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def expand_shards(patterns: str | Iterable[str]) -> list[str]:
    """Every shard named by brace patterns (``a-{000..009}.tar``), globs or plain paths, in a stable order.

    A pattern that matches no file, or a brace pattern naming files of which some do not exist, is an error
    naming them: found at start, not mid-run.
    """
    if isinstance(patterns, (str, Path)):
        patterns = [str(patterns)]
    shards: list[str] = []
    for pattern in patterns:
        matched, missing = [], []
        for expanded in braceexpand.braceexpand(str(pattern)):
            if any(ch in expanded for ch in "*?["):
                matched.extend(sorted(glob.glob(expanded)))
            elif Path(expanded).is_file():
                matched.append(expanded)
            elif Path(expanded).is_dir():
                matched.extend(sorted(str(p) for p in Path(expanded).glob("*.tar")))
            else:
                missing.append(expanded)
        if not matched:
            raise FileNotFoundError(f"no shards match {pattern!r}")
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(f"{len(missing)} of {len(matched) + len(missing)} shards named by {pattern!r} "
                                    f"do not exist: {shown}")
        shards.extend(matched)
    return list(dict.fromkeys(shards))


class SkipCounter:
    """Counts skipped samples in one worker; ``flush`` hands the counts to the next emitted sample.

    Logs the first ``LOGGED`` skips of each reason one by one, then only at 100, 1000, ... of that reason: the
    counts reach the training log anyway, and a bad shard set must not write a line per sample.
    """

    LOGGED = 10

    def __init__(self):
        self.counts: Counter = Counter()
        self.total: Counter = Counter()  # since the start, never flushed: for messages

    def skip(self, reason: str, detail: object = "") -> None:
        self.counts[reason] += 1
        self.total[reason] += 1
        n = self.total[reason]
        level = logging.DEBUG if reason in FILTERED else logging.WARNING
        if n <= self.LOGGED:
            log.log(level, "skipped a sample (%s) %s", reason, detail)
        elif n >= 100 and str(n).strip("0") == "1":
            log.log(level, "skipped %d samples (%s) so far in this worker; latest: %s", n, reason, detail)

    def handler(self, exn: Exception) -> bool:
        """A webdataset handler: a shard or member that cannot be read is counted and passed over."""
        self.skip("unreadable_shard", repr(exn))
        return True

    def flush(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


class PassWatch:
    """Usable samples a stream has yielded in the current pass over its shards (see ``rank_shards``)."""

    def __init__(self, counter: SkipCounter):
        self.counter, self.yielded = counter, 0


def rank_shards(shards: list[str], shuffle: bool, seed: int, repeat: bool = True,
                watch: PassWatch | None = None) -> Iterator[dict]:
    """This rank's and this worker's shards (disjoint across both), reshuffled each pass, forever if ``repeat``.

    With ``watch``: a pass whose shards yielded no usable sample raises, naming the skip counts (the next passes
    would read the same shards and find nothing either).
    """
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    mine = list(wds.split_by_worker(wds.split_by_node(shards)))
    if not mine:
        raise RuntimeError(f"rank {rank} worker {worker} got no shard: {len(shards)} shards for {world} ranks x "
                           f"{workers} workers; write more, smaller shards or lower num_workers")
    epoch = 0
    while True:
        order = list(mine)
        if shuffle:
            random.Random(hash((seed, rank, worker, epoch))).shuffle(order)
        if watch is not None:
            watch.yielded = 0
        yield from ({"url": url} for url in order)
        if watch is not None and watch.yielded == 0:
            raise RuntimeError(
                f"no usable sample in {len(mine)} shard(s) of rank {rank} worker {worker} ({mine[0]}, ...): skipped "
                f"{dict(watch.counter.total) or 'none; the shards hold no sample of this kind'}. Are these shards in "
                f"the schema this data module reads? `align data verify` names each bad sample")
        epoch += 1
        if not repeat:
            return


def decode_stage(decode: Callable[[dict, SkipCounter], dict | None], counter: SkipCounter,
                 watch: PassWatch | None = None):
    """Apply ``decode`` to each raw sample; SkipSample and any decode error are counted, never raised."""

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                out = decode(sample, counter)
            except SkipSample as skip:
                counter.skip(skip.reason, f"{sample.get('__url__', '')}:{sample.get('__key__', '')}")
                continue
            except Exception as exn:  # a corrupt member we did not foresee: still never crash a long run
                counter.skip("decode_error", f"{sample.get('__key__', '')}: {exn!r}")
                continue
            if out is None:
                continue
            out[SKIPPED] = counter.flush()
            if watch is not None:
                watch.yielded += 1
            yield out

    return stage


def take_batches(batches_per_rank: int):
    """Stop after this worker's share of ``batches_per_rank`` (so every rank yields the same number)."""

    def stage(batches: Iterator) -> Iterator:
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        share = batches_per_rank // workers + (1 if worker < batches_per_rank % workers else 0)
        for i, batch in enumerate(batches):
            if i >= share:
                return
            yield batch

    return stage


def merge_skips(samples: list[dict]) -> dict[str, int]:
    total: Counter = Counter()
    for sample in samples:
        total.update(sample.get(SKIPPED, {}))
    return dict(total)


def sample_stream(shards: list[str], decode, counter: SkipCounter, *, shuffle: bool, shuffle_buffer: int,
                  seed: int) -> wds.DataPipeline:
    """Decoded samples from this rank's shards, looping forever (an error after a pass with no usable sample):
    the part every loader shares."""
    watch = PassWatch(counter)  # one per stream: KTO's two class streams share a counter, not a watch
    return wds.DataPipeline(
        lambda: rank_shards(shards, shuffle=shuffle, seed=seed, watch=watch),
        wds.tarfile_to_samples(handler=counter.handler),
        decode_stage(decode, counter, watch),
        # seeded: webdataset otherwise seeds the buffer from the pid and the clock, and no run would repeat
        *([wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 16), seed=seed)]
          if shuffle and shuffle_buffer > 1 else []),
    )


def batch_loader(source, collate, *, batch_size: int, batches_per_rank: int,
                 num_workers: int) -> torch.utils.data.DataLoader:
    """Batch a sample source and stop each rank after exactly ``batches_per_rank`` batches."""
    pipeline = wds.DataPipeline(source, wds.batched(batch_size, collation_fn=collate, partial=False),
                                take_batches(batches_per_rank))
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())
