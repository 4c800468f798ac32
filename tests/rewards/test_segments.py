"""Segment-level, decomposed scoring shared by every CLIP-based reward (align.rewards.segments),
and Denscore."""

import pytest
import torch
import torch.nn.functional as F

from align.objectives.reward import DegenerateDirection, save_direction
from align.rewards import build_reward
from align.rewards.segments import (
    SegmentScorer,
    batch_direction,
    embed_prompt_segments,
    estimate_direction,
    score_segments,
)

PROMPTS = [
    "A cat on a mat. It is red. The sky is blue.",
    "A single sentence",
    "...",
    'A dog. Running fast; "quickly!" it goes? Yes.',
]


@pytest.fixture(scope="module")
def denscore_dir(tmp_path_factory):
    from align.rewards.denscore import write_tiny_denscore

    return write_tiny_denscore(tmp_path_factory.mktemp("denscore") / "denscore")


def rewards(tiny_rewards, denscore_dir):
    out = {
        name: build_reward(name, str(tiny_rewards[name])) for name in ("pickscore", "hps", "clip")
    }
    # registers "denscore" wherever the registry does not yet
    import align.rewards.denscore  # noqa: F401

    out["denscore"] = build_reward("denscore", str(denscore_dir))
    return out


def test_every_clip_reward_scores_segments_and_decomposes(
    tiny_rewards, denscore_dir, sample_images, monkeypatch
):
    images = sample_images + sample_images[:1]
    for name, reward in rewards(tiny_rewards, denscore_dir).items():
        calls = []
        real = reward.text_features
        monkeypatch.setattr(
            reward, "text_features", lambda p, real=real: calls.append(len(p)) or real(p)
        )
        texts = embed_prompt_segments(reward, PROMPTS)
        # every segment of the batch in one text-tower call ("..." has none)
        assert calls == [3 + 1 + 3], name
        assert texts.has_text.tolist() == [True, True, False, True]
        assert texts.mask.sum(1).tolist() == [3, 1, 0, 3] and torch.equal(
            texts.text[2], torch.zeros_like(texts.text[2])
        )
        monkeypatch.undo()

        scorer = SegmentScorer(reward, w=0.3)
        v = scorer.fit_direction(PROMPTS)
        torch.testing.assert_close(v, F.normalize(texts.text[texts.has_text].mean(0), dim=0))
        # batches of 2: one direction for all
        cols = scorer.score_columns(images, PROMPTS, batch_size=2)
        assert list(cols) == [f"{name}-seg-o", f"{name}-seg", f"{name}-seg-w"]
        assert torch.isnan(cols[f"{name}-seg-o"][2])  # no segments: no score, not a misleading 0
        keep = [0, 1, 3]
        base = reward.segment_scores([images[i] for i in keep], [PROMPTS[i] for i in keep])
        torch.testing.assert_close(cols[f"{name}-seg-o"][keep], base, rtol=1e-5, atol=1e-5)

        out = score_segments(reward, images, PROMPTS, direction=v, w=0.3)
        d = out.decomposed
        torch.testing.assert_close(d.relevant + d.irrelevant, d.original)
        torch.testing.assert_close(d.weighted, d.relevant + 0.3 * d.irrelevant)
        torch.testing.assert_close(cols[f"{name}-seg"][keep], d.relevant[keep])
        # the original score is the mean of the real segments' cosines
        torch.testing.assert_close(d.original[0], out.cosines[0].mean())
        torch.testing.assert_close(d.original[1], out.cosines[1, 0])


def test_direction_from_the_batch_or_the_saved_fallback(tiny_rewards, tmp_path):
    reward = build_reward("clip", str(tiny_rewards["clip"]))
    one = embed_prompt_segments(reward, PROMPTS[:1])
    with pytest.raises(DegenerateDirection):
        batch_direction(one.text)
    saved = F.normalize(torch.randn(one.text.shape[-1]), dim=0)
    v, source = batch_direction(one.text, fallback=saved)
    assert source == "saved" and torch.allclose(v, saved)
    two = embed_prompt_segments(reward, PROMPTS[:2])
    v, source = batch_direction(two.text, fallback=saved)
    assert source == "batch" and torch.allclose(v, F.normalize(two.text.mean(0), dim=0))
    with pytest.raises(DegenerateDirection):
        estimate_direction(reward, ["...", PROMPTS[1]])  # one prompt with segments is not a set

    # the command saves a direction over a prompt file that the scorer then loads
    from align.commands.direction import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "v.safetensors"
    assert (
        main(
            [
                "--reward",
                "clip",
                "--source",
                str(tiny_rewards["clip"]),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    scorer = SegmentScorer(reward, direction=out)
    torch.testing.assert_close(scorer.direction, estimate_direction(reward, PROMPTS))


def test_denscore_scores_at_segment_level_with_its_saved_direction(
    denscore_dir, sample_images, tmp_path
):
    import align.rewards.denscore  # noqa: F401

    reward = build_reward("denscore", str(denscore_dir))
    assert reward.direction is not None  # from the export's align_reward.json
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    score = reward.score(sample_images, prompts)
    torch.testing.assert_close(
        score, reward.segment_scores(sample_images, prompts), rtol=1e-5, atol=1e-5
    )
    cols = reward.score_columns(sample_images, prompts)
    assert list(cols) == ["denscore-o", "denscore", "denscore-w"]
    torch.testing.assert_close(cols["denscore-o"], score, rtol=1e-5, atol=1e-5)
    dec = reward.decomposed_scores(sample_images, prompts, reward.direction, w=0.3)
    torch.testing.assert_close(cols["denscore"], dec.relevant, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols["denscore-w"], dec.weighted, rtol=1e-5, atol=1e-5)
    # a direction option overrides the export's
    other = F.normalize(torch.randn(reward.direction.shape[0]), dim=0)
    save_direction(other, tmp_path / "other.safetensors")
    assert torch.allclose(
        build_reward(
            "denscore", str(denscore_dir), direction=str(tmp_path / "other.safetensors")
        ).direction,
        other,
    )
