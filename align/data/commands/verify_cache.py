"""The ``cached`` schema of ``align data verify``: checks of latent-cache shards.

Latent caches (``align data cache-latents``, schema in ``align.data.cached``) are ``cached`` shards:
detected from their ``.npy`` members, or from a ``manifest.json`` written by ``cache-latents`` in
their folder. Their pair, single-image or long-caption layout is the manifest's (else the first
sample's). Every sample must have the layout's members (the moments of each image, the flipped ones
when the cache has ``--flip``, ``embeds.npy``, ``pooled.npy`` when the cache has
``uncond_pooled.npy``, ``txt`` for long captions) and no other tensors; every tensor must load
(``allow_pickle=False``), be of the stored dtype and hold only finite values; moments are
``(2C, h, h)`` with ``h`` dividing the cache's resolution, and each tensor's shape is the same
across the shard and agrees with ``uncond.npy`` (``embeds.npy``: ``(L, D)`` of its ``(1, L, D)``).
The ``json`` is the source's (checked as the source schema's) plus a ``cache`` object whose settings
must be the manifest's (else the first sample's) and whose ``original_size`` / ``crop_top_left``
have one ``[a, b]`` per image. A cache folder without ``uncond.npy`` (an unfinished run, which
training refuses) is a problem too.

Kept apart from :mod:`align.data.commands.verify` (image shards, the command itself) because a
cache's checks read its folder (``uncond.npy``, the manifest's cache settings) and its tensors,
not images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from align.data.schema import pair_meta_problem, single_meta_problem
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


def parse_json(data: bytes | None) -> tuple[object, str | None]:
    """(parsed value, None), or (None, the error) for a member that is not JSON."""
    try:
        return json.loads(data), None
    except (TypeError, ValueError) as exn:
        return None, f"{type(exn).__name__}: {exn}"


def cache_settings(manifest: dict | None) -> dict | None:
    """The settings a ``cache-latents`` manifest recorded (its ``source.cache``);
    None for any other manifest."""
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
    return (
        isinstance(value, list)
        and len(value) == count
        and all(
            isinstance(v, list)
            and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
            for v in value
        )
    )


class CachedShardCheck:
    """The checks of one cached shard's samples, against what its folder records (the manifest's
    cache settings, ``uncond.npy``) or, where it records nothing, against the shard's first sample.

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
            schema = (
                "pair"
                if fields & set(cached.PAIR_MOMENTS)
                else "long"
                if "txt" in fields
                else "single"
            )
        self.schema = schema
        pair = schema == "pair"
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
                if file.is_file():
                    self._seed_shape(file, member, ndim)
        elif settings is not None:
            self.folder_problems.append(
                (
                    "missing_uncond",
                    f"no {cached.UNCOND} beside the shard: the cache run did "
                    "not finish (training refuses it; rerun the same command to resume)",
                )
            )

    def _seed_shape(self, file: Path, member: str, ndim: int) -> None:
        try:
            array = _load_npy(file.read_bytes())
        except Exception as exn:  # any load failure is the finding
            self.folder_problems.append(("bad_uncond", f"{file.name}: {type(exn).__name__}: {exn}"))
            return
        if array.ndim != ndim or array.shape[0] != 1:
            self.folder_problems.append(
                (
                    "bad_uncond",
                    f"{file.name}: shape {array.shape}, expected (1, ...) with {ndim} axes",
                )
            )
            return
        if array.dtype.kind in "fc" and not bool(np.isfinite(array).all()):
            self.folder_problems.append(
                ("bad_uncond", f"{file.name}: holds NaN or infinite values")
            )
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
        for name in sorted(sample):
            if name.endswith(".npy") and name not in members:
                problems.append(
                    (
                        "unexpected_member",
                        f"{name} (this cache: flip={self.flip}, "
                        f"pooled={self.pooled}, {self.schema} layout)",
                    )
                )
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
                problems.append(
                    (problem, json.dumps({k: v for k, v in meta.items() if k != "cache"})[:200])
                )
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
                problems.append(
                    (
                        "bad_cache_sizes",
                        f"{name}: {json.dumps(cache.get(name))[:100]}, expected "
                        f"{len(self.moments)} [a, b] of non-negative ints",
                    )
                )
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
                problems.append(
                    ("non_finite", f"{name}: {bad} of {array.size} values are NaN or infinite")
                )
        group = "moments" if name in (*self.moments, *self.flip_moments) else name
        shape = tuple(array.shape)
        resolution = (self.settings or {}).get("resolution")
        if group == "moments":
            ok = (
                len(shape) == 3
                and shape[0] % 2 == 0
                and shape[0] > 0
                and shape[1] == shape[2]
                and shape[1] > 0
                and (not isinstance(resolution, int) or resolution % shape[1] == 0)
            )
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
