"""Each reward's score formula on tiny random models of the real classes, saved in the real layouts
and loaded through the real loaders; the shared interface (batching, grad control, tensors,
segments); bad sources."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from align.rewards import (
    ClipRewardModel,
    RewardSourceError,
    available_rewards,
    build_reward,
    canonical_name,
)

PROMPTS = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse at sunset"]


def _cos(a, b):
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def test_registry_names_and_aliases():
    # the demo registers its shapes-* rewards when imported
    builtin = {name for name in available_rewards() if not name.startswith("shapes-")}
    assert builtin == {
        "aesthetic",
        "clip",
        "denscore",
        "hps",
        "imagereward",
        "pickscore",
        "jpeg-compressibility",
        "jpeg-incompressibility",
    }
    assert canonical_name("HPSv2") == "hps" and canonical_name("ImageReward") == "imagereward"
    with pytest.raises(ValueError, match="unknown reward 'nope'.*pickscore"):
        build_reward("nope")


def test_pickscore_is_logit_scale_times_cosine(tiny_rewards, sample_images):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    reward = build_reward("pickscore", str(tiny_rewards["pickscore"]))
    scores = reward.score(sample_images, PROMPTS)

    # the official PickScore example, step by step, on independently loaded parts
    model = CLIPModel.from_pretrained(tiny_rewards["pickscore"]).eval()
    processor = CLIPImageProcessorPil.from_pretrained(tiny_rewards["pickscore"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_rewards["pickscore"])
    with torch.no_grad():
        img = model.get_image_features(
            **processor(images=sample_images, return_tensors="pt")
        ).pooler_output
        txt = model.get_text_features(
            **tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        ).pooler_output
    expected = model.logit_scale.exp() * _cos(img, txt)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert reward.logit_scale.item() == pytest.approx(model.logit_scale.exp().item())
    # the scale matters: the score is not the bare cosine
    assert not torch.allclose(scores, _cos(img, txt))


def test_clip_score_is_100_cosine_clamped(tiny_rewards, sample_images):
    reward = build_reward("clip", str(tiny_rewards["clip"]))
    scores = reward.score(sample_images, PROMPTS)
    cos = _cos(reward.embed_images(sample_images), reward.embed_texts(PROMPTS))
    torch.testing.assert_close(scores, (100 * cos).clamp(min=0))
    # a prompt pointing away from the image gives 0, never a negative score
    emb = reward.embed_images(sample_images[:1])
    assert reward.score_embeddings(emb, -emb).item() == 0.0
    assert reward.score_embeddings(emb, emb).item() == pytest.approx(100.0, rel=1e-5)


def test_hps_is_cosine_of_open_clip_features(tiny_rewards, sample_images):
    import open_clip

    from align.rewards.hps import hps_preprocess
    from align.rewards.tiny import TINY_OPEN_CLIP

    reward = build_reward("hps", str(tiny_rewards["hps"]))
    scores = reward.score(sample_images, PROMPTS)

    # the checkpoint layout: {"state_dict": ...} of an open_clip CLIP,
    # loaded as HPS's img_score.py does
    ckpt = torch.load(tiny_rewards["hps"] / "HPS_v2.1_compressed.pt", weights_only=True)
    model = open_clip.CLIP(**TINY_OPEN_CLIP, output_dict=True)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    images = torch.stack([hps_preprocess(im) for im in sample_images])
    with torch.no_grad():
        out = model(images, open_clip.tokenize(PROMPTS))
    expected = torch.diagonal(out["image_features"] @ out["text_features"].T)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_hps_preprocessing_resizes_the_longer_side_and_pads():
    from align.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from align.rewards.hps import hps_preprocess

    image = Image.new(
        "RGB", (448, 224), (255, 255, 255)
    )  # wide: 224 x 112 after resizing, padded top/bottom
    x = hps_preprocess(image)
    assert x.shape == (3, 224, 224)
    black = [(0 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    white = [(1 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    for c in range(3):
        assert x[c, :56].allclose(torch.tensor(black[c]), atol=1e-5)  # zero padding
        assert x[c, -56:].allclose(torch.tensor(black[c]), atol=1e-5)
        assert x[c, 60:164].allclose(torch.tensor(white[c]), atol=1e-3)


def test_aesthetic_is_mlp_of_normalised_clip_embedding(tiny_rewards, sample_images):
    from transformers import CLIPModel

    from align.rewards.aesthetic import AestheticMLP
    from align.rewards.base import openai_clip_transform

    reward = build_reward("aesthetic", str(tiny_rewards["aesthetic"]))
    scores = reward.score(sample_images, PROMPTS)
    # independent: the released head layout, a CLIP model, and OpenAI CLIP's transform
    head = AestheticMLP(16)
    head.load_state_dict(
        torch.load(
            tiny_rewards["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True
        )
    )
    clip = CLIPModel.from_pretrained(tiny_rewards["aesthetic"] / "clip").eval()
    pixels = torch.stack([openai_clip_transform(224)(im) for im in sample_images])
    with torch.no_grad():
        emb = clip.get_image_features(pixel_values=pixels).pooler_output
        expected = head.eval()(F.normalize(emb, dim=-1)).squeeze(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    # the prompt plays no part
    torch.testing.assert_close(reward.score(sample_images, ["something else"] * 3), scores)


def test_image_reward_formula_and_checkpoint_layout(tiny_rewards, sample_images):
    from align.rewards.image_reward import MAX_LENGTH, REWARD_MEAN, REWARD_STD

    reward = build_reward("imagereward", str(tiny_rewards["imagereward"]))
    scores = reward.score(sample_images, PROMPTS)

    # every checkpoint tensor landed where its name says
    state = torch.load(tiny_rewards["imagereward"] / "ImageReward.pt", weights_only=True)
    loaded = {
        **{f"blip.visual_encoder.{k}": v for k, v in reward.visual_encoder.state_dict().items()},
        **{f"blip.text_encoder.{k}": v for k, v in reward.text_encoder.state_dict().items()},
        **{f"mlp.{k}": v for k, v in reward.mlp.state_dict().items()},
    }
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], msg=key)

    tokens = reward.tokenize(PROMPTS)
    assert tokens["input_ids"].shape == (3, MAX_LENGTH)  # padding="max_length", max_length=35
    assert (tokens["input_ids"][:, 0] == reward.tokenizer.cls_token_id).all()
    pixels = reward.pixel_values(sample_images)
    with torch.no_grad():
        image_embeds = reward.visual_encoder.forward_features(pixels)
        assert image_embeds.shape == (3, 1 + (224 // 32) ** 2, 32)  # every token, [CLS] first
        hidden = reward.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
        )
        expected = (
            reward.mlp(hidden.last_hidden_state[:, 0]).squeeze(-1) - REWARD_MEAN
        ) / REWARD_STD
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # the image matters (cross-attention is live)
    flipped = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in sample_images]
    assert not torch.allclose(reward.score(flipped, PROMPTS), scores)


@pytest.mark.parametrize("name", ["pickscore", "hps", "clip", "aesthetic", "imagereward"])
def test_batching_tensors_and_gradients(name, tiny_rewards):
    reward = build_reward(name, str(tiny_rewards[name]))
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    pil = [Image.fromarray(a) for a in arrays]
    pixels = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])

    by_one = reward.score(pil, PROMPTS, batch_size=1)
    all_at_once = reward.score(pil, PROMPTS, batch_size=8)
    torch.testing.assert_close(by_one, all_at_once, rtol=1e-4, atol=1e-4)
    # at the model's own size no resampling happens: the tensor path equals the PIL path
    torch.testing.assert_close(reward.score(pixels, PROMPTS), all_at_once, rtol=1e-4, atol=1e-4)

    x = pixels.clone().requires_grad_(True)
    assert not reward.score(x, PROMPTS).requires_grad  # no_grad unless asked
    scores = reward.score(x, PROMPTS, grad=True)
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())  # frozen: gradients reach pixels only

    big = torch.nn.functional.interpolate(pixels, size=(300, 260), mode="bilinear")
    assert torch.isfinite(reward.score(big.requires_grad_(True), PROMPTS, grad=True)).all()


def test_segment_embeddings_are_shared_by_clip_rewards(tiny_rewards, sample_images):
    captions = ["A cat on a mat. It is red. The sky is blue.", "A single sentence", ""]
    for name in ("pickscore", "hps", "clip"):
        reward = build_reward(name, str(tiny_rewards[name]))
        assert isinstance(reward, ClipRewardModel)
        emb, mask = reward.embed_segments(captions)
        assert emb.shape[:2] == (3, 3) and mask.tolist() == [
            [True] * 3,
            [True, False, False],
            [True, False, False],
        ]
        torch.testing.assert_close(emb[0, 1], reward.embed_texts([" It is red."])[0])
        torch.testing.assert_close(emb[mask].norm(dim=-1), torch.ones(int(mask.sum())))
        scores = reward.segment_scores(sample_images, captions)
        img = reward.embed_images(sample_images)
        # segment score = mean over real segments of the image-segment cosine
        torch.testing.assert_close(scores[0], (emb[0] @ img[0]).mean())
        torch.testing.assert_close(scores[1], emb[1, 0] @ img[1])
        # w = 1 recovers the segment score; the decomposition adds up
        v = F.normalize(
            torch.randn(img.shape[-1], generator=torch.Generator().manual_seed(0)), dim=0
        )
        dec = reward.decomposed_scores(sample_images, captions, v, w=1.0)
        torch.testing.assert_close(dec.weighted, scores)
        torch.testing.assert_close(dec.relevant + dec.irrelevant, scores)


def test_missing_checkpoints_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "hps": "HPS_v2.1_compressed.pt",
        "imagereward": "ImageReward.pt",
        "aesthetic": "sac+logos+ava1-l14-linearMSE.pth",
        "pickscore": "config.json",
        "clip": "config.json",
    }
    for name, filename in cases.items():
        with pytest.raises(RewardSourceError) as err:
            build_reward(name, str(empty))
        assert str(empty / filename) in str(err.value), name
    with pytest.raises(RewardSourceError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        build_reward("aesthetic")  # no default source: says which file to get
    with pytest.raises(RewardSourceError, match=str(tmp_path / "nowhere")):
        build_reward("hps", str(tmp_path / "nowhere" / "HPS_v2.1_compressed.pt"))


def test_image_reward_checkpoint_without_its_config_names_the_config(tmp_path, tiny_rewards):
    alone = tmp_path / "ImageReward.pt"
    shutil.copy(tiny_rewards["imagereward"] / "ImageReward.pt", alone)
    with pytest.raises(RewardSourceError, match=f"{tmp_path / 'med_config.json'}.*med_config"):
        build_reward("imagereward", str(alone))


def test_hub_ids_offline_fail_naming_the_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RewardSourceError, match="ImageReward.pt.*THUDM/ImageReward"):
        build_reward("imagereward")
    with pytest.raises(RewardSourceError, match="HPS_v2.1_compressed.pt.*xswu/HPSv2"):
        build_reward("hps")


def test_manifest_options_resolve_relative_paths(tiny_rewards):
    from align.rewards.sources import read_manifest

    options = read_manifest(tiny_rewards["aesthetic"])
    assert options["clip"] == str(tiny_rewards["aesthetic"] / "clip")
    manifest = json.loads((tiny_rewards["imagereward"] / "align_reward.json").read_text())
    assert manifest["options"]["vit_num_heads"] == 2


def test_the_registry_never_imports_the_demo_and_takes_module_qualified_names():
    import subprocess
    import sys

    code = (
        "import sys; from align.rewards.registry import available_rewards, canonical_name; "
        "assert 'shapes-judge' not in available_rewards(); "
        "assert not [m for m in sys.modules if m.startswith('align.demo')]; "
        "assert canonical_name('align.demo.soft_judge:shapes-judge') == 'shapes-judge'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
