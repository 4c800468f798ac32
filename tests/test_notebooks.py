"""The notebooks run headless (nbclient) on tiny artifacts: an eval report of the tiny model,
a Lightning run."""

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
def tiny_run(tmp_path_factory):
    from lightning.pytorch.loggers import CSVLogger

    root = tmp_path_factory.mktemp("run")
    logger = CSVLogger(root, name="tiny-dpo")
    for step in range(20):
        logger.log_metrics(
            {"train/loss": 0.69 - 0.01 * step, "train/implicit_acc": 0.5 + 0.01 * step}, step=step
        )
        if step % 5 == 4:
            logger.log_metrics({"val/loss": 0.7 - 0.01 * step}, step=step)
    logger.save()
    return root


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


def test_training_curves_notebook(tiny_run, monkeypatch):
    nb = execute("training_curves.ipynb", {"ALIGN_RUN_DIR": tiny_run}, monkeypatch)
    text, images = outputs(nb)
    assert "3 metrics" in text and "train/implicit_acc" in text and images == 1
