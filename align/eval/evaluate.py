"""Evaluate a rendered image set: reward means, paired win rates against a baseline set, FID.

Everything that can be checked without compute is checked first: both sets exist and hold images,
their prompt sets are identical (otherwise the error lists the difference), the reward names are
known, the FID reference exists and is not one of the sets being scored. Then the rewards are
loaded and the images scored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.eval.fid import (
    build_feature_extractor,
    check_reference_is_real,
    compute_stats,
    fid_from_stats,
    reference_stats,
)
from align.eval.layout import ImageSet, ImageSetError, prompt_difference, scan_image_set
from align.eval.scoring import score_image_set
from align.eval.stats import mean_score, paired_win_rate
from align.rewards import build_reward, canonical_name


@dataclass
class EvalConfig:
    images: str
    rewards: list[str]
    baseline: str | None = None
    out: str | None = None  # default: <images>/eval
    reward_sources: dict[str, str] = field(default_factory=dict)  # name -> local path or hub id
    reward_root: str | None = None  # <root>/<name> is the source of reward <name> when it exists
    pairing: str = "seed"  # or "median" (the Diffusion-KTO protocol)
    n_boot: int = 1000
    confidence: float = 0.95
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    fid_reference: str | None = None
    fid_features: str = "inception"
    progress: bool = True


def reward_source(name: str, config: EvalConfig) -> str | None:
    if name in config.reward_sources:
        return config.reward_sources[name]
    if config.reward_root is not None:
        candidate = Path(config.reward_root) / name
        if candidate.exists():
            return str(candidate)
    return None


def load_sets(config: EvalConfig) -> tuple[ImageSet, ImageSet | None]:
    run = scan_image_set(config.images)
    baseline = scan_image_set(config.baseline) if config.baseline else None
    if baseline is not None:
        diff = prompt_difference(
            run.prompts,
            baseline.prompts,
            name_a=f"run ({run.root})",
            name_b=f"baseline ({baseline.root})",
        )
        if diff:
            raise ImageSetError(diff)
    return run, baseline


def evaluate(config: EvalConfig) -> tuple[dict, list[dict], Path]:
    """Run the evaluation; returns (report dict, per-image score rows, report directory). Writes
    nothing."""
    # align.eval.sampling imports diffusers (through align.models.sampling): `align eval` needs
    # only its device helper
    from align.eval.sampling import resolve_device

    names = list(dict.fromkeys(canonical_name(n) for n in config.rewards))
    if not names and not config.fid_reference:
        raise ValueError("nothing to evaluate: give --rewards and/or --fid-reference")
    if config.pairing not in ("seed", "median"):
        raise ValueError(f"unknown pairing {config.pairing!r} (seed or median)")
    run, baseline = load_sets(config)
    if config.fid_reference:
        if not Path(config.fid_reference).expanduser().exists():
            raise FileNotFoundError(f"FID reference {config.fid_reference} does not exist")
        scored = {"run": run.root, **({"baseline": baseline.root} if baseline else {})}
        check_reference_is_real(config.fid_reference, scored)
    out = Path(config.out) if config.out else run.root / "eval"
    device = resolve_device(config.device)

    rewards = {n: build_reward(n, reward_source(n, config), device=device) for n in names}
    # a decomposing reward without a saved direction estimates it on this set
    for reward in rewards.values():
        if hasattr(reward, "fit_direction") and getattr(reward, "direction", 0) is None:
            reward.fit_direction(run.prompts)
    scored_run = score_image_set(run, rewards, config.batch_size, config.progress)
    scored_base = (
        score_image_set(baseline, rewards, config.batch_size, config.progress) if baseline else None
    )
    del rewards
    if device.type == "cuda":
        torch.cuda.empty_cache()

    skipped = {"run": scored_run.skipped, "baseline": scored_base.skipped if scored_base else []}
    report = {
        "run": str(run.root),
        "baseline": str(baseline.root) if baseline else None,
        "pairing": config.pairing,
        "n_boot": config.n_boot,
        "confidence": config.confidence,
        "bootstrap_seed": config.seed,
        "num_prompts": len(run.prompts),
        "seeds": run.seeds,
        "run_meta": run.meta,
        "baseline_meta": baseline.meta if baseline else None,
        "skipped": {k: v for k, v in skipped.items() if v},
        "rewards": {},
        "fid": None,
    }
    boot = dict(n_boot=config.n_boot, seed=config.seed, confidence=config.confidence)
    for name, run_scores in scored_run.scores.items():
        entry = {"run": mean_score(run_scores, **boot).as_dict()}
        if scored_base is not None:
            base_scores = scored_base.scores.get(name, {})
            entry["baseline"] = mean_score(base_scores, **boot).as_dict()
            missing = len(set(run_scores) ^ set(base_scores))
            if missing:
                print(
                    f"warning: {name}: {missing} images have no counterpart in the other set and "
                    "are left out of the win rate",
                    file=sys.stderr,
                )
            win_rate = paired_win_rate(run_scores, base_scores, config.pairing, **boot)
            entry["win_rate"] = win_rate.as_dict()
        report["rewards"][name] = entry

    if config.fid_reference:
        extractor = build_feature_extractor(config.fid_features, device=device)
        ref = reference_stats(config.fid_reference, extractor, batch_size=config.batch_size)
        fid = dict(reference=str(config.fid_reference), features=extractor.spec, reference_n=ref.n)
        for label, image_set in (("run", run), ("baseline", baseline)):
            if image_set is not None:
                paths = [e.path for e in image_set.entries]
                stats = compute_stats(paths, extractor, config.batch_size)
                fid.update({label: fid_from_stats(stats, ref), f"{label}_n": stats.n})
        report["fid"] = fid

    rows = scored_run.rows("run") + (scored_base.rows("baseline") if scored_base else [])
    return report, rows, out
