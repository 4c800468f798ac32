"""Prompts only (reward fine-tuning samples its own images): prompt-set files or long-caption shards.

Sources, one or several (``prompts: [a.txt, data/longcaption]``):

* a prompt-set file: ``.txt`` (one per line), ``.jsonl`` (``prompt`` / ``caption`` / ``text``), ``.csv`` /
  ``.tsv``, ``.parquet`` (read by ``align.eval.prompts.read_prompts``);
* shards (a ``.tar``, a directory of them, a brace pattern or a glob): the ``txt`` member of long-caption
  shards, or the ``caption`` of pair / single-image shards' ``json``. Images are never decoded.

A prompt with no segment (``align.rewards.segments.has_segments`` with the official splitter: nothing with a
letter or a digit) is skipped and counted (``train/skipped/no_segments``), never trained on. Files are read once
at start (a missing path fails before training, naming it); under DDP each rank takes every world-th prompt
(each dataloader worker every workers-th of those) and loops over its share, reshuffled each pass, so every rank
yields exactly ``batches_per_epoch`` batches. Shards stream through the shared webdataset pipeline
(``align.data.pipeline``: split by node and worker, bad samples skipped and counted).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import webdataset as wds

from align.data.images import decode_caption, decode_json
from align.data.pipeline import SKIPPED, SkipCounter, SkipSample, batch_loader, expand_shards, merge_skips, sample_stream

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _official_has_segments(prompt: str) -> bool:
    from align.models.splitters import official_split
    from align.rewards.segments import has_segments

    return has_segments(prompt, official_split)


def is_prompt_file(source: str | Path) -> bool:
    path = Path(str(source)).expanduser()
    return path.suffix.lower() in PROMPT_FILE_SUFFIXES and path.is_file()


def caption_of(sample: dict) -> str:
    """The prompt of a raw shard sample: its ``txt`` member, else its ``json`` caption; SkipSample otherwise."""
    raw = sample.get("txt")
    if raw is None and sample.get("json") is not None:
        meta = decode_json(sample)
        raw = meta.get("caption") if isinstance(meta, dict) else None
    caption = decode_caption(raw)
    if not _official_has_segments(caption):
        raise SkipSample("no_segments")
    return caption


def read_prompts(sources: str | Iterable[str], limit: int | None = None) -> list[str]:
    """Every prompt of ``sources`` (files and shards, see the module doc), in order; prompts without segments
    are dropped. A source that names nothing raises FileNotFoundError naming it."""
    from align.eval.prompts import read_prompts as read_prompt_file

    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    out: list[str] = []
    for source in sources:
        if is_prompt_file(source):
            out.extend(p for p in read_prompt_file(source) if _official_has_segments(p))
        else:
            for url in expand_shards(str(source)):
                for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
                    try:
                        out.append(caption_of(sample))
                    except SkipSample:
                        continue
                    if limit is not None and len(out) >= limit:
                        return out
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


class _PromptSource:
    """This rank's and worker's share of a prompt list, reshuffled each pass, forever."""

    def __init__(self, prompts: list[str], shuffle: bool, seed: int, skipped: dict[str, int]):
        self.prompts, self.shuffle, self.seed, self.skipped = prompts, shuffle, seed, skipped

    def __call__(self):
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        mine = self.prompts[rank::world][worker::workers]
        if not mine:
            raise RuntimeError(f"rank {rank} worker {worker} got no prompt: {len(self.prompts)} prompts for "
                               f"{world} ranks x {workers} workers")
        pending = dict(self.skipped) if rank == 0 and worker == 0 else {}  # reported once, by one worker
        epoch = 0
        while True:
            order = list(range(len(mine)))
            if self.shuffle:
                random.Random(hash((self.seed, rank, worker, epoch))).shuffle(order)
            for i in order:
                yield {"caption": mine[i], "key": f"{rank}-{worker}-{i}", SKIPPED: pending}
                pending = {}
            epoch += 1


def collate_prompts(samples: list[dict]) -> dict:
    return {"caption": [s["caption"] for s in samples], "key": [s.get("key", "") for s in samples],
            "skipped": merge_skips(samples)}


def _decode_prompt(sample: dict, counter: SkipCounter) -> dict:
    return {"caption": caption_of(sample), "key": sample.get("__key__", "")}


class PromptDataModule(L.LightningDataModule):
    """Batches of prompts for reward fine-tuning.

    Args:
        prompts: a source or a list of sources (prompt-set files and/or shards; see the module doc).
            All files are read at start; shards are streamed. Files and shards may not be mixed in one list.
        val_prompts: the same for validation (optional).
        batch_size: prompts per micro-batch per GPU.
        limit: use at most this many prompts of a file source (None: all).
        batches_per_epoch / val_batches: batches each rank yields per epoch (equal on every rank).
    """

    def __init__(self, prompts: str | list[str], val_prompts: str | list[str] | None = None, batch_size: int = 4,
                 num_workers: int = 0, shuffle: bool = True, shuffle_buffer: int = 256, batches_per_epoch: int = 1000,
                 val_batches: int = 2, limit: int | None = None, seed: int = 0,
                 global_batch_size: int | None = None):
        super().__init__()
        self.global_batch_size = global_batch_size  # accumulation follows (align.data.batching)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.batches_per_epoch, self.val_batches, self.limit = batches_per_epoch, val_batches, limit
        self.train = self._resolve(prompts)
        self.val = self._resolve(val_prompts) if val_prompts else None

    def _resolve(self, sources) -> tuple[str, object, dict]:
        """("files", prompts, skipped) or ("shards", urls, {})."""
        sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
        files = [is_prompt_file(s) for s in sources]
        if any(files) and not all(files):
            raise ValueError("prompt sources mix files and shards; give one kind")
        if all(files):
            from align.eval.prompts import read_prompts as read_prompt_file

            raw = [p for s in sources for p in read_prompt_file(s)]
            prompts = [p for p in raw if _official_has_segments(p)]
            if self.limit is not None:
                prompts = prompts[: self.limit]
            if not prompts:
                raise ValueError(f"no prompt with segments in {', '.join(map(str, sources))}")
            dropped = len(raw) - len([p for p in raw if _official_has_segments(p)])
            return "files", prompts, ({"no_segments": dropped} if dropped else {})
        for s in sources:  # a suffix we read but a file that does not exist: name it now
            if Path(str(s)).suffix.lower() in PROMPT_FILE_SUFFIXES and not any(c in str(s) for c in "*?{"):
                raise FileNotFoundError(f"prompt set {s} does not exist")
        return "shards", [u for s in sources for u in expand_shards(str(s))], {}

    def _loader(self, spec, batches: int, shuffle: bool, workers: int):
        kind, data, skipped = spec
        if kind == "files":
            source = _PromptSource(data, shuffle, self.seed, skipped)
        else:
            source = sample_stream(data, _decode_prompt, SkipCounter(), shuffle=shuffle,
                                   shuffle_buffer=self.shuffle_buffer if shuffle else 0, seed=self.seed)
        return batch_loader(source, collate_prompts, batch_size=self.batch_size, batches_per_rank=batches,
                            num_workers=workers)

    def train_dataloader(self):
        return self._loader(self.train, self.batches_per_epoch, self.shuffle, self.num_workers)

    def val_dataloader(self):
        if not self.val:
            return []
        return self._loader(self.val, self.val_batches, False, min(self.num_workers, 1))
