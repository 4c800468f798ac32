"""`align data generate-pairs`: K samples per prompt from the model, scored, written as pairs the
DPO data module reads and KTO singles; resumes without rendering or scoring twice; bad input
fails before sampling."""

import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from align.data.commands.generate_pairs import main
from align.data.generated import plan_pairs, plan_singles

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


def run(out, prompts, *extra):
    return main(
        [
            "--model",
            "tiny",
            "--prompts",
            str(prompts),
            "--reward",
            "jpeg-compressibility",
            "--k",
            "3",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def samples(folder: Path) -> list[dict]:
    found = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    found.append(json.loads(tar.extractfile(member).read()))
    return found


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_pairs_and_singles_from_the_models_samples_resume_without_repeats(tmp_path, prompt_file):
    from align.data import PickAPicDataModule

    out = tmp_path / "gen"
    assert run(out, prompt_file, "--pairs", "all", "--kto", "0.3") == 0
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 6 and len(list((out / "images").glob("*.png"))) == 6
    pairs = samples(out / "pairs")
    assert len(pairs) == 6  # 3 pairs per prompt: every score differs
    for p in pairs:
        better = 0 if p["label_0"] == 1.0 else 1
        assert p[f"score_{better}"] > p[f"score_{1 - better}"]
        assert set(p["scores_0"]) == {"jpeg-compressibility"}
    assert {p["label_0"] for p in pairs} == {0.0, 1.0}  # the winner's position alternates
    singles = samples(out / "singles")
    assert (
        len(singles) == 6 and sum(s["label"] for s in singles) == 2
    )  # ceil(0.3 * 3) = 1 per prompt

    # a torn last line (an interrupted run) is scored again; nothing is rendered or scored twice
    lines = (out / "scores.jsonl").read_text().splitlines()
    (out / "scores.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    assert run(out, prompt_file, "--pairs", "all", "--kto", "0.3") == 0
    kept = (out / "scores.jsonl").read_text().splitlines()
    assert kept[5] == lines[-1][:10]  # the torn line stays (ignored), the next starts a new one
    keys = Counter((r["prompt_index"], r["seed"]) for r in map(json.loads, kept[:5] + kept[6:]))
    assert len(keys) == 6 and max(keys.values()) == 1
    assert samples(out / "pairs") == pairs

    dm = PickAPicDataModule(str(out / "pairs"), batch_size=2, resolution=32, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape[0] == 4  # winners then losers


def test_bad_input_fails_before_sampling(tmp_path, prompt_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert run(tmp_path / "a", empty) == 2
    assert run(tmp_path / "b", prompt_file, "--k", "1") == 2
    args = ["--model", "tiny", "--prompts", str(prompt_file), "--out", str(tmp_path / "c")]
    assert main([*args, "--reward", "no-such-reward"]) == 2
    assert not (tmp_path / "c" / "images").exists()
    assert run(tmp_path / "d", prompt_file, "--kto", "1.5") == 2


def test_another_reward_may_not_reuse_the_scores(tmp_path, prompt_file):
    out = tmp_path / "gen"
    assert run(out, prompt_file) == 0
    args = ["--model", "tiny", "--prompts", str(prompt_file), "--out", str(out), "--k", "3"]
    assert main([*args, "--steps", "2", "--reward", "jpeg-incompressibility"]) == 2


def row(index, seed, score):
    return {"prompt_index": index, "seed": seed, "score": score, "scores": {}}


def test_pair_and_single_plans_by_hand():
    groups = {0: [row(0, 1, 0.9), row(0, 0, 0.5), row(0, 2, 0.45)], 1: [row(1, 0, 0.2)]}
    skipped = Counter()
    best_worst = plan_pairs(groups, "best-worst", 0.0, skipped)
    assert [(i, b["seed"], w["seed"]) for i, b, w in best_worst] == [(0, 1, 2)]
    assert skipped == {"too_few_images": 1}
    skipped = Counter()
    every = plan_pairs({0: groups[0]}, "all", 0.1, skipped)
    assert [(b["seed"], w["seed"]) for _, b, w in every] == [(1, 0), (1, 2)]
    assert skipped == {"tie": 1}  # 0.5 vs 0.45: within the margin
    tied = {0: [row(0, 0, 1.0), row(0, 1, 1.0)]}
    skipped = Counter()
    assert plan_singles(tied, 0.5, skipped) == [] and skipped == {"all_tied": 1}
    labels = [d for _, _, d in plan_singles({0: groups[0]}, 0.5, Counter())]
    assert labels == [True, True, False]  # ceil(0.5 * 3) = 2 desirable
    assert math.ceil(0.5 * 3) == 2
