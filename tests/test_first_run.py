"""The embedded first runs learn what their synthetic data prefers: held-out metrics measured before
the first step and at the end (same validation noise) move the right way, on shortened runs of the
`make train-dpo` / `make train-kto` configs."""

from pathlib import Path

import pytest

from align.callbacks import ArtifactSummary
from align.callbacks.progress import StepProgressBar
from align.data.synthetic import write_synthetic_kto, write_synthetic_pickapic
from align.lightning_cli import run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path, config: str, shards: dict[str, str], steps: int):
    args = ["fit", "--config", str(ROOT / config)]
    for key, value in shards.items():
        args += [f"--data.{key}", value]
    args += [
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.callbacks=[align.callbacks.ArtifactSummary]",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=[{class_path: lightning.pytorch.loggers.CSVLogger, "
        f"init_args: {{save_dir: {tmp_path}}}}}]",
        "--data.num_workers=0",
    ]
    return run_lightning_cli(args)


def summary_of(cli) -> ArtifactSummary:
    return next(c for c in cli.trainer.callbacks if isinstance(c, ArtifactSummary))


def test_tiny_dpo_learns_the_synthetic_winner(tmp_path, capfd):
    write_synthetic_pickapic(tmp_path / "pairs", pairs=256, shards=4, resolution=32)
    shards = {
        "train_shards": str(tmp_path / "pairs/pairs-{000001..000003}.tar"),
        "val_shards": str(tmp_path / "pairs/pairs-000000.tar"),
    }
    cli = fit(tmp_path, "configs/dpo/tiny.yaml", shards, steps=60)
    summary = summary_of(cli)
    printed = capfd.readouterr()
    assert "held-out metrics:  step 0 -> end" in printed.out
    assert "litlogger" not in printed.err + printed.out  # library noise silenced at the source
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar) and bar.train_progress_bar.desc.startswith("step 60/60")
    before, after = summary.before, summary.after
    assert before["val/implicit_acc"] == 0.5  # policy == reference: every pair a tie
    assert before["val/loss"] == pytest.approx(0.6931, abs=1e-4)
    assert after["val/implicit_acc"] >= 0.7  # 32 held-out pairs: 0.5 +- 0.09 by chance
    assert after["val/loss"] < before["val/loss"] and after["val/reward_margin"] > 0


@pytest.mark.slow  # 35 s: the fast suite keeps the DPO case
def test_tiny_kto_separates_desirable_from_undesirable(tmp_path):
    write_synthetic_kto(tmp_path / "singles", samples=256, shards=4, resolution=32)
    shards = {
        "shards": str(tmp_path / "singles/singles-{000001..000003}.tar"),
        "val_shards": str(tmp_path / "singles/singles-000000.tar"),
    }
    summary = summary_of(fit(tmp_path, "configs/kto/tiny.yaml", shards, steps=60))
    before, after = summary.before, summary.after
    assert before["val/implicit_acc"] == 0.5 and before["val/reward_desirable"] == 0.0
    assert after["val/implicit_acc"] >= 0.65  # 64 held-out images: 0.5 +- 0.06 by chance
    assert after["val/reward_desirable"] > after["val/reward_undesirable"]
