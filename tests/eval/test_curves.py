"""Training curves of a run directory: the readers (Lightning CSV, wandb offline file), where a
run's metrics are found in the layouts `align fit` writes, the method's panels, the figure."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from align.eval.curves import (
    find_run,
    moving_average,
    newest_run,
    open_run,
    panels,
    plot_run,
    read_curves,
)

DPO_METRICS = ["train/loss", "train/implicit_acc", "train/reward_margin", "train/policy_err"]
KTO_METRICS = ["train/loss", "train/reward_desirable", "train/reward_undesirable", "train/ref_err"]


def write_metrics(path, metrics, steps=10, lr=True, grad_norm=True, val_every=5):
    """A metrics.csv as Lightning's CSVLogger writes it: one row per log call, empty cells for the
    metrics not logged in that call, the learning-rate monitor in rows of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    train = [*metrics, *(["train/grad_norm"] if grad_norm else [])]
    val = [m.replace("train/", "val/") for m in metrics]
    columns = ["epoch", *(["lr-AdamW"] if lr else []), "step", *train, *val]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for step in range(steps):
            if lr:
                writer.writerow({"lr-AdamW": 1e-5 * min(1, (step + 1) / 5), "step": step})
            writer.writerow({"epoch": 0, "step": step, **{m: 1.0 / (step + 1) for m in train}})
            if step % val_every == val_every - 1:
                writer.writerow({"epoch": 0, "step": step, **{m: 0.5 for m in val}})
    return path


def write_config(run_dir, class_path):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        f"seed_everything: 0\nmodel:\n  class_path: {class_path}\n  init_args:\n    beta: 5000\n"
    )
    return run_dir


@pytest.fixture
def run_dirs(tmp_path):
    """Run directories in the layout `align fit` writes: <run>/config.yaml + <run>/metrics.csv."""
    runs = {}
    for method, module, metrics in (
        ("dpo", "align.modules.DPOModule", DPO_METRICS),
        ("kto", "align.modules.KTOModule", KTO_METRICS),
        ("sft", "align.modules.SFTModule", ["train/loss", "train/err"]),
    ):
        run = write_config(tmp_path / "logs" / f"align-{method}" / "version_0", module)
        write_metrics(run / "metrics.csv", metrics, lr=method != "sft")
        (run / "checkpoints").mkdir()
        runs[method] = run
    return runs


def test_each_method_shows_its_curves(run_dirs):
    dpo = open_run(run_dirs["dpo"])
    assert dpo.method == "dpo" and dpo.sources == [run_dirs["dpo"] / "metrics.csv"]
    assert panels(dpo) == [
        ("loss", ["train/loss", "val/loss"]),
        ("implicit accuracy", ["train/implicit_acc", "val/implicit_acc"]),
        ("reward margin", ["train/reward_margin", "val/reward_margin"]),
        ("learning rate", ["lr-AdamW"]),
        ("grad norm", ["train/grad_norm"]),
    ]
    kto = open_run(run_dirs["kto"])
    assert kto.method == "kto"
    assert [title for title, _ in panels(kto)] == [
        "loss",
        "class rewards",
        "learning rate",
        "grad norm",
    ]
    assert panels(kto)[1][1] == [
        "train/reward_desirable",
        "val/reward_desirable",
        "train/reward_undesirable",
        "val/reward_undesirable",
    ]
    sft = open_run(run_dirs["sft"])  # no learning-rate monitor: no panel for it
    assert sft.method == "sft"
    assert panels(sft) == [("loss", ["train/loss", "val/loss"]), ("grad norm", ["train/grad_norm"])]
    summary = dpo.summary()
    assert "method dpo" in summary and "train/reward_margin" in summary
    assert "train/policy_err" not in summary  # logged, not one of the curves that matter


def test_csv_values_and_steps(run_dirs):
    curves = read_curves(run_dirs["dpo"])
    assert curves["train/loss"][0] == list(range(10))
    assert curves["train/loss"][1][3] == pytest.approx(0.25)
    assert curves["val/loss"][0] == [4.0, 9.0]
    assert curves["lr-AdamW"][1][-1] == pytest.approx(1e-5)


def test_method_from_metrics_when_the_config_names_another_module(tmp_path):
    run = write_config(tmp_path / "run", "my_lab.MyDPOVariant")
    write_metrics(run / "metrics.csv", KTO_METRICS)
    assert open_run(run).method == "kto"


def test_csv_logger_beside_the_run_directory(tmp_path):
    """The layout where the run directory is logs/align-dpo/<wandb id>/ and the CSV logger writes
    logs/csv/version_N/: the version written while the run ran is the run's."""
    logs = tmp_path / "logs"
    old = write_metrics(logs / "csv/version_0/metrics.csv", ["train/loss"], steps=3)
    mine = write_metrics(logs / "csv/version_1/metrics.csv", DPO_METRICS)
    later = write_metrics(logs / "csv/version_2/metrics.csv", ["train/loss"], steps=2)
    run = write_config(logs / "align-dpo/5n3fs5xl", "align.modules.DPOModule")
    hour = 3600.0
    for path, start in ((old, 0), (mine, 2 * hour), (later, 4 * hour)):
        os.utime(path, (start + 60, start + 60))  # the CSV is written until the run ends
    os.utime(run / "config.yaml", (2 * hour + 5, 2 * hour + 5))
    assert find_run(run) == ("csv", [mine])
    assert open_run(run).method == "dpo" and len(open_run(run).curves["train/loss"][0]) == 10
    # a run that logged no CSV (no version was written while it ran): not another run's curves
    os.utime(run / "config.yaml", (8 * hour, 8 * hour))
    with pytest.raises(FileNotFoundError, match="no Lightning metrics.csv and no wandb run"):
        find_run(run)


def test_resumed_run_joins_its_csv_versions(tmp_path):
    """A run directory with csv/version_N below it (one per start): the versions joined, the
    resumed start's steps replacing what the first start logged from there on."""
    run = write_config(tmp_path / "logs/align-dpo/dpo-tiny-20261203-155000", "a.DPOModule")
    write_metrics(run / "csv/version_0/metrics.csv", DPO_METRICS, steps=8)
    resumed = run / "csv/version_1/metrics.csv"
    write_metrics(resumed, DPO_METRICS, steps=10)
    rows = list(csv.DictReader(resumed.open()))
    with resumed.open("w", newline="") as f:  # the resume restarted from the checkpoint at step 5
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {**r, "train/loss": "9"} if r["train/loss"] else r for r in rows if int(r["step"]) >= 5
        )
    for n in (2, 3, 4, 5, 6, 7, 8, 9, 10):  # version_10 sorts after version_9, not after 1
        write_metrics(run / f"csv/version_{n}/metrics.csv", ["train/loss"], steps=0, lr=False)
    kind, files = find_run(run)
    assert kind == "csv" and files[:2] == [run / "csv/version_0/metrics.csv", resumed]
    assert files[-1].parent.name == "version_10"
    steps, values = open_run(run).curves["train/loss"]
    assert steps == list(range(10))
    assert values[:5] == [pytest.approx(1 / (s + 1)) for s in range(5)] and values[5:] == [9.0] * 5


def test_relative_run_directory_from_a_subfolder(run_dirs, monkeypatch):
    """The summary prints a path relative to where `align fit` ran; a notebook runs one folder
    down (notebooks/)."""
    root = run_dirs["dpo"].parents[2]
    (root / "notebooks").mkdir()
    monkeypatch.chdir(root / "notebooks")
    run = open_run("logs/align-dpo/version_0")
    assert run.method == "dpo" and run.sources[0].samefile(run_dirs["dpo"] / "metrics.csv")


def test_newest_run(run_dirs, tmp_path):
    for i, method in enumerate(("kto", "sft", "dpo")):
        os.utime(run_dirs[method] / "config.yaml", (1000 + i, 1000 + i))
    assert newest_run(tmp_path / "logs") == run_dirs["dpo"]
    with pytest.raises(FileNotFoundError, match="no run under"):
        newest_run(tmp_path / "logs" / "align-dpo" / "version_0" / "checkpoints")


def test_plot_has_one_panel_per_curve_group(run_dirs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_run(open_run(run_dirs["kto"]), smooth=3)
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["loss", "class rewards", "learning rate", "grad norm"]
        assert len(fig.axes[1].get_lines()) == 4  # desirable and undesirable, train and val
    finally:
        plt.close(fig)


def test_moving_average():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_lightning_csv_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run")
    for step in range(6):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "epoch": 0}, step=step)
        if step % 3 == 2:
            logger.log_metrics({"val/loss": 0.5 - 0.1 * step}, step=step)
    logger.save()
    kind, where = find_run(tmp_path)
    assert kind == "csv" and [p.name for p in where] == ["metrics.csv"]
    curves = read_curves(tmp_path)
    assert set(curves) == {"train/loss", "val/loss"}
    steps, values = curves["train/loss"]
    assert steps == [0, 1, 2, 3, 4, 5] and values[3] == pytest.approx(0.25)
    assert curves["val/loss"] == ([2.0, 5.0], [pytest.approx(0.3), pytest.approx(0.0)])


def test_wandb_offline_run(tmp_path):
    script = (
        "import wandb\n"
        f"run = wandb.init(mode='offline', project='p', dir={str(tmp_path)!r}, id='abc123')\n"
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
    assert kind == "wandb" and [p.name for p in where] == ["run-abc123.wandb"]
    curves = read_curves(tmp_path)
    # strings are not curves
    assert set(curves) == {"train/loss", "val/acc", "train/long_name_" + "x" * 40}
    steps, values = curves["train/loss"]
    # records span several 32 KiB blocks
    assert steps == list(range(300)) and values[9] == pytest.approx(0.1)
    assert curves["val/acc"][0] == [0, 100, 200]
    # a run directory named after the wandb id (WandbLogger's), with no CSV: its wandb file
    run = write_config(tmp_path / "align-dpo" / "abc123", "align.modules.DPOModule")
    assert find_run(run) == ("wandb", where)
    assert open_run(run).method == "dpo"


def test_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Lightning metrics.csv and no wandb run"):
        read_curves(tmp_path)
