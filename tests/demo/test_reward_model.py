"""The shapes world's tiny CLIP preference model: trains on judge pairs through
configs/demo/preference_model.yaml, exports a Denscore directory the registry loads, and scores
32 px tensors with gradients (for RFT)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from align.demo import world
from align.demo.judge import judge
from align.demo.prefs import build_records, pair_samples, write_pairs
from align.demo.reward_model import (
    CORRUPTIONS,
    corrupt,
    pairwise_accuracy,
    read_pairs,
    rendered_pairs,
    write_small_clip,
)


def _rendered_pair_samples(n: int = 8, k: int = 2):
    """As tests/demo/test_demo_pipeline.py: the caption's scene rendered
    (winner) and colour-wrong scenes."""
    rng = random.Random(0)
    captions, images = [], []
    for _ in range(n):
        scene = world.random_scene(rng, min_objects=1, max_objects=2)
        captions.append(world.caption(scene))
        images.append(np.asarray(world.render(scene)))
        for _ in range(1, k):
            images.append(
                np.asarray(world.render(world.noisy_scene(scene, rng, p_color=1.0, p_shape=0.0)))
            )
    return pair_samples(build_records(captions, np.stack(images), k))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from align.demo.run import CONFIGS, PREFERENCE_MODEL, batch_of, fit, steps

    torch.set_num_threads(1)
    art = tmp_path_factory.mktemp("reward_model")
    pairs = _rendered_pair_samples()
    write_pairs(art / "prefs" / "pairs", pairs, shards=2)
    write_pairs(art / "preference_model" / "rendered-pairs", pairs[:4], shards=2)
    write_small_clip(art / "preference_model" / "init", seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_DEMO", str(art))
        fit(
            [
                "--config",
                str(CONFIGS / PREFERENCE_MODEL),
                *steps(3),
                *batch_of(4),
                "--trainer.log_every_n_steps",
                "1",
            ]
        )
    return art / "preference_model" / "export" / "final", pairs, art


def test_training_runs_and_the_registry_loads_the_export(trained):
    import csv

    from align.rewards import build_reward
    from align.rewards.denscore import Denscore

    export, pairs, art = trained
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "align_reward.json",
    ):
        assert (export / name).is_file(), name
    rows = list(csv.DictReader(open(art / "runs" / "preference_model" / "seed0" / "metrics.csv")))
    assert max(int(r["step"]) for r in rows) <= 3 and any(r.get("train/loss") for r in rows)
    assert len(read_pairs(art / "prefs" / "pairs")) == len(pairs)

    reward = build_reward("denscore", str(export))
    assert isinstance(reward, Denscore)
    assert reward.clip.model.config.vision_config.image_size == 32
    acc = pairwise_accuracy(reward, pairs)
    assert 0.0 <= acc <= 1.0
    assert pairwise_accuracy(reward, str(art / "prefs" / "pairs")) == pytest.approx(acc, abs=0.2)


def test_export_scores_32px_tensors_with_gradients_to_the_pixels(trained):
    from align.rewards import build_reward

    reward = build_reward("denscore", str(trained[0]))
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    scores = reward.score(
        images,
        [
            "a red square in the top left.",
            "a blue triangle in the bottom right.",
            "a green square in the top right. a yellow triangle in the bottom left.",
        ],
        grad=True,
    )
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(
        p.grad is None for p in reward.parameters()
    )  # frozen: gradients reach the images only
    # the tensor path and the PIL path agree on 32 px images (no resampling, the same normalisation)
    arrays = [world.to_array(np.random.default_rng(i).random((32, 32, 3))) for i in range(2)]
    from PIL import Image

    pil = reward.score([Image.fromarray(a) for a in arrays], "a red square in the top left.")
    tensor = reward.score(
        torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0,
        "a red square in the top left.",
    )
    torch.testing.assert_close(pil, tensor, rtol=1e-4, atol=1e-4)


def test_small_clip_geometry(tmp_path):
    from transformers import CLIPConfig

    write_small_clip(tmp_path, image_size=32, patch_size=8)
    cfg = CLIPConfig.from_pretrained(tmp_path)
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (32, 8)
    with pytest.raises(ValueError, match="divide"):
        write_small_clip(tmp_path / "bad", image_size=32, patch_size=5)


def test_pairwise_accuracy_counts_decisive_pairs_only():
    class ByRed(torch.nn.Module):  # a stand-in reward: the amount of red
        def score(self, images, prompts, batch_size=None):
            return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))

    red, blue = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)
    red[..., 0], blue[..., 2] = 200, 200
    pairs = [
        {"caption": "c", "label_0": 1.0, "image_0": red, "image_1": blue},
        {"caption": "c", "label_0": 0.0, "image_0": red, "image_1": blue},
        {"caption": "c", "label_0": 0.0, "image_0": blue, "image_1": red},
        {"caption": "c", "label_0": 0.5, "image_0": blue, "image_1": red},
    ]
    assert pairwise_accuracy(ByRed(), pairs) == pytest.approx(2 / 3)
    assert np.isnan(pairwise_accuracy(ByRed(), pairs[3:]))


def test_rendered_pairs_follow_the_judge():
    pairs = rendered_pairs(24, seed=3, max_objects=3)
    assert len(pairs) == 24
    first_wins = [p["label_0"] for p in pairs]
    assert 0 < sum(first_wins) < 24  # the winner's position is random
    for p in pairs:
        s0, s1 = judge(p["image_0"], p["caption"]).value, judge(p["image_1"], p["caption"]).value
        assert p["label_0"] == (0.5 if s0 == s1 else float(s0 > s1))
        assert max(s0, s1) == 1.0  # the caption's own scene is one of the two
    rng = random.Random(0)
    scene = (world.Obj(0, "red", "square"),)
    assert corrupt(scene, "missing", rng) == () and corrupt((), "color", rng) is None
    full = tuple(world.Obj(c, "red", "square") for c in range(4))
    assert corrupt(full, "position", rng) is None
    for kind in CORRUPTIONS:
        assert judge(world.render(corrupt(scene, kind, rng)), world.caption(scene)).value < 1.0
