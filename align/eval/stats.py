"""Mean scores and paired win rates with prompt-level bootstrap confidence intervals.

Pairing: an image of the run and the baseline image of the same prompt and seed (same initial
noise). The outcome of a pair is 1 if the run scores higher, 0.5 on a tie, 0 if lower; the win rate
is the mean outcome. The Diffusion-KTO paper instead compares, per prompt, the median-scoring of the
(5) images of each model (``pairing="median"``): the per-prompt outcome then compares the two
medians. For an even number of images the lower median is used,
so the compared score is always one real image's.

Intervals: percentile bootstrap over *prompts* (images of one prompt are not independent),
``n_boot`` resamples, 95% by default, with a seeded generator (reproducible).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

Key = tuple[int, int]  # (prompt_index, seed)


@dataclass
class Estimate:
    value: float
    low: float
    high: float
    n: int  # number of units averaged (pairs, prompts or images)

    def as_dict(self) -> dict:
        return asdict(self)


def outcome(a: float, b: float) -> float:
    """1 if a beats b, 0.5 on a tie, 0 otherwise."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def lower_median(values) -> float:
    """The lower median: the ceil(n/2)-th smallest value (the median itself for odd n)."""
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


def cluster_bootstrap(
    values: np.ndarray,
    clusters: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Estimate:
    """Mean of ``values`` with a percentile bootstrap interval that resamples whole clusters
    (prompts)."""
    values = np.asarray(values, dtype=np.float64)
    clusters = np.asarray(clusters)
    if values.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    ids, inverse = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    point = float(sums.sum() / counts.sum())
    if n_boot <= 0 or len(ids) < 2:
        return Estimate(point, point, point, int(values.size))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    boot = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return Estimate(point, float(low), float(high), int(values.size))


def mean_score(
    scores: dict[Key, float], n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> Estimate:
    """Mean score over images, bootstrapped over prompts."""
    keys = sorted(scores)
    values, prompts = np.array([scores[k] for k in keys]), np.array([k[0] for k in keys])
    return cluster_bootstrap(values, prompts, n_boot, seed, confidence)


def per_prompt_median(scores: dict[Key, float]) -> dict[int, float]:
    by_prompt: dict[int, list[float]] = defaultdict(list)
    for (prompt, _), value in scores.items():
        by_prompt[prompt].append(value)
    return {p: lower_median(v) for p, v in by_prompt.items()}


@dataclass
class WinRate:
    estimate: Estimate
    wins: int
    ties: int
    losses: int
    pairing: str

    def as_dict(self) -> dict:
        fields = asdict(self)
        return {**fields.pop("estimate"), **fields}


def paired_win_rate(
    run: dict[Key, float],
    baseline: dict[Key, float],
    pairing: str = "seed",
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> WinRate:
    """Win rate of ``run`` over ``baseline``.

    ``pairing="seed"``: one outcome per (prompt, seed) present in both, bootstrapped over prompts.
    ``pairing="median"``: one outcome per prompt, comparing the median-scoring images (KTO paper
    protocol), over the seeds present in both sets for that prompt.
    """
    common = sorted(set(run) & set(baseline))
    if pairing == "seed":
        outcomes = np.array([outcome(run[k], baseline[k]) for k in common])
        clusters = np.array([k[0] for k in common])
    elif pairing == "median":
        run_med = per_prompt_median({k: run[k] for k in common})
        base_med = per_prompt_median({k: baseline[k] for k in common})
        prompts = sorted(run_med)
        outcomes = np.array([outcome(run_med[p], base_med[p]) for p in prompts])
        clusters = np.array(prompts)
    else:
        raise ValueError(f"unknown pairing {pairing!r} (seed or median)")
    est = cluster_bootstrap(outcomes, clusters, n_boot, seed, confidence)
    wins, ties, losses = (int((outcomes == o).sum()) for o in (1.0, 0.5, 0.0))
    return WinRate(est, wins, ties, losses, pairing)
