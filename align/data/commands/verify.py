"""Check shards: read every sample, decode every image, validate the schema; exit 1 on any problem.

Usage: align data verify <shard paths, globs, brace patterns or folders...>
       [--schema auto|pair|single|long|cached] [--workers N] [--report report.json] [--examples 20]

The schema (``align.data.schema``) is detected per shard from its first sample unless ``--schema`` is given.
When the shard's folder has a ``manifest.json`` listing it (written by the converters), its sha256 and sample
count are checked too. Exit status: 0 all good, 1 problems found, 2 no shards / bad arguments.

Latent caches (``align data cache-latents``, schema in ``align.data.cached``) are ``cached`` shards: detected
from their ``.npy`` members, or from a ``manifest.json`` written by ``cache-latents`` in their folder. Their
pair, single-image or long-caption layout is the manifest's (else the first sample's). Every sample must have
the layout's members (the moments of each image, the flipped ones when the cache has ``--flip``, ``embeds.npy``,
``pooled.npy`` when the cache has ``uncond_pooled.npy``, ``txt`` for long captions) and no other tensors;
every tensor must load (``allow_pickle=False``), be of the stored dtype and hold only finite values; moments
are ``(2C, h, h)`` with ``h`` dividing the cache's resolution, and each tensor's shape is the same across the
shard and agrees with ``uncond.npy`` (``embeds.npy``: ``(L, D)`` of its ``(1, L, D)``). The ``json`` is the
source's (checked as the source schema's) plus a ``cache`` object whose settings must be the manifest's (else
the first sample's) and whose ``original_size`` / ``crop_top_left`` have one ``[a, b]`` per image. A cache
folder without ``uncond.npy`` (an unfinished run, which training refuses) is a problem too.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from align.data.schema import (LONG_CAPTION_KEYS, PAIR_IMAGE_KEYS, SINGLE_IMAGE_KEY, pair_meta_problem,
                               single_meta_problem)
from align.data.tars import expand_shard_paths, iter_tar_samples, sha256_file
from align.data.writer import MANIFEST

SCHEMAS = ("pair", "single", "long")
CACHED = "cached"  # shards of a latent cache (align.data.cached)
# the per-sample ``cache`` settings that must agree with the manifest's ``source.cache`` (cache-latents writes both)
CACHE_SETTINGS = ("model", "model_fingerprint", "resolution", "flip", "dtype", "store_dtype", "prompt_encoder")


def detect_schema(fields: set[str]) -> str | None:
    if all(k in fields for k in PAIR_IMAGE_KEYS):
        return "pair"
    if "txt" in fields:
        return "long"
    if SINGLE_IMAGE_KEY in fields and "json" in fields:
        return "single"
    return None


def _decode(data: bytes | None) -> str | None:
    from PIL import Image

    if not data:
        return "empty image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exn:  # any decoder failure is the finding we report
        return f"{type(exn).__name__}: {exn}"
    return None


def _json(data: bytes | None) -> tuple[object, str | None]:
    try:
        return json.loads(data), None
    except (TypeError, ValueError) as exn:
        return None, f"{type(exn).__name__}: {exn}"


def sample_problems(schema: str, sample: dict[str, bytes]) -> list[tuple[str, str]]:
    """(reason, detail) for everything wrong with one sample under ``schema``."""
    problems = []
    if schema == "pair":
        images, required = PAIR_IMAGE_KEYS, (*PAIR_IMAGE_KEYS, "json")
    elif schema == "single":
        images, required = (SINGLE_IMAGE_KEY,), (SINGLE_IMAGE_KEY, "json")
    else:
        images, required = ("jpg",), LONG_CAPTION_KEYS
    for key in required:
        if key not in sample:
            problems.append((f"missing_{key}", "member absent"))
    for key in images:
        if key in sample:
            error = _decode(sample[key])
            if error:
                problems.append(("corrupt_image", f"{key}: {error}"))
    if "json" in sample:
        meta, error = _json(sample["json"])
        if error:
            problems.append(("bad_json", error))
        elif schema in ("pair", "single"):
            problem = (pair_meta_problem if schema == "pair" else single_meta_problem)(meta)
            if problem:
                problems.append((problem, json.dumps(meta)[:200]))
        elif not isinstance(meta, dict):
            problems.append(("json_not_object", str(meta)[:200]))
    if schema == "long" and "txt" in sample:
        try:
            if not sample["txt"].decode("utf-8").strip():
                problems.append(("empty_caption", ""))
        except UnicodeDecodeError as exn:
            problems.append(("caption_not_utf8", str(exn)))
    return problems


def _manifest(path: Path) -> dict | None:
    """The ``manifest.json`` beside ``path`` (None when absent or unreadable)."""
    manifest = path.parent / MANIFEST
    if not manifest.exists():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _manifest_record(manifest: dict | None, path: Path) -> dict | None:
    shards = (manifest or {}).get("shards")
    record = shards.get(path.name) if isinstance(shards, dict) else None
    return record if isinstance(record, dict) else None


# ------------------------------------------------------------------------------------------ cached shards
# align.data.cached imports torch: it is imported only once a shard looks cached, so that verifying image
# shards stays as light as it was.

def cache_settings(manifest: dict | None) -> dict | None:
    """The settings a ``cache-latents`` manifest recorded (its ``source.cache``); None for any other manifest."""
    source = (manifest or {}).get("source")
    cache = source.get("cache") if isinstance(source, dict) else None
    if not isinstance(cache, dict):
        return None
    from align.data.cached import COMMAND

    return cache if manifest.get("command") == COMMAND else None


def detect_cached(fields: set[str]) -> bool:
    """Whether a sample with these fields is a latent-cache sample (it has the cache's tensors)."""
    if not any(field.endswith(".npy") for field in fields):
        return False
    from align.data.cached import EMBEDS, PAIR_MOMENTS, SINGLE_MOMENTS

    return bool(fields & {EMBEDS, SINGLE_MOMENTS, *PAIR_MOMENTS})


def _load_npy(data: bytes | None) -> np.ndarray:
    if not data:
        raise ValueError("empty member")
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def _pairs_of_ints(value: object, count: int) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, list) and len(v) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v) for v in value))


class CachedShardCheck:
    """The checks of one cached shard's samples, against what its folder records (the manifest's cache settings,
    ``uncond.npy``) or, where it records nothing, against the shard's first sample.

    Args:
        path: the shard.
        manifest: the ``manifest.json`` beside it, or None.
        fields: the fields of its first sample (the layout, when no cache manifest names it).
    """

    def __init__(self, path: Path, manifest: dict | None, fields: set[str]):
        from align.data import cached

        self.cached = cached  # the module: the cache schema's member names
        settings = cache_settings(manifest)
        self.settings = dict(settings) if settings is not None else None
        self.settings_from = MANIFEST if settings is not None else None
        schema = (settings or {}).get("schema")
        if schema not in cached.SCHEMAS:
            schema = ("pair" if fields & set(cached.PAIR_MOMENTS) else "long" if "txt" in fields else "single")
        self.schema = schema
        pair = schema == "pair"
        self.moments = cached.PAIR_MOMENTS if pair else (cached.SINGLE_MOMENTS,)
        self.flip_moments = cached.PAIR_MOMENTS_FLIP if pair else (cached.SINGLE_MOMENTS_FLIP,)
        self.first_flip = any(name in fields for name in self.flip_moments)
        self.pooled = cached.POOLED in fields  # unless uncond_pooled.npy says otherwise, below
        self.shapes: dict[str, tuple[tuple, str]] = {}  # moments / embeds.npy / pooled.npy -> (shape, whose)
        self.folder_problems: list[tuple[str, str]] = []
        uncond = path.parent / cached.UNCOND
        if uncond.is_file():
            pooled = path.parent / cached.UNCOND_POOLED
            self.pooled = pooled.is_file()
            for file, member, ndim in ((uncond, cached.EMBEDS, 3), (pooled, cached.POOLED, 2)):
                if file.is_file():
                    self._seed_shape(file, member, ndim)
        elif settings is not None:
            self.folder_problems.append(("missing_uncond", f"no {cached.UNCOND} beside the shard: the cache run did "
                                         "not finish (training refuses it; rerun the same command to resume)"))

    def _seed_shape(self, file: Path, member: str, ndim: int) -> None:
        try:
            array = _load_npy(file.read_bytes())
        except Exception as exn:  # any load failure is the finding
            self.folder_problems.append(("bad_uncond", f"{file.name}: {type(exn).__name__}: {exn}"))
            return
        if array.ndim != ndim or array.shape[0] != 1:
            self.folder_problems.append(("bad_uncond", f"{file.name}: shape {array.shape}, expected (1, ...) "
                                         f"with {ndim} axes"))
            return
        if array.dtype.kind in "fc" and not bool(np.isfinite(array).all()):
            self.folder_problems.append(("bad_uncond", f"{file.name}: holds NaN or infinite values"))
        self.shapes[member] = (tuple(array.shape[1:]), f"{file.name} {tuple(array.shape)} implies")

    @property
    def flip(self) -> bool:
        flip = (self.settings or {}).get("flip")
        return flip if isinstance(flip, bool) else self.first_flip

    def members(self) -> tuple[str, ...]:
        """The tensors every sample of this cache has."""
        names = [*self.moments, *(self.flip_moments if self.flip else ()), self.cached.EMBEDS]
        return (*names, self.cached.POOLED) if self.pooled else tuple(names)

    def problems(self, key: str, sample: dict[str, bytes]) -> list[tuple[str, str]]:
        """(reason, detail) for everything wrong with one cached sample."""
        problems = []
        if "json" not in sample:
            problems.append(("missing_json", "member absent"))
        else:
            meta, error = _json(sample["json"])
            problems += [("bad_json", error)] if error else self._meta_problems(meta)
        if self.schema == "long":
            if "txt" not in sample:
                problems.append(("missing_txt", "member absent"))
            else:
                try:
                    if not (sample["txt"] or b"").decode("utf-8").strip():
                        problems.append(("empty_caption", ""))
                except UnicodeDecodeError as exn:
                    problems.append(("caption_not_utf8", str(exn)))
        members = self.members()
        for name in members:
            if name not in sample:
                problems.append((f"missing_{name}", "member absent"))
            else:
                problems += self._array_problems(key, name, sample[name])
        for name in sorted(sample):
            if name.endswith(".npy") and name not in members:
                problems.append(("unexpected_member", f"{name} (this cache: flip={self.flip}, "
                                                      f"pooled={self.pooled}, {self.schema} layout)"))
        return problems

    def _meta_problems(self, meta: object) -> list[tuple[str, str]]:
        if not isinstance(meta, dict):
            return [("json_not_object", str(meta)[:200])]
        cache = meta.get("cache")
        if not isinstance(cache, dict):
            return [("not_cached", "json has no cache object")]
        problems = []
        if self.schema in ("pair", "single"):
            problem = (pair_meta_problem if self.schema == "pair" else single_meta_problem)(meta)
            if problem:
                problems.append((problem, json.dumps({k: v for k, v in meta.items() if k != "cache"})[:200]))
        recorded = {k: cache.get(k) for k in CACHE_SETTINGS}
        if self.settings is None:
            self.settings, self.settings_from = recorded, "the shard's first sample"
        differ = [f"{k}: {recorded[k]!r} here, {self.settings.get(k)!r} in {self.settings_from}"
                  for k in CACHE_SETTINGS if recorded[k] != self.settings.get(k)]
        if differ:
            problems.append(("cache_settings_mismatch", "; ".join(differ)))
        for name in ("original_size", "crop_top_left"):
            if not _pairs_of_ints(cache.get(name), len(self.moments)):
                problems.append(("bad_cache_sizes", f"{name}: {json.dumps(cache.get(name))[:100]}, expected "
                                                    f"{len(self.moments)} [a, b] of non-negative ints"))
        return problems

    def _array_problems(self, key: str, name: str, data: bytes | None) -> list[tuple[str, str]]:
        try:
            array = _load_npy(data)
        except Exception as exn:  # any load failure is the finding we report
            return [("bad_npy", f"{name}: {type(exn).__name__}: {exn}")]
        problems = []
        store = (self.settings or {}).get("store_dtype")
        want = self.cached.STORE_DTYPES.get(store) if isinstance(store, str) else None
        if want is not None and array.dtype != want:
            problems.append(("wrong_dtype", f"{name}: {array.dtype}, the cache stores {store}"))
        elif array.dtype.kind != "f":
            problems.append(("wrong_dtype", f"{name}: {array.dtype}, not floating point"))
        if array.dtype.kind in "fc":
            bad = int(array.size - np.isfinite(array).sum())
            if bad:
                problems.append(("non_finite", f"{name}: {bad} of {array.size} values are NaN or infinite"))
        group = "moments" if name in (*self.moments, *self.flip_moments) else name
        shape = tuple(array.shape)
        resolution = (self.settings or {}).get("resolution")
        if group == "moments":
            ok = (len(shape) == 3 and shape[0] % 2 == 0 and shape[0] > 0 and shape[1] == shape[2] and shape[1] > 0
                  and (not isinstance(resolution, int) or resolution % shape[1] == 0))
            expected = f"(2C, h, h) with h dividing the resolution {resolution}"
        else:
            ok = len(shape) == (2 if group == self.cached.EMBEDS else 1) and all(shape)
            expected = "(tokens, dim)" if group == self.cached.EMBEDS else "(dim,)"
        if not ok:
            problems.append(("bad_shape", f"{name}: {shape}, expected {expected}"))
        elif group in self.shapes:
            reference, whose = self.shapes[group]
            if shape != reference:
                problems.append(("shape_mismatch", f"{name}: {shape}; {whose} {reference}"))
        else:
            self.shapes[group] = (shape, f"sample {key} has")
        return problems


def verify_shard(path: str, schema: str = "auto", examples: int = 20) -> dict:
    """Report for one shard: samples, schema, problems by reason, a few examples (key, reason, detail)."""
    problems: Counter = Counter()
    found: list[tuple[str, str, str]] = []
    report = {"shard": path, "samples": 0, "bad_samples": 0, "schema": None if schema == "auto" else schema}

    def note(key: str, reason: str, detail: str) -> None:
        problems[reason] += 1
        if len(found) < examples:
            found.append((key, reason, detail))

    seen: set[str] = set()
    manifest = _manifest(Path(path))
    cached: CachedShardCheck | None = None
    try:
        for key, sample in iter_tar_samples(path):
            report["samples"] += 1
            if report["schema"] is None:
                fields = set(sample)
                cache = cache_settings(manifest) is not None or detect_cached(fields)
                report["schema"] = CACHED if cache else detect_schema(fields)
                if report["schema"] is None:
                    note(key, "unknown_schema", f"fields {sorted(sample)}")
                    report["schema"] = "unknown"
            if report["schema"] == CACHED and cached is None:
                cached = CachedShardCheck(Path(path), manifest, set(sample))
                report["cache_schema"] = cached.schema
                for reason, detail in cached.folder_problems:
                    note("-", reason, detail)
            issues = [("duplicate_key", "key seen earlier in the shard")] if key in seen else []
            seen.add(key)
            if report["schema"] in SCHEMAS:
                issues += sample_problems(report["schema"], sample)
            elif cached is not None:
                issues += cached.problems(key, sample)
            for reason, detail in issues:
                note(key, reason, detail)
            report["bad_samples"] += bool(issues)
    except (tarfile.TarError, OSError, EOFError) as exn:
        note("-", "corrupt_tar", f"after {report['samples']} samples: {type(exn).__name__}: {exn}")
    record = _manifest_record(manifest, Path(path))
    if record is not None:
        if sha256_file(path) != record.get("sha256"):
            note("-", "checksum_mismatch", f"sha256 differs from {MANIFEST}")
        if record.get("samples") != report["samples"]:
            note("-", "sample_count_mismatch", f"{report['samples']} samples, {MANIFEST} says {record.get('samples')}")
    report["problems"] = dict(problems)
    report["examples"] = found
    report["empty"] = report["samples"] == 0
    return report


def _verify_args(args: tuple) -> dict:
    return verify_shard(*args)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="align data verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", help="shard paths, globs, brace patterns or folders")
    parser.add_argument("--schema", choices=("auto", *SCHEMAS, CACHED), default="auto",
                        help="auto (per shard), or check every shard as this schema (cached: a latent cache)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--examples", type=int, default=20, help="problem examples to show per shard")
    parser.add_argument("--report", help="also write the full report as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    paths, missing = expand_shard_paths(args.shards)
    for spec in missing:
        print(f"error: no shard matches {spec}", file=sys.stderr)
    if not paths:
        print("error: no shards to verify", file=sys.stderr)
        return 2
    jobs = [(p, args.schema, args.examples) for p in paths]
    bar = tqdm(total=len(jobs), unit="shard", desc="verify", disable=args.no_progress)
    reports = []
    if args.workers > 1 and len(jobs) > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(args.workers, len(jobs)), mp_context=ctx) as pool:
            for report in pool.map(_verify_args, jobs):
                reports.append(report)
                bar.update()
    else:
        for job in jobs:
            reports.append(_verify_args(job))
            bar.update()
    bar.close()

    totals: Counter = Counter()
    schemas = Counter(r["schema"] for r in reports)
    for report in reports:
        totals.update(report["problems"])
        if report["problems"]:
            print(f"{report['shard']}: {report['samples']} samples, {report['bad_samples']} bad, "
                  f"problems {report['problems']}")
            for key, reason, detail in report["examples"]:
                print(f"  {key}: {reason}: {detail}")
    samples = sum(r["samples"] for r in reports)
    bad = sum(r["bad_samples"] for r in reports)
    bad_shards = sum(bool(r["problems"]) for r in reports)
    empty = [r["shard"] for r in reports if r["empty"]]
    print(f"verified {len(reports)} shards ({dict(schemas)}): {samples} samples, {bad} bad samples, "
          f"{bad_shards} shards with problems" + (f", {len(empty)} empty shards" if empty else ""))
    for reason, n in sorted(totals.items()):
        print(f"  {reason}: {n}")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as handle:
            json.dump({"shards": reports, "samples": samples, "bad_samples": bad, "problems": dict(totals),
                       "missing": missing}, handle, indent=1)
    return 1 if totals or missing else 0
