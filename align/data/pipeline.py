"""Webdataset plumbing shared by every data module: shard discovery and skip-and-count handling of
bad samples. The data modules stream through ``align.data.epochs`` (every sample once per pass).

Every decoded sample carries the count of samples skipped (by reason) since the previous one
(``SKIPPED``), so the module can log ``train/skipped/<reason>``.
"""

from __future__ import annotations

import glob
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import braceexpand

from align.data.remote import expand_remote, is_remote

log = logging.getLogger(__name__)

SKIPPED = "__skipped__"
# skipped by choice, not because the data is bad: logged at debug level
FILTERED = frozenset({"tie"})


class SkipSample(Exception):
    """Raised by a decode function for a sample that cannot be used;
    ``reason`` names a skip counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def expand_shards(patterns: str | Iterable[str]) -> list[str]:
    """Every shard named by brace patterns (``a-{000..009}.tar``), globs, folders or plain paths,
    or by URLs, ``pipe:`` commands and hub repositories (``align.data.remote``), in a stable order.

    A pattern that matches no file, or a brace pattern naming files of which some do not exist, is
    an error naming them (``FileNotFoundError``), as is a remote shard that cannot be read: found
    at start, not mid-run.
    """
    if isinstance(patterns, (str, Path)):
        patterns = [str(patterns)]
    shards: list[str] = []
    for pattern in patterns:
        if is_remote(str(pattern)):
            shards.extend(expand_remote(str(pattern)))
            continue
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
            raise FileNotFoundError(
                f"{len(missing)} of {len(matched) + len(missing)} shards named by {pattern!r} "
                f"do not exist: {shown}"
            )
        shards.extend(matched)
    return list(dict.fromkeys(shards))


class SkipCounter:
    """Counts skipped samples in one worker; ``flush`` hands the counts to the next emitted sample.

    Logs the first ``LOGGED`` skips of each reason one by one, then only at 100, 1000, ... of that
    reason: the counts reach the training log anyway,
    and a bad shard set must not write a line per sample.
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
            log.log(
                level,
                "skipped %d samples (%s) so far in this worker; latest: %s",
                n,
                reason,
                detail,
            )

    def handler(self, exn: Exception) -> bool:
        """A webdataset handler: a shard or member that cannot be read is counted and passed
        over."""
        self.skip("unreadable_shard", repr(exn))
        return True

    def flush(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


def merge_skips(samples: list[dict]) -> dict[str, int]:
    total: Counter = Counter()
    for sample in samples:
        total.update(sample.get(SKIPPED, {}))
    return dict(total)


def collate(samples: list[dict], split: tuple[str, ...] = (), extras: dict | None = None) -> dict:
    """A batch of decoded samples: tensors stacked, those named in ``split`` (a pair's two rows,
    ``(B, 2, ...)``) as ``2B`` rows, every first row then every second (winners then losers);
    bools and floats as tensors; anything else as lists. ``extras`` ride along, and ``skipped``
    holds the samples' merged skip counts."""
    import torch  # here: the shard checks import this module without torch

    batch = {}
    for key in samples[0]:
        if key == SKIPPED:
            continue
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            stacked = torch.stack(values)
            batch[key] = torch.cat([stacked[:, 0], stacked[:, 1]]) if key in split else stacked
        elif isinstance(values[0], (bool, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return {**batch, **(extras or {}), "skipped": merge_skips(samples)}
