"""The demo end to end at toy scale (structure: base -> judged shards in the real schemas -> every
method's configs/demo config through `align fit` -> report). The checks that the methods work, at a
smaller scale than the report, are in ``test_demo_scale.py`` (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align.demo import world
from align.demo.base import BaseConfig
from align.demo.prefs import build_records, pair_samples, single_samples, write_pairs, write_singles
from align.demo.run import FLOW_METHODS, DemoConfig, batch_of, run_demo, steps


def _rendered_records(n: int = 6, k: int = 3):
    """Judge records over rendered images: image j of caption i is correct for j == 0,
    else partly wrong."""
    import random

    rng = random.Random(0)
    captions, images = [], []
    for _ in range(n):
        scene = world.random_scene(rng, min_objects=2)
        captions.append(world.caption(scene))
        images.append(np.asarray(world.render(scene)))
        for j in range(1, k):
            images.append(
                np.asarray(world.render(world.noisy_scene(scene, rng, p_color=1.0, p_shape=0.0)))
            )
    return build_records(captions, np.stack(images), k)


def test_best_worst_pairs_keep_each_captions_best_and_worst_image():
    from align.demo.prefs import caption_pairs

    assert caption_pairs([0.5, 1.0, 0.25, 1.0], best_worst=True) == [(1, 2)]  # first of equals
    assert caption_pairs([0.5, 0.5, 0.5], best_worst=True) == []  # all tie: no pair
    assert caption_pairs([0.5, 1.0, 0.25]) == [(0, 1), (0, 2), (1, 2)]
    scores = np.array([[1.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.5, 1.0, 0.5]])
    rec = {
        "captions": ["a", "b", "c"],
        "images": np.zeros((12, 2, 2, 3), np.uint8),
        "scores": scores.ravel(),
        "per_caption": 4,
    }
    pairs = pair_samples(rec, best_worst=True)
    assert [(p["caption"], p["image_0_uid"], p["image_1_uid"], p["label_0"]) for p in pairs] == [
        ("a", "shapes-0000000", "shapes-0000003", 1.0),
        ("c", "shapes-0000010", "shapes-0000008", 1.0),
    ]
    assert [p["label_0"] for p in pair_samples(rec, flipped=True, best_worst=True)] == [0.0, 0.0]


def test_the_flow_demo_pairs_the_best_and_worst_of_16_images_and_judges_32_seeds():
    flow, unet = DemoConfig(base=BaseConfig(family="sd3")), DemoConfig()
    assert (flow.images_per_caption, flow.best_worst_pairs) == (16, True)
    assert (unet.images_per_caption, unet.best_worst_pairs) == (4, False)
    assert flow.eval_seeds == tuple(range(1000, 1032)) and unet.eval_seeds[-1] == 1007
    assert DemoConfig(images_per_caption=3, best_worst_pairs=True).images_per_caption == 3


def test_pairs_and_singles_follow_the_judge_and_flip(tmp_path):
    from align.data.kto import KTODataModule
    from align.data.pickapic import PickAPicDataModule

    rec = _rendered_records()
    pairs = pair_samples(rec)
    assert len(pairs) == 6 * 3
    for p in pairs:
        assert p["label_0"] == (
            0.5 if p["score_0"] == p["score_1"] else float(p["score_0"] > p["score_1"])
        )
    flipped = pair_samples(rec, flipped=True)
    assert [f["label_0"] for f in flipped] == [
        p["label_0"] if p["label_0"] == 0.5 else 1 - p["label_0"] for p in pairs
    ]
    shuffled = pair_samples(
        _rendered_records(n=40), shuffled_seed=0
    )  # random winners, same images and ties
    truth = pair_samples(_rendered_records(n=40))
    kept = [s["label_0"] == t["label_0"] for s, t in zip(shuffled, truth) if t["label_0"] != 0.5]
    assert 0.3 < sum(kept) / len(kept) < 0.7
    assert all(s["label_0"] == 0.5 for s, t in zip(shuffled, truth) if t["label_0"] == 0.5)
    assert all(
        s["image_0_uid"] == t["image_0_uid"] and s["label_0"] + s["label_1"] == 1
        for s, t in zip(shuffled, truth)
    )
    assert [s["label_0"] for s in pair_samples(_rendered_records(n=40), shuffled_seed=0)] == [
        s["label_0"] for s in shuffled
    ]
    singles = single_samples(rec)
    assert [s["label"] for s in singles] == [bool(s == 1.0) for s in rec["scores"]]
    many = _rendered_records(n=40)
    true_labels = [s["label"] for s in single_samples(many)]
    random_labels = [
        s["label"] for s in single_samples(many, shuffled_seed=0)
    ]  # permuted: same class sizes
    assert sum(random_labels) == sum(true_labels) and random_labels != true_labels
    assert random_labels == [s["label"] for s in single_samples(many, shuffled_seed=0)]
    assert [s["label"] for s in single_samples(rec, flipped=True)] == [
        not s["label"] for s in singles
    ]

    write_pairs(tmp_path / "pairs", pairs, shards=2)
    dm = PickAPicDataModule(
        train_shards=str(tmp_path / "pairs"),
        batch_size=4,
        resolution=32,
        crop="center",
        flip_prob=0.0,
        num_workers=0,
        batches_per_epoch=2,
        shuffle_buffer=0,
    )
    from align.demo.judge import judge

    for batch in dm.train_dataloader():
        b = len(batch["caption"])
        px = (
            ((batch["pixel_values"] + 1) * 127.5)
            .round()
            .clamp(0, 255)
            .byte()
            .permute(0, 2, 3, 1)
            .numpy()
        )
        for i, cap in enumerate(
            batch["caption"]
        ):  # winners first, and the winner is the one the judge prefers
            assert judge(px[i], cap).value > judge(px[b + i], cap).value
    write_singles(tmp_path / "singles", singles, shards=2)
    kd = KTODataModule(
        shards=str(tmp_path / "singles"),
        batch_size=4,
        resolution=32,
        crop="center",
        flip_prob=0.0,
        num_workers=0,
        batches_per_epoch=2,
        p_desirable=0.5,
    )
    for batch in kd.train_dataloader():
        px = (
            ((batch["pixel_values"] + 1) * 127.5)
            .round()
            .clamp(0, 255)
            .byte()
            .permute(0, 2, 3, 1)
            .numpy()
        )
        for i, cap in enumerate(batch["caption"]):
            assert (judge(px[i], cap).value == 1.0) == bool(batch["desirable"][i])


def test_demo_runs_end_to_end_at_toy_scale(tmp_path):
    import csv

    torch.set_num_threads(1)
    sampler = ["--model.init_args.num_steps", "2", "--model.init_args.grad_steps", "1"]
    cfg = DemoConfig(
        out=str(tmp_path / "report"),
        artifacts=str(tmp_path / "art"),
        seeds=2,
        base=BaseConfig(scenes=64, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, threads=1),
        pref_captions=8,
        images_per_caption=3,
        pref_source="rendered",
        eval_captions=3,
        eval_seeds=(0, 1),
        curve_seeds=1,
        eval_every=1,
        sample_steps=2,
        long_scenes=8,
        fit_args={
            "*": steps(2) + batch_of(2),
            "rft": sampler,
            "rft-clip": steps(3),
            "preference-model": steps(2),
        },
        workers=2,
    )
    cfg.methods += ("dpo-shuffled", "kto-shuffled")  # not default methods
    summary = run_demo(cfg)
    for name in ("README.md", "judge_curves.png", "samples.png", "demo.json"):
        assert (tmp_path / "report" / name).is_file()
    data = json.loads((tmp_path / "report" / "demo.json").read_text())
    assert set(data["results"]) == {
        "dpo",
        "dpo-flipped",
        "kto",
        "kto-flipped",
        "sft-segment",
        "sft-truncate",
        "rft-judge",
        "rft-clip",
        "dpo-shuffled",
        "kto-shuffled",
    }
    assert data["eval_sets"]["sft-segment"].startswith("long captions")
    assert all(
        [r["seed"] for r in runs] == [0, 1] for runs in data["results"].values()
    )  # job order kept
    assert set(data["base_long_score"]) == {"segment", "truncate"}
    assert (tmp_path / "art" / "preference_model" / "export").is_dir()
    for method, runs in data["results"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        n = 3 if method == "rft-clip" else 2  # rft-clip has its own settings
        assert [s for s, _ in runs[0]["curve"]] == list(range(n + 1))  # judged every step
        assert all(r["final"] is not None for r in runs)
    assert set(data["curve_baselines"]) == set(data["results"])
    assert all(len(r["caption_scores"]) == 3 for runs in data["results"].values() for r in runs)
    assert all(len(v) == 3 for v in data["caption_baselines"].values())
    report = (tmp_path / "report" / "README.md").read_text()
    assert "2 judging SE" in report and "dpo-shuffled: " in report and "| dpo |" in report
    assert "align fit --config" in report and "configs/demo/rft_clip.yaml" in report
    assert (tmp_path / "art" / "base" / "model_index.json").is_file()
    assert (tmp_path / "art" / "prefs" / "pairs-flipped" / "pairs-000000.tar").is_file()
    assert (tmp_path / "art" / "prefs" / "pairs-shuffled" / "pairs-000000.tar").is_file()
    assert (tmp_path / "art" / "prefs" / "singles-shuffled" / "singles-000000.tar").is_file()
    assert 0.0 <= summary["base_score"] <= 1.0
    # every run is an `align fit` run: its resolved config, its metrics and its diffusers export
    runs = tmp_path / "art" / "runs"
    config = (runs / "dpo-flipped" / "seed1" / "config.yaml").read_text()
    assert "DPOModule" in config and "pairs-flipped" in config and "seed_everything: 1" in config
    assert "prompt_encoder: clip" in (runs / "sft-truncate" / "seed0" / "config.yaml").read_text()
    rows = list(csv.DictReader(open(runs / "rft-judge" / "seed0" / "metrics.csv")))
    rewards = [float(r["train/reward_mean"]) for r in rows if r.get("train/reward_mean")]
    assert len(rewards) == 2 and all(0.0 <= x <= 1.0 for x in rewards)
    assert any(r.get("demo/judge") for r in rows)
    assert (
        runs / "rft-judge" / "seed0" / "export" / "final" / "pytorch_lora_weights.safetensors"
    ).is_file()
    assert (runs / "dpo" / "seed0" / "export" / "final" / "model_index.json").is_file()


def test_jobs_start_longest_first_and_otherwise_keep_their_order():
    from align.demo.run import longest_first

    jobs = [(m, s) for m in ("dpo", "kto", "rft-judge", "sft-segment", "rft-clip") for s in (0, 1)]
    assert longest_first(jobs) == [
        ("rft-judge", 0),
        ("rft-judge", 1),
        ("rft-clip", 0),
        ("rft-clip", 1),
        ("dpo", 0),
        ("dpo", 1),
        ("kto", 0),
        ("kto", 1),
        ("sft-segment", 0),
        ("sft-segment", 1),
    ]


def test_validation_captions_and_seeds_are_disjoint_from_training_and_from_the_test_set():
    from align.demo.run import caption_sets, judged_seeds

    train, test = caption_sets(DemoConfig())
    val_train, val = caption_sets(DemoConfig(eval_set="validation"))
    assert len(test) == 64 and 0 < len(val) <= 64
    assert not set(val) & set(test)
    assert not set(val_train) & (set(val) | set(test))
    assert train == val_train  # what is tuned on validation is what the report trains
    assert not set(judged_seeds(DemoConfig(eval_set="validation"))) & set(
        judged_seeds(DemoConfig())
    )
    with pytest.raises(ValueError, match="eval_set"):
        run_demo(DemoConfig(eval_set="train"))


def test_held_out_captions_are_drawn_from_the_whole_pool():
    """Held-out and training captions both mix one- and two-object scenes. The pool's first quarter
    (its most frequent captions) held 29 of its 32 one-object captions: as the held-out set, it left
    training 3 of them."""
    from align.demo.judge import parse_caption
    from align.demo.run import caption_sets

    def one_object_share(captions):
        return sum(len(parse_caption(c)) == 1 for c in captions) / len(captions)

    train, test = caption_sets(DemoConfig())
    val = caption_sets(DemoConfig(eval_set="validation"))[1]
    assert abs(one_object_share(test) - one_object_share(val)) < 0.1
    assert one_object_share(test) < 0.2  # the pool: 32 of 414
    assert sum(len(parse_caption(c)) == 1 for c in set(train)) > 16


def test_demo_command_line_overrides():
    from align.commands.demo import demo_config, parser
    from align.demo.run import QUICK_ARGS, fit_args

    cfg = demo_config(parser().parse_args([]))
    assert cfg.eval_set == "test" and cfg.eval_every == 0 and cfg.fit_args == {}
    cfg = demo_config(
        parser().parse_args(
            [
                "--eval-set",
                "validation",
                "--eval-every",
                "50",
                "--batch-size",
                "4",
                "--steps",
                "7",
                "--methods",
                "dpo,kto",
                "--lr",
                "1e-3",
            ]
        )
    )
    assert cfg.eval_set == "validation" and cfg.eval_every == 50 and cfg.methods == ("dpo", "kto")
    for method in ("sft-segment", "rft-judge", "rft-clip"):
        assert fit_args(cfg, method) == steps(7) + batch_of(4)
    lr = ["--model.init_args.optimizer.init_args.lr", "0.001"]
    assert fit_args(cfg, "dpo") == fit_args(cfg, "kto-flipped") == steps(7) + batch_of(4) + lr
    quick = demo_config(parser().parse_args(["--quick", "--steps", "5"]))
    assert fit_args(quick, "dpo") == steps(5) + QUICK_ARGS["dpo"] + steps(5)  # the override wins
    assert fit_args(quick, "preference-model") == QUICK_ARGS["preference-model"]
    with pytest.raises(SystemExit):
        parser().parse_args(["--eval-set", "train"])
    flow = demo_config(parser().parse_args(["--family", "sd3"]))
    assert flow.base.family == "sd3" and flow.artifacts == "artifacts/shapes-sd3"
    assert flow.methods == FLOW_METHODS
    quick_flow = demo_config(parser().parse_args(["--family", "sd3", "--quick"]))
    assert quick_flow.artifacts == "artifacts/shapes-sd3-quick"
    assert quick_flow.base.family == "sd3"


def test_base_only_trains_or_reuses_the_family_base_and_runs_nothing_else(monkeypatch, capsys):
    import align.demo.base
    import align.demo.run
    from align.commands.demo import main

    built = []
    monkeypatch.setattr(align.demo.base, "build_base", lambda out, cfg: built.append((out, cfg)))
    monkeypatch.setattr(align.demo.run, "run_demo", lambda *a, **k: pytest.fail("ran the demo"))
    assert main(["--family", "sd3", "--base-only"]) == 0
    ((out, cfg),) = built
    assert out == "artifacts/shapes-sd3/base" and cfg == BaseConfig(family="sd3")


def test_the_flow_base_refuses_the_methods_it_does_not_run(tmp_path):
    cfg = DemoConfig(
        artifacts=str(tmp_path), base=BaseConfig(family="sd3"), methods=("sft-segment",)
    )
    with pytest.raises(ValueError, match="sd3 base runs dpo.*sft-segment"):
        run_demo(cfg)


def test_the_flow_base_accepts_the_label_free_controls(tmp_path, monkeypatch):
    import align.demo.run

    class Started(Exception):
        """Raised where the demo would build its base: the method check has passed."""

    def build_base(*args):
        raise Started

    monkeypatch.setattr(align.demo.run, "build_base", build_base)
    cfg = DemoConfig(
        artifacts=str(tmp_path),
        out=str(tmp_path / "report"),
        base=BaseConfig(family="sd3"),
        methods=("dpo", "dpo-shuffled", "kto-shuffled"),
    )
    with pytest.raises(Started):  # past the method check
        run_demo(cfg)
    args = align.demo.run.job_args(cfg, "dpo-shuffled", 0)
    assert f"{tmp_path}/prefs/pairs-shuffled" in args
    assert any(a.endswith("configs/demo/sd3/dpo.yaml") for a in args)  # the flow layer too


def test_flow_grpo_samples_12_images_per_caption_with_flow_grpos_kl_and_noise_level(capsys):
    """The flow layer over the shared GRPO config: a group of 12 (6 left the seeds as far apart as
    the gain), Flow-GRPO's KL coefficient and SDE noise level; the rest is the shared config's."""
    import yaml

    from align.cli import main
    from align.demo.run import CONFIGS

    layers = [CONFIGS / "grpo.yaml", CONFIGS / "sd3" / "grpo.yaml"]
    with pytest.raises(SystemExit):
        main(["fit", *(a for c in layers for a in ("--config", str(c))), "--print_config"])
    args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert (args["group_size"], args["kl_beta"], args["eta"]) == (12, 0.04, 0.7)
    assert (args["num_steps"], args["lora_rank"], args["updates"]) == (10, 8, 2)


@pytest.mark.slow
def test_the_flow_base_runs_dpo_kto_and_grpo_through_the_same_configs(tmp_path):
    torch.set_num_threads(1)
    cfg = DemoConfig(
        out=str(tmp_path / "report"),
        artifacts=str(tmp_path / "art"),
        seeds=1,
        base=BaseConfig(
            family="sd3", scenes=64, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, threads=1
        ),
        pref_captions=8,
        images_per_caption=3,
        pref_source="rendered",
        eval_captions=2,
        eval_seeds=(0,),
        sample_steps=2,
        fit_args={
            "*": steps(2) + batch_of(2),
            "grpo": ["--model.init_args.group_size", "2", "--model.init_args.num_steps", "2"],
        },
        methods=("dpo", "kto", "grpo-flipped"),
        workers=1,
    )
    summary = run_demo(cfg)
    assert set(summary["results"]) == {"dpo", "kto", "grpo-flipped"}
    runs = tmp_path / "art" / "runs"
    for method in summary["results"]:
        config = (runs / method / "seed0" / "config.yaml").read_text()
        assert "art/base" in config and (runs / method / "seed0" / "judge.json").is_file()
    export = runs / "dpo" / "seed0" / "export" / "final"
    assert json.loads((export / "model_index.json").read_text())["transformer"][1] == (
        "SD3Transformer2DModel"
    )
    # the flow model's own settings over the shared config
    assert "configs/demo/sd3/grpo.yaml" in summary["commands"]["grpo-flipped"]
    assert "eta: 0.7" in (runs / "grpo-flipped" / "seed0" / "config.yaml").read_text()
    assert "max_sequence_length: 77" in (runs / "dpo" / "seed0" / "config.yaml").read_text()
    report = (tmp_path / "report" / "README.md").read_text()
    assert "flow-matching (SD3-shaped) base" in report and "flow Euler 2 steps" in report


def test_verdicts_compare_dpo_and_its_flipped_control_with_random_winners():
    from align.demo.report import verdict

    runs = lambda *finals: [{"final": f} for f in finals]  # noqa: E731
    results = {
        "dpo": runs(0.570, 0.575),
        "dpo-flipped": runs(0.545, 0.547),
        "dpo-shuffled": runs(0.550, 0.552),
    }
    # dpo: mean 0.5725, sd 0.0035; shuffled 0.551, sd 0.0014; flipped 0.546, sd 0.0014; base 0.55
    assert verdict("dpo", results["dpo"], 0.55, results) == (
        "raises the score by 0.0225 (2 sd = 0.0071); expected up: yes; beats dpo-shuffled (0.5510) "
        "by 0.0215: yes"
    )
    assert verdict("dpo-flipped", results["dpo-flipped"], 0.55, results) == (
        "lowers the score by 0.0040 (2 sd = 0.0028); expected down: yes; falls below dpo-shuffled "
        "(0.5510) by "
        "0.0050: yes"
    )
    assert verdict("dpo-shuffled", results["dpo-shuffled"], 0.55, results).endswith(
        "control (no expectation)"
    )
    close = {**results, "dpo-flipped": runs(0.549, 0.551)}  # 0.550 vs 0.551: within 2 sd
    assert verdict("dpo-flipped", close["dpo-flipped"], 0.55, close).endswith(
        "falls below dpo-shuffled (0.5510) by 0.0010: NOT shown at this scale"
    )
    assert "dpo-shuffled" not in verdict("dpo", results["dpo"], 0.55, {"dpo": results["dpo"]})


def judge_set(tmp_path, seeds, every):
    path = tmp_path / "judge.json"
    path.write_text(
        json.dumps(
            {
                "short": ["a", "b"],
                "long": [],
                "seeds": seeds,
                "every": every,
                "curve_seeds": 2,
                "steps": 2,
                "guidance": 4.0,
            }
        )
    )
    return str(path)


def test_judge_curve_judges_points_on_the_first_seeds_and_the_end_on_all(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from align.demo.callback import ShapesJudge
    from align.demo.evaluate import first_seeds_score

    # caption-major scores of 2 captions x 4 seeds: first two seeds of each caption 1, 0 / 1,
    # 1 -> 0.75
    assert first_seeds_score([1, 0, 0, 0, 1, 1, 0, 1], 4, 2) == 0.75
    assert first_seeds_score([1, 0, 0, 0, 1, 1, 0, 1], 4, None) == 0.5
    calls = []

    def evaluate_fn(module, seeds):  # a model whose score per image is its seed / 10, on 2 captions
        calls.append(list(seeds))
        return {
            "score": float(np.mean(seeds)) / 10,
            "scores": np.array([s / 10 for _ in range(2) for s in seeds]),
            "images": np.zeros((2 * len(seeds), 2, 2, 3), np.uint8),
            "seconds": 0.0,
        }

    curve = ShapesJudge(judge_set(tmp_path, [1, 2, 3, 4], every=2))
    monkeypatch.setattr(curve, "evaluate", evaluate_fn)
    trainer = SimpleNamespace(global_step=0, max_steps=4, loggers=[], log_dir=str(tmp_path / "run"))
    for step in range(1, 5):
        trainer.global_step = step
        curve.on_train_batch_end(trainer, None, None, None, step - 1)
    curve.on_train_end(trainer, None)
    assert calls == [
        [1, 2],
        [1, 2, 3, 4],
    ]  # step 2 on the curve's seeds; step 4 once, on all of them
    assert [s for s, _ in curve.curve] == [2, 4]
    assert [v for _, v in curve.curve] == pytest.approx([0.15, 0.15])
    assert curve.final == pytest.approx(0.25)
    written = json.loads((tmp_path / "run" / "judge.json").read_text())
    assert written["final"] == pytest.approx(0.25) and written["caption_scores"] == pytest.approx(
        [0.25, 0.25]
    )
    with pytest.raises(FileNotFoundError, match="align demo"):
        ShapesJudge(str(tmp_path / "nowhere.json"))


def test_verdicts_also_require_the_change_beyond_two_judging_standard_errors():
    from align.demo.report import judging_error, verdict

    runs = [
        {"final": 0.6, "caption_scores": [0.6, 0.5, 0.7]},
        {"final": 0.6, "caption_scores": [0.6, 0.7, 0.5]},
    ]
    # per caption, mean over the two seeds: 0.6, 0.6, 0.6; minus the base's 0.5, 0.6, 0.4: 0.1, 0.0,
    # 0.2 -> sd 0.1, judging SE 0.1 / sqrt(3) = 0.0577; the change, +0.1, is beyond 2 sd
    # (0) but not 2 SE (0.1155)
    assert judging_error(runs, [0.5, 0.6, 0.4]) == pytest.approx(0.1 / np.sqrt(3))
    assert verdict("dpo", runs, 0.5, {"dpo": runs}, [0.5, 0.6, 0.4]) == (
        "raises the score by 0.1000 (2 sd = 0.0000, 2 judging SE = 0.1155); expected up: NOT "
        "shown: beyond 2 sd "
        "over seeds, within 2 judging SE"
    )
    assert verdict("dpo", runs, 0.5, {"dpo": runs}, [0.55, 0.55, 0.55]).endswith(
        "expected up: yes"
    )  # SE 0
    # against a rival: per-caption differences of the two methods' means
    rival = [
        {"final": 0.5, "caption_scores": [0.5, 0.5, 0.5]},
        {"final": 0.5, "caption_scores": [0.5, 0.5, 0.5]},
    ]
    assert judging_error(runs, rival) == pytest.approx(0.0)
    assert judging_error(runs, None) is None and judging_error([{"final": 0.6}], [0.5, 0.6]) is None


def test_judging_does_not_change_what_training_draws_from_the_random_generators(
    tmp_path, monkeypatch
):
    import random
    from types import SimpleNamespace

    from align.demo.callback import ShapesJudge

    def evaluate_fn(module, seeds):  # a judging that consumes every generator training might use
        torch.rand(3), random.random(), np.random.rand()
        return {
            "score": 0.5,
            "scores": np.full(2 * len(seeds), 0.5),
            "images": None,
            "seconds": 0.0,
        }

    def draws(judge: bool):
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        curve = ShapesJudge(judge_set(tmp_path, [1, 2], every=1 if judge else 0))
        monkeypatch.setattr(curve, "evaluate", evaluate_fn)
        curve.on_train_batch_end(SimpleNamespace(global_step=1, max_steps=2), None, None, None, 0)
        return torch.rand(2).tolist(), random.random(), float(np.random.rand()), len(curve.curve)

    judged, unjudged = draws(True), draws(False)
    assert judged[3] == 1 and unjudged[3] == 0
    assert judged[:3] == unjudged[:3]
