"""Training-curve readers: Lightning's CSVLogger files and wandb offline run files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from align.eval.curves import find_run, read_curves


def test_lightning_csv_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run")
    for step in range(6):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "epoch": 0}, step=step)
        if step % 3 == 2:
            logger.log_metrics({"val/loss": 0.5 - 0.1 * step}, step=step)
    logger.save()
    kind, where = find_run(tmp_path)
    assert kind == "csv" and where.name == "metrics.csv"
    curves = read_curves(tmp_path)
    assert set(curves) == {"train/loss", "val/loss"}
    steps, values = curves["train/loss"]
    assert steps == [0, 1, 2, 3, 4, 5] and values[3] == pytest.approx(0.25)
    assert curves["val/loss"] == ([2.0, 5.0], [pytest.approx(0.3), pytest.approx(0.0)])


def test_wandb_offline_run(tmp_path):
    script = (
        "import wandb\n"
        f"run = wandb.init(mode='offline', project='p', dir={str(tmp_path)!r})\n"
        "for i in range(300):\n"
        "    run.log({'train/loss': 1.0 / (i + 1), 'note': 'text', 'train/long_name_' + 'x' * 40: "
        "float(i)}, step=i)\n"
        "    if i % 100 == 0:\n"
        "        run.log({'val/acc': i / 300}, step=i)\n"
        "run.finish()\n"
    )
    env = {
        "WANDB_SILENT": "true",
        "WANDB_MODE": "offline",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    subprocess.run(
        [sys.executable, "-c", script], check=True, env=env, timeout=120, capture_output=True
    )
    kind, where = find_run(tmp_path / "wandb")
    assert kind == "wandb" and where.name.startswith("offline-run-")
    curves = read_curves(tmp_path)
    # strings are not curves
    assert set(curves) == {"train/loss", "val/acc", "train/long_name_" + "x" * 40}
    steps, values = curves["train/loss"]
    # records span several 32 KiB blocks
    assert steps == list(range(300)) and values[9] == pytest.approx(0.1)
    assert curves["val/acc"][0] == [0, 100, 200]


def test_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Lightning metrics.csv and no wandb run"):
        read_curves(tmp_path)
