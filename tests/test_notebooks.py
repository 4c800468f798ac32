"""The notebooks run headless (nbclient) on tiny artifacts: an eval report of the tiny model, a
real tiny `align fit` run opened at the directory its end-of-run summary printed, a KTO run
directory."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """A real `align eval` report: tiny export-like model vs the tiny base, scored by a tiny HPS."""
    import torch

    from align.eval.evaluate import EvalConfig, evaluate
    from align.eval.report import write_report
    from align.eval.sampling import SampleConfig, sample_images
    from align.models import load_components
    from align.rewards.tiny import write_tiny_rewards

    root = tmp_path_factory.mktemp("nb")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rewards = write_tiny_rewards(root / "rewards", names=("hps",))
        prompts = ["a cat", "a red car", "a forest"]
        for name, seed in (("run", 1), ("base", 0)):
            sample_images(
                prompts,
                root / name,
                SampleConfig("tiny", steps=3, images_per_prompt=2, progress=False),
                components=load_components("tiny", seed=seed),
            )
        report, rows, _ = evaluate(
            EvalConfig(
                images=str(root / "run"),
                baseline=str(root / "base"),
                rewards=["hps"],
                reward_sources={"hps": str(rewards["hps"])},
                n_boot=50,
                progress=False,
            )
        )
    finally:
        torch.set_num_threads(threads)
    write_report(report, root / "report", rows)
    return root / "report"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, pair_shards):
    """A real 4-step `align fit` of the tiny DPO config; returns the run directory its end-of-run
    summary printed (as printed: relative to where it ran) and that folder."""
    import contextlib
    import io
    import os

    import torch

    from align.cli import main as align

    root = tmp_path_factory.mktemp("fit")
    cwd, threads, printed = Path.cwd(), torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(printed):
            align(
                [
                    "fit",
                    "--config",
                    str(ROOT / "configs/dpo/tiny.yaml"),
                    "--data.train_shards",
                    str(pair_shards),
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
                ]
            )
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    lines = [ln for ln in printed.getvalue().splitlines() if ln.startswith("run directory:")]
    assert lines, printed.getvalue()[-2000:]
    return lines[-1].split(":", 1)[1].strip(), root


@pytest.fixture(scope="module")
def fabricated_kto_run(tmp_path_factory):
    """A KTO run directory in the layout `align fit` writes: config.yaml and metrics.csv."""
    from lightning.pytorch.loggers import CSVLogger

    run = tmp_path_factory.mktemp("kto-run")
    logger = CSVLogger(run, name="", version="")  # writes <run>/metrics.csv
    for step in range(20):
        logger.log_metrics(
            {
                "train/loss": 0.5 - 0.01 * step,
                "train/reward_desirable": 0.01 * step,
                "train/reward_undesirable": -0.01 * step,
                "train/grad_norm": 1.0,
            },
            step=step,
        )
    logger.save()
    (run / "config.yaml").write_text("model:\n  class_path: align.modules.KTOModule\n")
    assert (run / "metrics.csv").is_file()
    return run


def execute(name: str, env: dict, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    return nb


def outputs(nb) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") + str(out.get("data", {}).get("text/markdown", "")))
            images += "image/png" in out.get("data", {})
    return "\n".join(text), images


def test_eval_report_notebook(tiny_report, monkeypatch):
    nb = execute(
        "eval_report.ipynb", {"ALIGN_REPORT_DIR": tiny_report, "ALIGN_MAX_PAIRS": 2}, monkeypatch
    )
    text, images = outputs(nb)
    assert "| hps | 6 |" in text and "showing 2" in text
    assert images == 2  # the side-by-side grid and the score-difference histograms


def test_training_curves_notebook_on_the_printed_run_directory(tiny_run, monkeypatch):
    printed, where = tiny_run
    nb = execute("training_curves.ipynb", {"ALIGN_RUN_DIR": where / printed}, monkeypatch)
    text, images = outputs(nb)
    assert "method dpo" in text and images == 1
    for curve in ("train/loss", "train/implicit_acc", "train/reward_margin", "train/grad_norm"):
        assert curve in text
    assert "lr-" in text and "train/policy_err " not in text


def test_training_curves_notebook_kto(fabricated_kto_run, monkeypatch):
    nb = execute("training_curves.ipynb", {"ALIGN_RUN_DIR": fabricated_kto_run}, monkeypatch)
    text, images = outputs(nb)
    assert "method kto" in text and "train/reward_undesirable" in text and images == 1
