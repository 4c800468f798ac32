"""Data epochs: every sample once per pass over a shard set, across all ranks and workers, in a new
order each pass, and a stream that resumes after the last consumed batch.

The plan of pass ``p`` is computed alike by every process from the shards' sample counts
(``shard_sizes``: the converters' ``manifest.json``, else the tar headers; local or remote shards,
``align.data.remote``): the shards in an order drawn from ``(seed, p)``, their samples laid end to
end and cut into ``world x workers`` contiguous ranges of whole batches, one per *role* (a rank and
one of its worker slots). The remainder, fewer than ``world x workers x batch_size`` samples, sits
out that pass. A role reads its range in a random interleaving of its shards, through a seeded
shuffle buffer; a sample the decoder skips (a tie, a corrupt image) is replaced by repeating the
role's own range (counted as ``repeated_to_fill``), so every rank yields the same number of
batches.

Batches are numbered per rank from the start of the run: batch ``k`` belongs to segment ``k // P``
(a pass; ``P`` batches per rank per pass) and to role ``k % workers``. A loader iteration (a
Lightning epoch, ``L`` batches) starting at batch ``k0`` hands role ``(k0 + w) % workers`` to
DataLoader worker ``w``, which matches the DataLoader's round-robin order from any start: a resume
at any batch continues the exact sequence. Randomness inside the pipeline is seeded per sample from
``(seed, segment, shard, key)``: independent of the rank, the worker count and where a run resumed.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import webdataset as wds
from tqdm import tqdm

from align.data.pipeline import SKIPPED, SkipCounter, SkipSample
from align.data.remote import MANIFEST, describe, is_remote, local_manifest, manifest_location
from align.data.remote import manifest_sizes
from align.data.tars import READ_ERRORS, iter_tar_groups, iter_tar_samples

log = logging.getLogger(__name__)


# ---- how many samples each shard holds -----------------------------------------------------------
# Counting a remote shard without a manifest downloads it; `align plan` turns that off
_count_remote_shards: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "count_remote_shards", default=True
)
REMOTE_COUNT_THREADS = 8


@contextlib.contextmanager
def no_shard_downloads():
    """Within this block ``shard_sizes`` never downloads a remote shard to count it: a remote
    shard that no manifest lists is a ``ValueError`` naming it."""
    token = _count_remote_shards.set(False)
    try:
        yield
    finally:
        _count_remote_shards.reset(token)


def _count_tar_samples(url: str) -> int:
    """Samples in a tar up to where it is damaged
    (a shard that cannot be read at all: 0, logged). A remote one is streamed through once."""
    count = 0
    remote = is_remote(url)
    try:
        for _ in iter_tar_samples(url, lambda field: False) if remote else iter_tar_groups(url):
            count += 1
    except READ_ERRORS as err:
        log.warning(
            "shard %s is damaged after %d samples (%r): the rest of it is left out", url, count, err
        )
    return count


def _local_manifest_size(url: str, manifests: dict) -> int | None:
    """Samples of a local shard from the ``manifest.json`` in its folder (None: not listed)."""
    path = Path(url)
    folder = path.parent
    if folder not in manifests:
        manifests[folder] = (local_manifest(folder) or {}).get("shards", {})
    record = manifests[folder].get(path.name)
    if not (isinstance(record, dict) and "samples" in record):
        return None
    size = os.path.getsize(path)
    if "bytes" in record and int(record["bytes"]) != size:
        raise ValueError(
            f"{url}: {folder / MANIFEST} lists {record['bytes']} bytes and "
            f"{record['samples']} samples, the file has {size} bytes. Rewrite the shard "
            f"(rerun its `align data` command) or remove the stale manifest"
        )
    return int(record["samples"])


def _remote_manifest_size(url: str, manifests: dict) -> int | None:
    """Samples of a remote shard from the manifest where it is (None: not listed)."""
    location = manifest_location(url)
    if location is None:
        return None
    where, name = location
    if where not in manifests:
        manifests[where] = manifest_sizes(where)
    return manifests[where].get(name)


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard: from the ``manifest.json`` beside a shard when it lists it, else counted
    from the tar's headers. A local manifest whose byte count disagrees with the file is an error
    naming both.

    Remote shards (``align.data.remote``) read the manifest where they are (``<base
    URL>/manifest.json``; nothing else is downloaded; the byte check needs the file and is skipped).
    A remote shard that no manifest lists is counted the only way a tar can be, by streaming it
    through once at start (several at a time, with a warning naming the shards and a progress
    bar), so that the epoch plan stays exact; put the ``manifest.json`` that its ``align data``
    command wrote beside the shards to start without that download. Inside ``no_shard_downloads()``
    (``align plan``) such shards are a ``ValueError`` instead."""
    manifests: dict = {}
    sizes = [
        (_remote_manifest_size if is_remote(url) else _local_manifest_size)(url, manifests)
        for url in urls
    ]
    remote_at = [i for i, size in enumerate(sizes) if size is None and is_remote(urls[i])]
    remote = [urls[i] for i in remote_at]
    if remote:
        if not _count_remote_shards.get():
            raise ValueError(
                f"{len(remote)} remote shard(s) ({describe(remote)}) are listed in no {MANIFEST} "
                "where they are, and counting their samples would download them"
            )
        log.warning(
            "%d remote shard(s) (%s) are listed in no %s where they are: counting their samples "
            "by reading each through once now. Put the %s that their `align data` command wrote "
            "beside them to skip this",
            len(remote),
            describe(remote),
            MANIFEST,
            MANIFEST,
        )
    for i, url in enumerate(urls):
        if sizes[i] is None and not is_remote(url):
            sizes[i] = _count_tar_samples(url)
    if remote:
        with ThreadPoolExecutor(min(REMOTE_COUNT_THREADS, len(remote))) as pool:
            counts = pool.map(_count_tar_samples, remote)
            bar = tqdm(counts, total=len(remote), desc="counting remote shards", unit="shard")
            for i, count in zip(remote_at, bar):
                sizes[i] = count
    return sizes


# ---- the plan of one pass ------------------------------------------------------------------------
def batches_per_role(total: int, world: int, workers: int, batch_size: int) -> int:
    return total // (world * workers * batch_size)


def epoch_batches(
    total: int,
    *,
    world: int,
    workers: int,
    batch_size: int,
    multiple_of: int = 1,
    batches_per_epoch: int | None = None,
    mixed: bool = False,
) -> int:
    """Batches per rank per epoch (L) over ``total`` samples: ``batches_per_epoch``, else one pass
    (a mixed stream: as many samples as its sources hold), in whole multiples of ``multiple_of``
    (the accumulation window; for a mixed stream whole rounds of the workers too, since its epochs
    are its segments)."""
    workers = max(1, workers)
    if mixed:
        n = batches_per_epoch or max(1, total // (world * batch_size))
        m = multiple_of * workers // math.gcd(multiple_of, workers)
    else:
        n = batches_per_epoch or batches_per_role(total, world, workers, batch_size) * workers
        m = multiple_of
    return max(m, n // m * m)


def interleave(
    iterators: list[Iterator], weights: list[int], rng: random.Random | None
) -> Iterator:
    """Items of every iterator: one after another without ``rng``, else a uniformly random
    interleaving (each next item from an iterator with probability proportional to what it has
    left)."""
    if rng is None:
        yield from itertools.chain(*iterators)
        return
    left = list(weights)
    while any(left):
        i = rng.choices(range(len(iterators)), weights=left)[0]
        try:
            yield next(iterators[i])
            left[i] -= 1
        except StopIteration:  # a shard shorter than its count (damaged): nothing more from it
            left[i] = 0


# ---- the stream ----------------------------------------------------------------------------------
class EpochStream(torch.utils.data.IterableDataset):
    """Batches of one rank, ``len(self)`` per loader iteration,
    from ``position = (epoch, batch)`` on.

    ``segment_samples(segment, rank, role)`` yields the raw samples of a role in a segment (a pass
    of the plan by default; KTO and weighted sources mix their own).
    ``decode(sample, counter, rng)`` turns a raw sample into tensors or raises ``SkipSample``;
    ``collate`` stacks a batch. ``items``: raw samples held in memory (a prompt file), one list per
    ``urls`` entry, read instead of tars.
    """

    def __init__(
        self,
        urls: list[str],
        sizes: list[int],
        decode: Callable,
        collate: Callable,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        shuffle_buffer: int,
        batches_per_epoch: int | None = None,
        multiple_of: int = 1,
        segment_samples: Callable | None = None,
        items: list[list[dict]] | None = None,
    ):
        super().__init__()
        self.urls, self.sizes, self.decode, self.collate = urls, sizes, decode, collate
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.custom_segment = segment_samples
        self.rank, self.world, _, _ = wds.utils.pytorch_worker_info()  # of the process that plans
        self.workers = 1  # set by EpochLoader from its num_workers
        self._batches_per_epoch, self.multiple_of = batches_per_epoch, multiple_of
        self.position = (0, 0)
        self.items = items

    # what the loader and Lightning see
    def set_workers(self, workers: int) -> None:
        self.workers = max(1, workers)
        for source in getattr(self.custom_segment, "sources", ()):
            source.set_workers(workers)

    @property
    def per_role(self) -> int:
        """Batches a role yields per segment: its part of a pass, or of a mixed stream's epoch."""
        if self.custom_segment is not None:
            return len(self) // self.workers
        return batches_per_role(sum(self.sizes), self.world, self.workers, self.batch_size)

    @property
    def segment_batches(self) -> int:
        """Batches per rank per segment (P): a whole pass of the plan, or the mixing segment."""
        return self.per_role * self.workers

    def __len__(self) -> int:
        """Batches per rank per loader iteration (L): see ``epoch_batches``."""
        return epoch_batches(
            sum(self.sizes),
            world=self.world,
            workers=self.workers,
            batch_size=self.batch_size,
            multiple_of=self.multiple_of,
            batches_per_epoch=self._batches_per_epoch,
            mixed=self.custom_segment is not None,
        )

    # reading
    def _role_ranges(self, segment, rank: int, role: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample, end) ranges that role ``role`` of rank ``rank`` reads in
        this pass."""
        sizes, per_role = self.sizes, self.per_role * self.batch_size
        order = list(range(len(sizes)))
        if self.shuffle:
            random.Random(f"{self.seed}/{segment}/shards").shuffle(order)
        start = (rank * self.workers + role) * per_role
        end, ranges, offset = start + per_role, [], 0
        for shard in order:
            lo, hi = max(start, offset), min(end, offset + sizes[shard])
            if lo < hi:
                ranges.append((shard, lo - offset, hi - offset))
            offset += sizes[shard]
            if offset >= end:
                break
        return ranges

    def _role_samples(self, segment, rank: int, role: int, counter) -> Iterator[dict]:
        """Raw samples of a role's range in one pass
        (``segment``: the pass's name in every seed)."""
        ranges = self._role_ranges(segment, rank, role)
        readers = [self.read(s, lo, hi, counter) for s, lo, hi in ranges]
        rng = random.Random(f"{self.seed}/{segment}/{rank}/{role}/order") if self.shuffle else None
        samples = interleave(readers, [hi - lo for _, lo, hi in ranges], rng)
        if self.shuffle and self.shuffle_buffer > 1:
            buffer_rng = random.Random(f"{self.seed}/{segment}/{rank}/{role}/buffer")
            samples = wds.filters._shuffle(
                samples, self.shuffle_buffer, min(self.shuffle_buffer, 16), buffer_rng
            )
        return samples

    def read(self, shard: int, lo: int, hi: int, counter) -> Iterator[dict]:
        """Raw samples ``lo:hi`` of shard ``shard``: a tar, or a list of ``items``."""
        if self.items is not None:
            return iter(self.items[shard][lo:hi])
        tar = wds.tarfile_to_samples(handler=counter.handler)([{"url": self.urls[shard]}])
        return itertools.islice(tar, lo, hi)

    def _pass(self, segment, rank: int, role: int, counter) -> Iterator[dict]:
        """Decoded samples of a role's range in one pass; SkipSample and decode errors counted,
        not raised."""
        for sample in self._role_samples(segment, rank, role, counter):
            where = f"{sample.get('__url__', '')}:{sample.get('__key__', '')}"
            try:
                out = self.decode(sample, counter, random.Random(f"{self.seed}/{segment}/{where}"))
            except SkipSample as skip:
                counter.skip(skip.reason, where)
                continue
            except Exception as exn:  # a corrupt member we did not foresee: never crash a long run
                counter.skip("decode_error", f"{where}: {exn!r}")
                continue
            if out is not None:
                out[SKIPPED] = counter.flush()
                yield out

    def _empty(self, rank: int, role: int, counter) -> RuntimeError:
        return RuntimeError(
            f"no usable sample in rank {rank} role {role}'s part of {len(self.urls)} shard(s) "
            f"({self.urls[0]}, ...): skipped "
            f"{dict(counter.total) or 'none; the shards hold no sample of this kind'}. Are these "
            "shards in the schema this data module reads? `align data verify` names "
            "each bad sample"
        )

    def forever(self, tag: str, rank: int, role: int, counter) -> Iterator[dict]:
        """Decoded samples of a role, pass after pass (each reshuffled):
        a source of a mixed stream."""
        for n in itertools.count():
            yielded = 0
            for out in self._pass(f"{tag}/{n}", rank, role, counter):
                yielded += 1
                yield out
            if not yielded:
                raise self._empty(rank, role, counter)

    def _segment_stream(self, segment: int, rank: int, role: int, counter) -> Iterator:
        """Exactly ``per_role`` batches of one role in one segment
        (repeating its range after skips)."""
        if self.custom_segment is not None:
            samples = self.custom_segment(segment, rank, role, counter)
            while True:
                yield self.collate([next(samples) for _ in range(self.batch_size)])
        need, taken = self.per_role, []
        for attempt in itertools.count():
            yielded = 0
            for out in self._pass(segment, rank, role, counter):
                yielded += 1
                # counted with the skips: the module logs train/skipped/repeated_to_fill
                if attempt:
                    out["__skipped__"]["repeated_to_fill"] = 1
                taken.append(out)
                if len(taken) == self.batch_size:
                    yield self.collate(taken)
                    taken, need = [], need - 1
                    if need == 0:
                        return
            if not yielded:
                raise self._empty(rank, role, counter)

    def __iter__(self) -> Iterator:
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        if workers != self.workers:
            raise RuntimeError(
                f"the stream was planned for {self.workers} workers, runs in {workers}"
            )
        epoch, start = self.position
        length = len(self)
        first = epoch * length + start + worker  # this worker's first batch (rank-local numbering)
        end = (epoch + 1) * length
        if first >= end:
            return
        role, count = first % self.workers, len(range(first, end, self.workers))
        counter = SkipCounter()
        segment, index = divmod(first, self.segment_batches)
        skip = index // self.workers  # batches of this role already consumed in that segment
        while count > 0:
            stream = self._segment_stream(segment, self.rank, role, counter)
            for batch in itertools.islice(stream, skip, skip + count):
                yield batch
                count -= 1
            segment, skip = segment + 1, 0


class MixedSegments:
    """A mixed stream's segments (``EpochStream(segment_samples=...)``): each sample comes from
    source ``i`` with probability ``weights[i] / sum(weights)``; every source streams each of its
    samples once per pass of its own plan (sources are ``EpochStream`` s with batch size 1), and
    every segment starts them afresh."""

    def __init__(self, sources: list[EpochStream], weights: list[float], seed: int):
        self.sources, self.weights, self.seed = sources, weights, seed

    def __call__(self, segment: int, rank: int, role: int, counter) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}/{segment}/{rank}/{role}/mix")
        streams = [
            source.forever(f"{segment}", rank, role, SkipCounter()) for source in self.sources
        ]
        while True:
            yield next(streams[rng.choices(range(len(streams)), weights=self.weights)[0]])


class EpochLoader(torch.utils.data.DataLoader):
    """A DataLoader over an ``EpochStream`` that knows where it is: each iteration is the next
    epoch, and Lightning saves ``state_dict()`` in checkpoints and hands it back on resume
    (a stateful loader).

    ``consumed``: a callable giving the batches the training loop has processed in the current epoch
    (Lightning's progress; it fetches ahead, so what was yielded is not what was trained on).
    """

    def __init__(
        self,
        stream: EpochStream,
        num_workers: int,
        consumed: Callable[[], int | None] | None = None,
        advance: bool = True,
    ):
        stream.set_workers(num_workers)
        if stream.per_role < 1:
            raise ValueError(
                f"{sum(stream.sizes)} samples in {len(stream.urls)} shard(s) ({stream.urls[0]}, "
                f"...) cannot give one batch of {stream.batch_size} to each of {stream.world} "
                f"rank(s) x {stream.workers} worker(s): add data, or lower "
                "batch_size or num_workers"
            )
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            # workers restart each epoch with its position
            pin_memory=torch.cuda.is_available(),
        )
        self.stream, self.consumed, self.advance = stream, consumed, advance
        self.epoch, self.start, self._current = 0, 0, (0, 0)

    def __iter__(self):
        self._current = (self.epoch, self.start)
        self.stream.position = self._current
        if self.advance:  # validation reads the same batches every time
            self.epoch, self.start = self.epoch + 1, 0
        return super().__iter__()

    def state_dict(self) -> dict:
        done = self.consumed() if self.consumed is not None else None
        return {
            "epoch": self._current[0],
            "batch": self._current[1] if done is None else done,
            "batches_per_epoch": len(self.stream),
        }

    def load_state_dict(self, state: dict) -> None:
        length = len(self.stream)
        if state.get("batches_per_epoch", length) != length:
            raise ValueError(
                f"the checkpoint's data stream had {state['batches_per_epoch']} batches per epoch, "
                f"this run has {length} (other shards, batch size, world size or workers): "
                "resume with the same data settings"
            )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        self.epoch, self.start = (epoch + 1, 0) if batch >= length else (epoch, batch)
