"""Prompts only (reward fine-tuning samples its own images):
prompt-set files or long-caption shards.

Sources, one or several (``prompts: [a.txt, data/longcaption]``):

* a prompt-set file: ``.txt`` (one per line), ``.jsonl`` (``prompt`` / ``caption`` / ``text``),
  ``.csv`` / ``.tsv``, ``.parquet`` (read by ``align.data.prompt_files.read_prompts``);
* shards (a ``.tar``, a directory of them, a brace pattern or a glob): the ``txt`` member of
  long-caption shards, or the ``caption`` of pair / single-image shards' ``json``. Images are never
  decoded.

A prompt with no segment (``align.rewards.segments.has_segments`` with the official splitter:
nothing with a letter or a digit) is skipped and counted (``train/skipped/no_segments``), never
trained on. Prompt files are read once at start (a missing path fails before training, naming it);
shards are counted from their manifests. Both stream as data epochs (``align.data.epochs``): every
prompt once per pass across ranks and workers, a new order each pass, resumable mid-epoch; an epoch
is one pass unless ``batches_per_epoch`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from align.data.epochs import EpochStream, shard_sizes
from align.data.images import decode_caption, decode_json
from align.data.pipeline import SkipSample, collate, expand_shards
from align.data.prompt_files import read_prompts
from align.data.shard_module import StreamingDataModule
from align.models.splitters import official_split
from align.rewards.segments import has_segments

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _official_has_segments(prompt: str) -> bool:
    return has_segments(prompt, official_split)


def is_prompt_file(source: str | Path) -> bool:
    path = Path(str(source)).expanduser()
    return path.suffix.lower() in PROMPT_FILE_SUFFIXES and path.is_file()


def caption_of(sample: dict) -> str:
    """The prompt of a raw shard sample: its ``txt`` member, else its ``json`` caption;
    SkipSample otherwise."""
    raw = sample.get("txt")
    if raw is None and sample.get("json") is not None:
        meta = decode_json(sample)
        raw = meta.get("caption") if isinstance(meta, dict) else None
    caption = decode_caption(raw)
    if not _official_has_segments(caption):
        raise SkipSample("no_segments")
    return caption


def read_prompt_sources(sources: str | Iterable[str], limit: int | None = None) -> list[str]:
    """Every prompt of ``sources`` (files and shards, see the module doc), in order; prompts without
    segments are dropped. A source that names nothing raises FileNotFoundError naming it."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    out: list[str] = []
    for source in sources:
        if is_prompt_file(source):
            out.extend(p for p in read_prompts(source) if _official_has_segments(p))
        else:
            for url in expand_shards(str(source)):
                for sample in wds.DataPipeline(
                    wds.SimpleShardList([url]), wds.tarfile_to_samples()
                ):
                    try:
                        out.append(caption_of(sample))
                    except SkipSample:
                        continue
                    if limit is not None and len(out) >= limit:
                        return out
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def _decode_prompt(sample: dict, counter, rng) -> dict:
    return {"caption": caption_of(sample), "key": sample.get("__key__", "")}


class PromptDataModule(StreamingDataModule):
    """Batches of prompts for reward fine-tuning.

    Args:
        prompts: a source or a list of sources (prompt-set files and/or shards; see the module doc).
            All files are read at start; shards are streamed. Files and shards may not be mixed in
            one list.
        val_prompts: the same for validation (optional).
        shuffle: shuffle the training prompts (False: in the order read).
        limit: use at most this many prompts of a file source (None: all).
        Others: the loader settings of ``align.data.shard_module.StreamingDataModule``
            (``batch_size`` counts prompts).
    """

    def __init__(
        self,
        prompts: str | list[str],
        val_prompts: str | list[str] | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        val_batches: int | None = 2,
        limit: int | None = None,
        **kwargs,
    ):
        super().__init__(num_workers=num_workers, val_batches=val_batches, **kwargs)
        self.shuffle, self.limit, self.collate = shuffle, limit, collate
        self.train = self._resolve(prompts)
        self.val = self._resolve(val_prompts) if val_prompts else None

    def _resolve(self, sources) -> tuple[list[str], list[int], list[list[dict]] | None]:
        """(shard urls, their sizes, None) or (file names, their sizes, their raw samples: every
        line, checked for segments when decoded)."""
        sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
        files = [is_prompt_file(s) for s in sources]
        if any(files) and not all(files):
            raise ValueError("prompt sources mix files and shards; give one kind")
        if all(files):
            items = [
                [
                    {"__key__": str(i), "__url__": str(s), "txt": p}
                    for i, p in enumerate(read_prompts(s))
                ]
                for s in sources
            ]
            if self.limit is not None:
                items = [part[: self.limit] for part in items]
            if not any(_official_has_segments(x["txt"]) for part in items for x in part):
                raise ValueError(f"no prompt with segments in {', '.join(map(str, sources))}")
            return [str(s) for s in sources], [len(part) for part in items], items
        for s in sources:  # a suffix we read but a file that does not exist: name it now
            if Path(str(s)).suffix.lower() in PROMPT_FILE_SUFFIXES and not any(
                c in str(s) for c in "*?{"
            ):
                raise FileNotFoundError(f"prompt set {s} does not exist")
        urls = [u for s in sources for u in expand_shards(str(s))]
        return urls, shard_sizes(urls), None

    def stream(self, train: bool) -> EpochStream | None:
        spec = self.train if train else self.val
        if not spec:
            return None
        names, sizes, items = spec
        shuffle = train and self.shuffle
        return self.epoch_stream(names, sizes, _decode_prompt, train, shuffle=shuffle, items=items)

    def train_samples(self) -> tuple[int, bool]:
        return sum(self.train[1]), False
