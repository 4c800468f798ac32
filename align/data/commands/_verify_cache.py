"""The ``cached`` schema of ``align data verify``: checks of latent-cache shards.

Latent caches (``align data cache-latents``, schema in ``align.data.cached``) are detected from
their ``.npy`` members or from a ``cache-latents`` ``manifest.json`` in their folder, whose pair,
single-image or long-caption layout they follow (else the first sample's). Every sample must have
the layout's tensors (``pooled.npy`` when the folder has ``uncond_pooled.npy``, the flipped moments
with ``--flip``) and no others, each loading without pickle, of the stored dtype, finite, of a
shape that agrees across the shard and with ``uncond.npy`` (moments: ``(2C, h, h)``, ``h`` dividing
the resolution). The ``json`` is the source's plus a ``cache`` object whose settings must be the
manifest's (else the first sample's). A cache folder without ``uncond.npy`` (an unfinished run,
which training refuses) is a problem too.

Kept apart from :mod:`align.data.commands.verify` because a cache's checks read its folder and its
tensors, not images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from align.data.schema import cache_settings, pair_meta_problem, single_meta_problem
from align.data.writer import MANIFEST

# the per-sample ``cache`` settings that must agree with the manifest's ``source.cache``
# (cache-latents writes both)
CACHE_SETTINGS = (
    "model",
    "model_fingerprint",
    "resolution",
    "flip",
    "dtype",
    "store_dtype",
    "prompt_encoder",
)
META_PROBLEM = {"pair": pair_meta_problem, "single": single_meta_problem}


def parse_json(data: bytes | None) -> tuple[object, str | None]:
    """(parsed value, None), or (None, the error) for a member that is not JSON."""
    try:
        return json.loads(data), None
    except (TypeError, ValueError) as exn:
        return None, f"{type(exn).__name__}: {exn}"


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
    def natural(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, list) and len(v) == 2 and all(map(natural, v)) for v in value)
    )


class CachedShardCheck:
    """The checks of one cached shard's samples, against what its folder records (the manifest's
    cache settings, ``uncond.npy``) or, where it records nothing, against the shard's first sample
    (``fields``: the fields of that sample)."""

    def __init__(self, path: Path, manifest: dict | None, fields: set[str]):
        # imported here: align.data.cached imports torch, which image shards need not pay for
        from align.data import cached

        self.cached = cached  # the module: the cache schema's member names
        settings = cache_settings(manifest)
        self.settings = dict(settings) if settings is not None else None
        self.settings_from = MANIFEST if settings is not None else None
        self.schema = (settings or {}).get("schema")
        if self.schema not in cached.SCHEMAS:  # no cache manifest: the first sample's layout
            single = "long" if "txt" in fields else "single"
            self.schema = "pair" if fields & set(cached.PAIR_MOMENTS) else single
        pair = self.schema == "pair"
        self.moments = cached.PAIR_MOMENTS if pair else (cached.SINGLE_MOMENTS,)
        self.flip_moments = cached.PAIR_MOMENTS_FLIP if pair else (cached.SINGLE_MOMENTS_FLIP,)
        self.first_flip = any(name in fields for name in self.flip_moments)
        self.pooled = cached.POOLED in fields  # unless uncond_pooled.npy says otherwise, below
        # moments / embeds.npy / pooled.npy -> (shape, whose)
        self.shapes: dict[str, tuple[tuple, str]] = {}
        self.folder_problems: list[tuple[str, str]] = []
        uncond = path.parent / cached.UNCOND
        if uncond.is_file():
            pooled = path.parent / cached.UNCOND_POOLED
            self.pooled = pooled.is_file()
            for file, member, ndim in ((uncond, cached.EMBEDS, 3), (pooled, cached.POOLED, 2)):
                problem = self._seed_shape(file, member, ndim) if file.is_file() else None
                if problem:
                    self.folder_problems.append(("bad_uncond", f"{file.name}: {problem}"))
        elif settings is not None:
            detail = (
                f"no {cached.UNCOND} beside the shard: the cache run did not finish (training "
                "refuses it; rerun the same command to resume)"
            )
            self.folder_problems.append(("missing_uncond", detail))

    def _seed_shape(self, file: Path, member: str, ndim: int) -> str | None:
        """Take the shape of ``member`` from ``file`` (``uncond*.npy``); what is wrong with the
        file, or None."""
        try:
            array = _load_npy(file.read_bytes())
        except Exception as exn:  # any load failure is the finding
            return f"{type(exn).__name__}: {exn}"
        if array.ndim != ndim or array.shape[0] != 1:
            return f"shape {array.shape}, expected (1, ...) with {ndim} axes"
        self.shapes[member] = (tuple(array.shape[1:]), f"{file.name} {tuple(array.shape)} implies")
        if array.dtype.kind in "fc" and not bool(np.isfinite(array).all()):
            return "holds NaN or infinite values"
        return None

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
            meta, error = parse_json(sample["json"])
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
        layout = f"this cache: flip={self.flip}, pooled={self.pooled}, {self.schema} layout"
        unexpected = [n for n in sorted(sample) if n.endswith(".npy") and n not in members]
        return problems + [("unexpected_member", f"{name} ({layout})") for name in unexpected]

    def _meta_problems(self, meta: object) -> list[tuple[str, str]]:
        if not isinstance(meta, dict):
            return [("json_not_object", str(meta)[:200])]
        cache = meta.get("cache")
        if not isinstance(cache, dict):
            return [("not_cached", "json has no cache object")]
        problems = []
        problem = META_PROBLEM[self.schema](meta) if self.schema in META_PROBLEM else None
        if problem:
            source_meta = {k: v for k, v in meta.items() if k != "cache"}
            problems.append((problem, json.dumps(source_meta)[:200]))
        recorded = {k: cache.get(k) for k in CACHE_SETTINGS}
        if self.settings is None:
            self.settings, self.settings_from = recorded, "the shard's first sample"
        differ = [
            f"{k}: {recorded[k]!r} here, {self.settings.get(k)!r} in {self.settings_from}"
            for k in CACHE_SETTINGS
            if recorded[k] != self.settings.get(k)
        ]
        if differ:
            problems.append(("cache_settings_mismatch", "; ".join(differ)))
        for name in ("original_size", "crop_top_left"):
            if not _pairs_of_ints(cache.get(name), len(self.moments)):
                found = json.dumps(cache.get(name))[:100]
                expected = f"{len(self.moments)} [a, b] of non-negative ints"
                problems.append(("bad_cache_sizes", f"{name}: {found}, expected {expected}"))
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
        bad = int(array.size - np.isfinite(array).sum()) if array.dtype.kind in "fc" else 0
        if bad:
            detail = f"{name}: {bad} of {array.size} values are NaN or infinite"
            problems.append(("non_finite", detail))
        group = "moments" if name in (*self.moments, *self.flip_moments) else name
        shape = tuple(array.shape)
        resolution = (self.settings or {}).get("resolution")
        if group == "moments":
            ok = len(shape) == 3 and shape[0] > 0 and shape[0] % 2 == 0 and shape[1] == shape[2] > 0
            ok = ok and (not isinstance(resolution, int) or resolution % shape[1] == 0)
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
