"""The `make eval` recipe end to end on CPU (tiny export vs the tiny base, tiny rewards in the real
layouts, FID against a synthetic validation shard), through the real console entry point: the
report, its image grid and win-rate plot, and the bad inputs it must report."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from align.cli import main as align
from align.eval.figures import FONT_SIZE, PAD, image_grid, win_rate_figure
from align.eval.report import read_scores

ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [
    "a photo of a cat",
    "a red car on a street",
    "an astronaut riding a horse",
    "a painting of a forest",
]
REWARDS = ["pickscore", "hps", "clip", "aesthetic", "imagereward"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_rewards, pair_shards):
    """What `make eval` does: save the tiny base (and here a stand-in export),
    render both, evaluate."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-scoped one-thread fixture
    try:
        return _recipe(tmp_path_factory.mktemp("make-eval"), tiny_rewards, pair_shards)
    finally:
        torch.set_num_threads(threads)


def _recipe(root, tiny_rewards, pair_shards):
    from align.models import load_components

    load_components("tiny").save_pretrained(root / "tiny-base")
    # stands in for a trained export
    load_components("tiny", seed=1).save_pretrained(root / "tiny-export")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for name, checkpoint in (("run", "tiny-export"), ("base", "tiny-base")):
        assert (
            align(
                [
                    "sample",
                    "--checkpoint",
                    str(root / checkpoint),
                    "--prompts",
                    str(prompts),
                    "--out",
                    str(root / name),
                    "-n",
                    "2",
                    "--steps",
                    "5",
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            == 0
        )
    reward_root = tiny_rewards["clip"].parent
    code = align(
        [
            "eval",
            "--images",
            str(root / "run"),
            "--baseline",
            str(root / "base"),
            "--reward-root",
            str(reward_root),
            "--fid-reference",
            str(pair_shards / "pairs-000000.tar"),  # the real images of a validation shard
            "--fid-features",
            f"clip:{reward_root / 'clip'}",
            "--out",
            str(root / "report"),
            "--device",
            "cpu",
            "--bootstrap",
            "200",
            "--no-progress",
        ]
    )
    assert code == 0
    return root


def test_report_files_and_table(recipe, capsys):
    report = json.loads((recipe / "report" / "report.json").read_text())
    assert list(report["rewards"]) == REWARDS
    assert report["num_prompts"] == 4 and report["seeds"] == [0, 1] and report["pairing"] == "seed"
    for name, entry in report["rewards"].items():
        win = entry["win_rate"]
        assert win["n"] == 8 and win["wins"] + win["ties"] + win["losses"] == 8
        assert 0.0 <= win["low"] <= win["value"] <= win["high"] <= 1.0
        assert entry["run"]["low"] <= entry["run"]["value"] <= entry["run"]["high"]
        assert win["value"] == pytest.approx((win["wins"] + 0.5 * win["ties"]) / 8)
    fid = report["fid"]
    # both sets against the shard's real images (16 pairs: 32 images), neither against itself
    assert fid["reference_n"] == 32 and fid["reference"].endswith("pairs-000000.tar")
    assert fid["run"] > 0 and fid["baseline"] > 0 and fid["run"] != fid["baseline"]
    with (recipe / "report" / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["reward"] for r in rows][:5] == REWARDS and rows[5]["reward"].startswith("fid")
    with (recipe / "report" / "scores.csv").open() as f:
        scores = list(csv.DictReader(f))
    assert len(scores) == 16 and {r["set"] for r in scores} == {"run", "baseline"}
    # the win rate is recomputable from the per-image scores, paired by prompt and seed
    by = {(r["set"], r["prompt_index"], r["seed"]): float(r["pickscore"]) for r in scores}
    wins = sum(by[("run", p, s)] > by[("baseline", p, s)] for (_, p, s) in by if _ == "run")
    assert wins == report["rewards"]["pickscore"]["win_rate"]["wins"]
    md = (recipe / "report" / "report.md").read_text()
    assert "| pickscore | 8 |" in md and "win rate vs baseline" in md and "FID" in md
    assert "![grid](grid.png)" in md and "![win_rates](win_rates.png)" in md


def test_image_grid_pairs_base_and_run_with_their_scores(recipe):
    cell = 192
    with Image.open(recipe / "report" / "grid.png") as written:
        size = written.size
    rows_shown = 8  # 4 prompts x 2 seeds, every prompt's first seed first
    row_height = 2 * (FONT_SIZE + 4) + cell + len(REWARDS) * (FONT_SIZE + 4) + PAD
    assert size == (2 * cell + 3 * PAD, PAD + FONT_SIZE + 4 + rows_shown * row_height)
    scores = read_scores(recipe / "report")
    grid, cells = image_grid(scores, REWARDS, cell=cell)
    assert grid.size == size
    assert [c.key for c in cells[:8:2]] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    by = {(r["set"], r["prompt_index"], r["seed"]): r for r in scores}
    for left, right in zip(cells[::2], cells[1::2]):
        # one row: the baseline image, then the run's of the same prompt and seed
        assert (left.set, right.set) == ("baseline", "run") and left.key == right.key
        for c in (left, right):
            row = by[(c.set, *c.key)]
            assert c.caption == [f"{r} {row[r]:.4g}" for r in REWARDS]
            source = Image.open(row["path"]).convert("RGB").resize((cell, cell), Image.NEAREST)
            assert grid.crop(c.box).tobytes() == source.tobytes()


def test_win_rate_plot(recipe):
    import matplotlib.image

    png = matplotlib.image.imread(recipe / "report" / "win_rates.png")
    assert png.shape[:2] == (int(round(100 * (1.4 + 0.45 * len(REWARDS)))), 700)
    report = json.loads((recipe / "report" / "report.json").read_text())
    fig = win_rate_figure(report)
    ax = fig.axes[0]
    at = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    labels = sorted(at, key=at.get, reverse=True)  # the table's order, first on top
    assert [label.split("\n")[0] for label in labels] == REWARDS
    for label, name in zip(labels, REWARDS):
        win = report["rewards"][name]["win_rate"]
        assert f"{win['value']:.2f} [{win['low']:.2f}, {win['high']:.2f}]" in label
        assert f"W/T/L {win['wins']}/{win['ties']}/{win['losses']}" in label
    assert "95% bootstrap CI" in ax.get_xlabel()
    (points,) = [line for line in ax.get_lines() if line.get_marker() == "o"]
    values = [report["rewards"][name]["win_rate"]["value"] for name in REWARDS]
    assert list(points.get_xdata()) == pytest.approx(values)


@pytest.mark.parametrize(
    "reference, said", [("base", "is the baseline"), ("run", "is the run"), (".", "holds the run")]
)
def test_fid_reference_must_not_be_a_scored_set(recipe, tmp_path, reference, said, capsys):
    out = tmp_path / "report"
    code = align(
        [
            "eval",
            "--images",
            str(recipe / "run"),
            "--baseline",
            str(recipe / "base"),
            "--rewards",
            "",
            "--fid-reference",
            str(recipe / reference),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"{said} image set" in err and "real images" in err and len(err.splitlines()) == 1


def test_makefile_eval_compares_with_real_images():
    makefile = (ROOT / "Makefile").read_text()
    (recipe_line,) = [ln for ln in makefile.splitlines() if "--fid-reference" in ln]
    reference = re.search(r"--fid-reference (\S+)", recipe_line).group(1)
    assert reference == "$(EVAL_FID_REFERENCE)"
    default = re.search(r"^EVAL_FID_REFERENCE \?= (\S+)$", makefile, re.M).group(1)
    assert default == "$(SYNTH)/pairs-000000.tar"  # the validation shard of configs/dpo/tiny.yaml
    assert (
        "val_shards: data/synthetic/pickapic/pairs-000000.tar"
        in (ROOT / "configs/dpo/tiny.yaml").read_text()
    )


def test_missing_matplotlib_stops_before_scoring(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if align[eval] were not installed
    argv = ["eval", "--images", str(recipe / "run"), "--baseline", str(recipe / "base")]
    argv += ["--rewards", "nonexistent-reward", "--out", str(tmp_path / "r"), "--no-progress"]
    assert align(argv) == 2
    err = capsys.readouterr().err
    assert "pip install 'align[eval]'" in err and "--no-plot" in err
    assert "nonexistent" not in err  # stopped before the rewards were looked at


def test_median_pairing_and_subset_of_rewards(recipe, tiny_rewards, capsys):
    code = align(
        [
            "eval",
            "--images",
            str(recipe / "run"),
            "--baseline",
            str(recipe / "base"),
            "--rewards",
            "hps",
            "--reward-source",
            f"hps={tiny_rewards['hps']}",
            "--pairing",
            "median",
            "--out",
            str(recipe / "report-median"),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((recipe / "report-median" / "report.json").read_text())
    assert list(report["rewards"]) == ["hps"] and report["rewards"]["hps"]["win_rate"]["n"] == 4
    assert "median image per prompt" in capsys.readouterr().out


def test_unreadable_image_is_reported_and_skipped(recipe, tiny_rewards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(recipe / "run", run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    (run / "00002_1.png").write_bytes(b"\x89PNG broken")
    code = align(
        [
            "eval",
            "--images",
            str(run),
            "--baseline",
            str(recipe / "base"),
            "--rewards",
            "pickscore",
            "--reward-root",
            str(tiny_rewards["clip"].parent),
            "--no-progress",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "00002_1.png" in err
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["rewards"]["pickscore"]["run"]["n"] == 7
    assert report["rewards"]["pickscore"]["win_rate"]["n"] == 7
    assert report["skipped"]["run"][0][0].endswith("00002_1.png")


def test_mismatched_prompt_sets_list_the_difference(recipe, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(recipe / "base", other)
    lines = (other / "prompts.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"index": 1, "prompt": "a blue bicycle"})
    (other / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    assert (
        align(
            [
                "eval",
                "--images",
                str(recipe / "run"),
                "--baseline",
                str(other),
                "--rewards",
                "clip",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "prompt sets differ" in err
        and "'a red car on a street'" in err
        and "'a blue bicycle'" in err
    )


def test_empty_prompt_set_fails_at_start(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code = align(
        [
            "sample",
            "--checkpoint",
            str(tmp_path / "no-such-model"),
            "--prompts",
            str(empty),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "empty" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_missing_reward_checkpoint_names_the_file(recipe, tmp_path, capsys):
    code = align(
        [
            "eval",
            "--images",
            str(recipe / "run"),
            "--rewards",
            "imagereward",
            "--reward-source",
            f"imagereward={tmp_path}",
            "--no-progress",
        ]
    )
    assert code == 2
    assert str(tmp_path / "ImageReward.pt") in capsys.readouterr().err


def test_commands_are_listed():
    from align.commands import discover, summary

    commands = discover("align.commands")
    assert summary(commands["sample"]).startswith("Render a prompt set")
    assert summary(commands["eval"]).startswith("Score image sets")
    assert "relabel" in discover("align.data.commands")
