"""Runs that survive and never lie: divergence stops the run, SIGTERM saves it, resume is exact,
checkpoints are replaced atomically (align.callbacks.survival, wired by AlignCLI)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.callbacks.survival import AtomicCheckpointIO, all_finite, setting_differences
from align.lightning_cli import run_lightning_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/dpo/tiny.yaml")


def fit_args(shards, *extra, config=TINY, data_key="train_shards") -> list[str]:
    return [
        "fit",
        "--config",
        config,
        f"--data.{data_key}",
        str(shards),
        "--data.val_shards",
        "null",
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "2",
        "--data.batches_per_epoch",
        "null",
        "--trainer.val_check_interval",
        "null",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        "logs",
        "--trainer.callbacks",
        "[]",
        *extra,
    ]


def losses(run: int = 0) -> list[float]:
    """Training losses of the ``run``-th run started in ``logs/`` (each has its own directory)."""
    found = sorted(
        Path("logs").glob("*/*/csv/version_0/metrics.csv"), key=lambda p: p.stat().st_ctime
    )
    path = found[run]
    return [float(r["train/loss"]) for r in csv.DictReader(open(path)) if r.get("train/loss")]


def test_a_diverged_run_stops_with_an_error_and_writes_nothing_non_finite(
    tmp_path, pair_shards, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_lightning_cli(
            fit_args(
                pair_shards,
                "--model.init_args.optimizer.init_args.lr",
                "1e6",
                "--trainer.max_steps",
                "20",
                "--trainer.callbacks",
                "lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.dirpath",
                "ckpt",
                "--trainer.callbacks.every_n_train_steps",
                "1",
                "--trainer.callbacks.save_last",
                "true",
            )
        )
    message = str(stop.value.code)
    assert "non-finite gradients at step" in message and "learning rate" in message
    saved = list(Path("ckpt").glob("*.ckpt"))
    for path in saved:  # every checkpoint written holds finite weights
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all_finite([t for t in state.values() if t.is_floating_point()]), path


@pytest.mark.parametrize(
    "sig,code", [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 1, marks=pytest.mark.slow)]
)
def test_a_signal_saves_a_resumable_checkpoint_and_exits_non_zero(sig, code, tmp_path, pair_shards):
    cmd = [
        sys.executable,
        "-m",
        "align.cli",
        *fit_args(pair_shards, "--trainer.max_steps", "100000"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = next(tmp_path.glob("logs/*/*/csv/version_0/metrics.csv"), None)
        if metrics is not None and len(metrics.read_text().splitlines()) > 3:
            break
        time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    (saved,) = tmp_path.rglob("last.ckpt")  # in the run's checkpoint folder, named on stderr
    assert str(saved.relative_to(tmp_path)) in err
    ckpt = torch.load(saved, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] >= 1 and not list(tmp_path.rglob(".*.tmp-*"))


@pytest.fixture(scope="module")
def kto_shards(tmp_path_factory):
    from align.data.synthetic import write_synthetic_kto

    out = tmp_path_factory.mktemp("kto")
    write_synthetic_kto(out, 48, 4, 32, 0)
    return out


@pytest.mark.parametrize(
    "method",
    [
        "dpo",
        pytest.param("kto", marks=pytest.mark.slow),
        pytest.param("sft", marks=pytest.mark.slow),
    ],
)
def test_resume_is_exact_step_by_step(method, tmp_path, pair_shards, request, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards, data = {
        "dpo": (pair_shards, {}),
        "kto": (
            request.getfixturevalue("kto_shards"),
            {"config": str(ROOT / "configs/kto/tiny.yaml"), "data_key": "shards"},
        ),
        "sft": (pair_shards, {"config": str(ROOT / "configs/sft/winners_tiny.yaml")}),
    }[method]
    ckpt = [
        "--trainer.callbacks",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        "ckpt",
        "--trainer.callbacks.every_n_train_steps",
        "4",
        "--trainer.callbacks.save_top_k",
        "-1",
    ]
    run_lightning_cli(fit_args(shards, "--trainer.max_steps", "8", *ckpt, **data))
    straight = losses(0)
    resume_from = str(next(Path("ckpt").glob("*step=4.ckpt")))
    run_lightning_cli(
        fit_args(shards, "--trainer.max_steps", "8", "--ckpt_path", resume_from, **data)
    )
    resumed = losses(1)
    assert len(straight) == 8 and len(resumed) == 4
    assert resumed == straight[4:]  # bit-identical on the CPU


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk gone")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk gone"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == good and sorted(p.name for p in path.parent.iterdir()) == [
        "last.ckpt"
    ]


def test_the_temporary_file_is_beside_the_checkpoint_never_in_tmpdir(tmp_path, monkeypatch):
    seen = []
    replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda a, b: seen.append((Path(a), Path(b))) or replace(a, b)
    )
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "ckpt" / "last.ckpt")
    ((src, dst),) = seen
    assert src.parent == dst.parent == tmp_path / "ckpt"


def test_the_guard_skips_non_finite_steps_until_its_patience_runs_out():
    from types import SimpleNamespace

    from align.callbacks.survival import NonFiniteError, NonFiniteGuard

    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([w])
    trainer = SimpleNamespace(
        global_step=7, callback_metrics={"train/loss": torch.tensor(float("nan"))}
    )
    guard = NonFiniteGuard(patience=2)
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    guard.on_before_optimizer_step(trainer, None, optimizer)  # skipped: no gradient left to apply
    assert w.grad is None and guard.in_a_row == 1
    w.grad = torch.ones(3)
    guard.on_before_optimizer_step(trainer, None, optimizer)  # a finite step resets the count
    assert guard.in_a_row == 0 and w.grad is not None
    for _ in range(2):
        w.grad = torch.full((3,), float("inf"))
        try:
            guard.on_before_optimizer_step(trainer, None, optimizer)
        except NonFiniteError as err:
            assert "step 7" in str(err) and "2 step(s) in a row" in str(err)
            break
    else:
        pytest.fail("the second non-finite step in a row did not stop the run")
    # fp16 loss scaling: overflows at a scale >= 1 are the scaler's to skip, below 1 they count
    scale = [2.0**16]
    trainer.precision_plugin = SimpleNamespace(scaler=SimpleNamespace(get_scale=lambda: scale[0]))
    guard = NonFiniteGuard(patience=1)
    w.grad = torch.full((3,), float("inf"))
    guard.on_before_optimizer_step(trainer, None, optimizer)
    assert guard.in_a_row == 0
    scale[0] = 0.5
    with pytest.raises(NonFiniteError):
        guard.on_before_optimizer_step(trainer, None, optimizer)


def test_a_resume_that_changes_fixed_settings_is_refused_naming_each(
    tmp_path, pair_shards, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    ckpt = [
        "--trainer.callbacks",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        "ckpt",
        "--trainer.callbacks.save_last",
        "true",
    ]
    run_lightning_cli(fit_args(pair_shards, "--trainer.max_steps", "2", *ckpt))
    resume = fit_args(pair_shards, "--trainer.max_steps", "3", "--ckpt_path", "ckpt/last.ckpt")
    for change, named in [
        (["--model.init_args.beta", "2000"], "model.beta: checkpoint 50.0, now 2000.0"),
        (
            ["--model.init_args.optimizer.init_args.lr", "3e-5"],
            "learning rate: checkpoint 0.0003, now 3e-05",
        ),
    ]:
        with pytest.raises(SystemExit) as stop:
            run_lightning_cli(resume + change)
        assert named in str(stop.value.code) and "model.optimizer" not in str(stop.value.code)
    # a performance switch may change, and so may max_steps
    cli = run_lightning_cli(resume + ["--model.init_args.gradient_checkpointing", "true"])
    assert cli.trainer.global_step == 3


def test_a_run_without_checkpoints_is_preempted_into_its_run_directory(tmp_path):
    from types import SimpleNamespace

    from align.callbacks.survival import Preemption

    logger = SimpleNamespace(save_dir=str(tmp_path / "runs"), name="dpo", version="seed0")
    trainer = SimpleNamespace(checkpoint_callback=None, loggers=[logger], default_root_dir=".")
    path = Preemption.checkpoint_path(trainer)
    assert path == tmp_path / "runs" / "dpo" / "seed0" / "checkpoints" / "last.ckpt"
    logger.version = 3
    assert Preemption.checkpoint_path(trainer).parent.parent.name == "version_3"
    trainer.checkpoint_callback = SimpleNamespace(dirpath=str(tmp_path / "ckpt"))
    assert Preemption.checkpoint_path(trainer) == tmp_path / "ckpt" / "last.ckpt"


def test_a_setting_read_back_from_a_checkpoint_as_a_list_is_not_a_change():
    # the parser gives timestep_range as a tuple, the checkpoint's hyperparameters as a list
    saved = {"timestep_range": [0, 500], "beta": 10.0}
    assert setting_differences(saved, {"timestep_range": (0, 500), "beta": 10.0}) == []
    assert setting_differences(saved, {"timestep_range": (0, 400), "beta": 10.0}) == [
        "model.timestep_range: checkpoint [0, 500], now (0, 400)"
    ]
