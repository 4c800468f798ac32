"""The shapes world's tiny CLIP preference model: trains on judge pairs (shards or samples) through the real
module, exports a Denscore directory the registry loads, and scores 32 px tensors with gradients (for RFT)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from align.demo import world
from align.demo.judge import judge
from align.demo.prefs import build_records, pair_samples, write_pairs
from align.demo.reward_model import (CORRUPTIONS, corrupt, pairwise_accuracy, read_pairs, rendered_pairs,
                                     train_preference_model, write_small_clip)


def _rendered_pair_samples(n: int = 8, k: int = 2):
    """As tests/demo/test_demo_pipeline.py: the caption's scene rendered (winner) and colour-wrong scenes."""
    rng = random.Random(0)
    captions, images = [], []
    for _ in range(n):
        scene = world.random_scene(rng, min_objects=1, max_objects=2)
        captions.append(world.caption(scene))
        images.append(np.asarray(world.render(scene)))
        for _ in range(1, k):
            images.append(np.asarray(world.render(world.noisy_scene(scene, rng, p_color=1.0, p_shape=0.0))))
    return pair_samples(build_records(captions, np.stack(images), k))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reward_model")
    pairs = _rendered_pair_samples()
    write_pairs(out / "shards", pairs, shards=2)
    export = train_preference_model(out / "shards", out / "run", steps=3, seed=0, lr=1e-3, batch_size=4,
                                    eval_pairs=pairs, eval_every=2)
    return export, pairs, out


def test_training_runs_and_the_registry_loads_the_export(trained):
    from align.rewards import build_reward
    from align.rewards.denscore import Denscore

    export, pairs, out = trained
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "align_reward.json"):
        assert (export / name).is_file(), name
    summary = json.loads((out / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["image_size"] == 32
    assert [s for s, _ in summary["accuracy_curve"]] == [0, 2, 3]
    assert "train/loss" in summary["last_train_metrics"]

    reward = build_reward("denscore", str(export))
    assert isinstance(reward, Denscore)
    assert reward.clip.model.config.vision_config.image_size == 32
    acc = pairwise_accuracy(reward, pairs)
    assert 0.0 <= acc <= 1.0
    assert pairwise_accuracy(reward, str(out / "shards")) == pytest.approx(acc, abs=0.2)  # JPEG'd copies


def test_export_scores_32px_tensors_with_gradients_to_the_pixels(trained):
    from align.rewards import build_reward

    reward = build_reward("denscore", str(trained[0]))
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    scores = reward.score(images, ["a red square in the top left.", "a blue triangle in the bottom right.",
                                   "a green square in the top right. a yellow triangle in the bottom left."],
                          grad=True)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())  # frozen: gradients reach the images only
    # the tensor path and the PIL path agree on 32 px images (no resampling, the same normalisation)
    arrays = [world.to_array(np.random.default_rng(i).random((32, 32, 3))) for i in range(2)]
    from PIL import Image

    pil = reward.score([Image.fromarray(a) for a in arrays], "a red square in the top left.")
    tensor = reward.score(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0,
                          "a red square in the top left.")
    torch.testing.assert_close(pil, tensor, rtol=1e-4, atol=1e-4)


def test_training_from_pair_samples_writes_shards(tmp_path):
    torch.set_num_threads(1)
    pairs = _rendered_pair_samples(n=4)
    export = train_preference_model(pairs, tmp_path, steps=1, batch_size=2)
    assert sorted(p.name for p in (tmp_path / "pairs").glob("*.tar")) == [f"pairs-00000{i}.tar" for i in range(4)]
    assert (export / "model.safetensors").is_file()
    assert len(read_pairs(tmp_path / "pairs")) == len(pairs)


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
    pairs = [{"caption": "c", "label_0": 1.0, "image_0": red, "image_1": blue},
             {"caption": "c", "label_0": 0.0, "image_0": red, "image_1": blue},
             {"caption": "c", "label_0": 0.0, "image_0": blue, "image_1": red},
             {"caption": "c", "label_0": 0.5, "image_0": blue, "image_1": red}]
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
