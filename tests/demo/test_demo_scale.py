"""Scale checks (slow; ``make test-all``): what the demo's report must show,
at a smaller scale than the report.

Each trains real models for minutes, so they run on the demo's own bases, cached where ``make demo``
keeps them (trained there first when missing: ~10 minutes for the full base, ~2 for the quick one).
Every number is deterministic on a given machine (fixed seeds throughout), so a check that passes
once is not luck of the draw on that machine; the margins in the report (``docs/demo/README.md``)
say how far each is from failing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from align.demo.base import BaseConfig, build_base
from align.demo.run import DemoConfig, default_artifacts, quick_config, run_demo

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def on_the_full_base(tmp_path, methods: tuple, family: str = "sd15") -> dict:
    """The demo's summary of ``methods`` on the full demo's base of ``family`` (reused, or trained
    first): one training seed each, half the report's held-out captions, 4 sampling seeds."""
    base_config = BaseConfig(family=family)
    base = build_base(ROOT / default_artifacts(family) / "base", base_config)
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "base").symlink_to(base)
    cfg = DemoConfig(base=base_config)
    cfg = replace(
        cfg,
        out=str(tmp_path / "report"),
        artifacts=str(tmp_path / "art"),
        seeds=1,
        eval_captions=32,
        eval_seeds=cfg.eval_seeds[:4],
        methods=methods,
    )
    return run_demo(cfg)


def _finals(summary: dict, method: str) -> list[float]:
    return [r["final"] for r in summary["results"][method]]


def test_segment_encoding_beats_truncation_on_facts_past_token_77(tmp_path):
    """On the quick demo (2 training seeds): LongAlign SFT with segment encoding satisfies more of
    the facts past token 77 than the same SFT with truncation, and more than the base."""
    cfg = quick_config(
        out=str(tmp_path / "report"), seeds=2, artifacts=str(ROOT / "artifacts" / "shapes-quick")
    )
    cfg.methods = ("sft-segment", "sft-truncate")
    summary = run_demo(cfg)
    segment, truncate = _finals(summary, "sft-segment"), _finals(summary, "sft-truncate")
    assert min(segment) > max(truncate), (segment, truncate)
    assert min(segment) > summary["baselines"]["sft-segment"], (segment, summary["baselines"])


def test_each_method_raises_the_score_and_each_flipped_control_lowers_it(tmp_path):
    """On the full demo's base, one training seed per method, half the report's held-out captions
    with 4 sampling seeds: DPO, KTO, RFT with the judge and RFT with the tiny CLIP preference model
    each raise the judge's score on held-out captions; DPO and KTO with winners and losers
    (desirable and undesirable) swapped lower it."""
    summary = on_the_full_base(
        tmp_path, ("dpo", "dpo-flipped", "kto", "kto-flipped", "rft-judge", "rft-clip")
    )
    base_score = summary["base_score"]
    for method in ("dpo", "kto", "rft-judge", "rft-clip"):
        assert _finals(summary, method)[0] > base_score, (
            method,
            _finals(summary, method),
            base_score,
        )
    for control in ("dpo-flipped", "kto-flipped"):
        assert _finals(summary, control)[0] < base_score, (
            control,
            _finals(summary, control),
            base_score,
        )


def test_online_methods_raise_the_score_and_the_monitor_catches_a_colour_only_reward(tmp_path):
    """On the full demo's base, one training seed each, half the held-out captions with 4 sampling
    seeds: GRPO with the judge's reward and iterative online DPO on the policy's own judge-made
    pairs raise the judge score, the same runs on the negated judge lower it, and GRPO on a reward
    that pays only for red pixels lowers it while the reward-hacking monitor (the judge as gold)
    marks the step."""
    summary = on_the_full_base(
        tmp_path, ("grpo", "grpo-flipped", "online-dpo", "online-dpo-flipped", "grpo-redness")
    )
    base_score = summary["base_score"]
    for method in ("grpo", "online-dpo"):
        assert _finals(summary, method)[0] > base_score, (method, summary["results"][method])
    for control in ("grpo-flipped", "online-dpo-flipped", "grpo-redness"):
        assert _finals(summary, control)[0] < base_score, (control, summary["results"][control])
    (redness,) = summary["results"]["grpo-redness"]
    assert redness["monitor"]["hacking_step"] is not None, redness["monitor"]


FLOW_OBJECTIVES = ("dpo", "kto", "grpo")


@pytest.fixture(scope="module")
def flow_summary(tmp_path_factory) -> dict:
    """On the flow-matching (SD3-shaped) demo base, one training seed each, half the held-out
    captions with 4 sampling seeds: DPO, KTO and GRPO through the same configs, and their flipped
    controls."""
    flipped = tuple(f"{m}-flipped" for m in FLOW_OBJECTIVES)
    return on_the_full_base(
        tmp_path_factory.mktemp("flow"), FLOW_OBJECTIVES + flipped, family="sd3"
    )


@pytest.mark.parametrize("method", FLOW_OBJECTIVES)
def test_flow_base_methods_raise_the_score(flow_summary, method):
    assert _finals(flow_summary, method)[0] > flow_summary["base_score"], (
        method,
        flow_summary["results"][method],
    )


@pytest.mark.parametrize("control", [f"{m}-flipped" for m in FLOW_OBJECTIVES])
def test_flow_base_flipped_controls_lower_the_score(flow_summary, control):
    assert _finals(flow_summary, control)[0] < flow_summary["base_score"], (
        control,
        flow_summary["results"][control],
    )
