"""The user's entry points: `align fit` end to end on the tiny default, resume,
composition, start-up errors."""

import csv
import glob
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/dpo/tiny.yaml")


def fit(tmp_path, shards, *extra):
    """Run `align fit` on the tiny config in-process, in tmp_path, on the given shards."""
    args = [
        "fit",
        "--config",
        TINY,
        "--data.train_shards",
        str(shards),
        "--data.val_shards",
        "null",
        "--data.num_workers",
        "0",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "null",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps",
        "2",
        "--data.seed",
        "2",
        *extra,
    ]  # data seed 2: the first batches of pair_shards hold ties (counted)
    return main(args)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, pair_shards):
    tmp = tmp_path_factory.mktemp("run")
    cwd = Path.cwd()
    try:
        import os

        os.chdir(tmp)
        fit(tmp, pair_shards)
    finally:
        os.chdir(cwd)
    return tmp


def test_fit_writes_every_artifact(finished_run):
    runs = glob.glob(str(finished_run / "logs/align-dpo/*/"))
    assert len(runs) == 1
    run = Path(runs[0])  # every artifact under the run directory, named method-model-time
    assert run.name.startswith("dpo-tiny-")
    assert (run / "config.yaml").exists() and "DPOModule" in (run / "config.yaml").read_text()
    assert (run / "checkpoints/last.ckpt").exists()
    assert (run / "export/final/model_index.json").exists() and (run / "export/final/unet").is_dir()
    assert glob.glob(str(run / f"wandb/offline-run-*-{run.name}"))  # the run name is the wandb id
    assert len(list((run / "images").glob("step-*/*.png"))) == 4  # policy | reference panels
    rows = list(csv.DictReader(open(run / "csv/version_0/metrics.csv")))
    logged = set().union(*(r.keys() for r in rows))
    for name in (
        "train/loss",
        "train/implicit_acc",
        "train/reward_margin",
        "train/policy_err",
        "train/ref_err",
        "train/grad_norm",
        "train/device/samples_per_sec",
    ):
        assert name in logged, name
    assert any(k.startswith("lr-") for k in logged)
    assert any(k.startswith("train/skipped/") for k in logged)  # the fixture has ties: counted


def test_checkpoint_holds_only_trainable_weights_and_resumes(
    finished_run, pair_shards, monkeypatch
):
    ckpt_path = next(finished_run.glob("logs/align-dpo/*/checkpoints/last.ckpt"))
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 4
    assert all(k.startswith("unet.") for k in ckpt["state_dict"])
    monkeypatch.chdir(finished_run)
    fit(finished_run, pair_shards, "--ckpt_path", str(ckpt_path), "--trainer.max_steps", "6")
    # the same run continues: same directory, a second CSV version, the same wandb run id
    run = ckpt_path.parent.parent
    assert [p.parent.parent for p in finished_run.glob("logs/*/*/checkpoints/last.ckpt")] == [run]
    assert torch.load(ckpt_path, weights_only=False, map_location="cpu")["global_step"] == 6
    assert (run / "csv/version_1/metrics.csv").is_file()
    assert len(list((run / "wandb").glob(f"offline-run-*-{run.name}"))) == 2


def test_configs_compose_override_and_interpolate(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "model:\n  init_args:\n    caption_dropout: 0.5\n"
        "data:\n  init_args:\n    batch_size: 3\n    val_batches: ${data.init_args.batch_size}\n"
    )
    with pytest.raises(SystemExit) as done:
        main(
            [
                "fit",
                "--config",
                TINY,
                "--config",
                str(ROOT / "configs/trainer/cpu.yaml"),
                "--config",
                str(extra),
                "--model.beta",
                "2000",
                "--print_config",
            ]
        )
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "beta: 2000" in out and "caption_dropout: 0.5" in out and "val_batches: 3" in out


@pytest.mark.parametrize(
    "flag,expect",
    [
        (
            ["--data.train_shards", "/nowhere/shards-{000..009}.tar"],
            "no shards match '/nowhere/shards-{000..009}.tar'",
        ),
        (["--model.model", "/nowhere/model"], "model '/nowhere/model'"),
        (["--model.model", "tiny-xxl"], "known presets"),
    ],
)
def test_bad_paths_fail_at_start_with_the_name(flag, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", TINY, *flag])
    assert expect in str(err.value.code)
    assert not (tmp_path / "logs").exists()  # nothing ran


def test_unknown_config_key_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", TINY, "--model.betta", "3"])
    assert err.value.code != 0 and "betta" in capsys.readouterr().err


def test_tool_commands_are_listed():
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", "data", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "synthetic" in proc.stdout
