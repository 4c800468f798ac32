"""Win rates and bootstrap intervals on fabricated scores with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from align.eval.stats import (
    cluster_bootstrap,
    lower_median,
    mean_score,
    paired_win_rate,
    per_prompt_median,
)


def scores(values_by_prompt: dict[int, list[float]]) -> dict[tuple[int, int], float]:
    return {(p, s): v for p, vs in values_by_prompt.items() for s, v in enumerate(vs)}


def test_all_wins_all_losses_all_ties():
    base = scores({p: [0.0, 1.0, 2.0] for p in range(10)})
    win = paired_win_rate({k: v + 1 for k, v in base.items()}, base)
    assert (win.estimate.value, win.estimate.low, win.estimate.high) == (1.0, 1.0, 1.0)
    assert (win.wins, win.ties, win.losses, win.estimate.n) == (30, 0, 0, 30)
    loss = paired_win_rate({k: v - 1 for k, v in base.items()}, base)
    assert loss.estimate.value == 0.0 and loss.losses == 30
    tie = paired_win_rate(dict(base), base)
    assert (
        tie.estimate.value == 0.5
        and tie.ties == 30
        and tie.estimate.low == tie.estimate.high == 0.5
    )


def test_pairs_by_prompt_and_seed_not_by_rank():
    # the run is worse on every pair although its scores, pooled, are the same set of numbers
    base = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 5.0, (1, 1): 7.0}
    run = {(0, 0): 0.5, (0, 1): 2.5, (1, 0): 4.5, (1, 1): 6.5}
    assert paired_win_rate(run, base, n_boot=0).estimate.value == 0.0
    # a pair present in one set only is left out
    run[(2, 0)] = 100.0
    assert paired_win_rate(run, base, n_boot=0).estimate.n == 4


def test_three_quarters():
    base = scores({p: [0.0] * 4 for p in range(5)})
    run = scores({p: [1.0, 1.0, 1.0, -1.0] for p in range(5)})
    win = paired_win_rate(run, base)
    assert win.estimate.value == pytest.approx(0.75)
    # every prompt has the same 3/4 rate: resampling prompts cannot move it
    assert win.estimate.low == pytest.approx(0.75) and win.estimate.high == pytest.approx(0.75)


def test_median_pairing_is_the_kto_protocol():
    base = scores({0: [5.0, 5.0, 5.0, 5.0, 5.0]})
    run = scores({0: [6.0, 6.0, 0.0, 0.0, 6.0]})  # sorted 0,0,6,6,6: median 6 > 5, a win
    assert paired_win_rate(run, base, pairing="median", n_boot=0).estimate.value == 1.0
    # per seed the run wins 2 of 5, and its median image (sorted 0,0,0,6,9 -> 0) loses
    run = scores({0: [6.0, 0.0, 0.0, 0.0, 9.0]})
    assert paired_win_rate(run, base, pairing="seed", n_boot=0).estimate.value == pytest.approx(0.4)
    med = paired_win_rate(run, base, pairing="median", n_boot=0)
    assert med.estimate.value == 0.0 and med.estimate.n == 1 and med.pairing == "median"
    assert per_prompt_median(run) == {0: 0.0}
    assert lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0 and lower_median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="pairing"):
        paired_win_rate(run, base, pairing="mode")


def test_bootstrap_of_two_clusters_has_known_distribution():
    # two prompts scoring 0 and 1: resampled means are 0, .5, 1 with probabilities 1/4, 1/2, 1/4
    est = cluster_bootstrap(
        np.array([0.0, 0.0, 1.0, 1.0]), np.array([0, 0, 1, 1]), n_boot=4000, seed=0
    )
    assert est.value == 0.5 and est.low == 0.0 and est.high == 1.0
    est = cluster_bootstrap(
        np.array([0.0, 0.0, 1.0, 1.0]), np.array([0, 0, 1, 1]), n_boot=4000, seed=0, confidence=0.4
    )  # the central 40% of {0: 25%, .5: 50%, 1: 25%} is .5
    assert est.low == est.high == 0.5


def test_bootstrap_interval_matches_the_binomial_width():
    rng = np.random.default_rng(3)
    n, p = 900, 0.7
    outcomes = (rng.random(n) < p).astype(float)
    est = cluster_bootstrap(outcomes, np.arange(n), n_boot=4000, seed=1)
    half = 1.96 * np.sqrt(est.value * (1 - est.value) / n)
    assert est.low == pytest.approx(est.value - half, abs=0.006)
    assert est.high == pytest.approx(est.value + half, abs=0.006)
    # deterministic for a seed, different for another
    assert cluster_bootstrap(outcomes, np.arange(n), n_boot=500, seed=1) == cluster_bootstrap(
        outcomes, np.arange(n), n_boot=500, seed=1
    )


def test_clustering_widens_the_interval_for_correlated_images():
    # 20 prompts x 10 identical outcomes each: effectively 20 observations, not 200
    rng = np.random.default_rng(0)
    per_prompt = (rng.random(20) < 0.5).astype(float)
    values = np.repeat(per_prompt, 10)
    prompts = np.repeat(np.arange(20), 10)
    clustered = cluster_bootstrap(values, prompts, n_boot=2000, seed=0)
    naive = cluster_bootstrap(values, np.arange(200), n_boot=2000, seed=0)
    assert clustered.high - clustered.low > 2.5 * (naive.high - naive.low)


def test_mean_score():
    est = mean_score(scores({0: [1.0, 3.0], 1: [5.0, 7.0]}), n_boot=1000)
    assert est.value == 4.0 and est.n == 4 and est.low == 2.0 and est.high == 6.0
