"""Shared fixtures: synthetic shards in the real schemas and tiny models, all made on the fly
(no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pair_shards(tmp_path_factory):
    """Four synthetic Pick-a-Pic shards of 16 pairs each, 32 px."""
    from align.data.synthetic import write_synthetic_pickapic

    out = tmp_path_factory.mktemp("pairs")
    write_synthetic_pickapic(out, pairs=64, shards=4, resolution=32, tie_fraction=0.1, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """The tiny preset saved as a diffusers pipeline directory (the real from_pretrained path)."""
    from align.models import load_components

    out = tmp_path_factory.mktemp("tiny-pipe")
    load_components("tiny").save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _close_wandb_run():
    """Lightning leaves the wandb run open after fit;
    close it so the next test's logger starts a new one."""
    yield
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster and steadier
    (every test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_rewards(tmp_path_factory):
    """Tiny random models of every reward, in the real layouts
    (shared by tests/rewards and tests/eval)."""
    from align.rewards.tiny import write_tiny_rewards

    return write_tiny_rewards(tmp_path_factory.getbasetemp() / "tiny-rewards")


@pytest.fixture(scope="session")
def sample_images():
    """Three RGB PIL images of different sizes and aspect ratios
    (so resizing and cropping are exercised)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(224, 224), (300, 200), (96, 160)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
