"""Text-to-image retrieval at segment level (LongAlign Table 1): R@1 on fabricated embeddings with a
known answer, full score vs the text-relevant part, R@1 against the number of sentences kept, and
the command end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from align.objectives.reward import DegenerateDirection, common_direction

from align.commands._retrieval import main
from align.eval.retrieval import (
    aggregate,
    recall_at_1,
    retrieval_from_embeddings,
    similarity,
)


def e(i, d=4):
    v = torch.zeros(d)
    v[i] = 1.0
    return v


def fabricated_set():
    """Three captions sharing a strong common direction e3 and one private direction each (e0, e1,
    e2); images 0 and 1 show their caption's private content, image 2 mostly the common "style"
    direction.

    Full score: image 2's large common component beats images 0 and 1 for *every* caption, so only
    caption 2 retrieves its own image: R@1 = 1/3. Text-relevant part (v = e3): each caption keeps
    0.3 * its private direction, which only its own image shares: R@1 = 1."""
    text = torch.stack(
        [0.3 * e(0) + 0.95 * e(3), 0.3 * e(1) + 0.95 * e(3), 0.3 * e(2) + 0.95 * e(3)]
    )
    images = torch.stack([e(0) + e(3), e(1) + e(3), 0.1 * e(2) + e(3)])
    return images, text


def test_r1_full_vs_text_relevant_on_a_known_answer():
    images, text = fabricated_set()
    v = e(3)
    full = similarity(images, text, v, "full")
    rel = similarity(images, text, v, "relevant")
    img = F.normalize(images, dim=-1)
    # by hand: caption 0 scores image 0 at 0.3*.707 + 0.95*.707 = 0.884 and image 2 at 0.95*0.995 =
    # 0.945
    assert full[0, 0].item() == pytest.approx((0.3 + 0.95) / math.sqrt(2), abs=1e-5)
    assert full[0, 2].item() == pytest.approx(0.95 * img[2, 3].item(), abs=1e-5)
    assert full[0].argmax() == 2 and full[1].argmax() == 2 and full[2].argmax() == 2
    assert recall_at_1(full) == pytest.approx(1 / 3)
    # the relevant part keeps only 0.3 * e_i: zero against the other captions' images
    torch.testing.assert_close(rel, 0.3 * img[:, :3].T, atol=1e-6, rtol=0)
    assert torch.count_nonzero(rel - torch.diag(rel.diagonal())) == 0 and (rel.diagonal() > 0).all()
    assert recall_at_1(rel) == 1.0


def test_recall_counts_ties_as_misses_and_checks_shape():
    # row 0 ties with image 1: a miss
    assert recall_at_1(torch.tensor([[1.0, 1.0], [0.0, 2.0]])) == 0.5
    assert recall_at_1(torch.tensor([[3.0, 1.0], [0.0, 2.0]])) == 1.0
    with pytest.raises(ValueError):
        recall_at_1(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        similarity(torch.ones(2, 2), torch.ones(2, 2), None, "relevant")


def test_curve_against_sentences_kept():
    """N captions of three segments: segment 1 is common to all (says nothing about the image),
    segment 2 is each caption's own, segment 3 is common again. One sentence kept: every caption is
    the same text, so it retrieves the same image for all: R@1 = 1/N. Two or three kept: each
    caption's own segment decides: R@1 = 1."""
    n = 5
    d = n + 2
    own = torch.eye(d)[:n]  # caption i's own segment: e_i
    common_a, common_b = e(n, d), e(n + 1, d)
    segments = torch.stack([common_a.expand(n, d), own, common_b.expand(n, d)], dim=1)
    mask = torch.ones(n, 3, dtype=torch.bool)
    # image j shows e_j plus common content c_j e_n, c_j increasing:
    # with one sentence kept the last image wins all
    images = own + torch.linspace(0.5, 0.9, n)[:, None] * common_a
    result = retrieval_from_embeddings(images, segments, mask)
    assert [c["sentences"] for c in result.curve] == [1, 2, 3]
    assert result.curve[0]["r1_full"] == pytest.approx(1 / n)
    assert result.curve[1]["r1_full"] == 1.0 and result.curve[2]["r1_full"] == 1.0
    assert result.r1_full == result.curve[2]["r1_full"]
    assert [c["n_cut"] for c in result.curve] == [n, n, 0]
    # cutting at k keeps the first k segments only
    torch.testing.assert_close(aggregate(segments, mask, 1), common_a.expand(n, d))
    # a caption shorter than k keeps all it has; max_sentences caps the curve
    short = mask.clone()
    short[0, 1:] = False
    assert len(retrieval_from_embeddings(images, segments, short, max_sentences=2).curve) == 2


def test_set_direction_is_the_normalised_mean_and_needs_two_captions():
    _, text = fabricated_set()
    local = common_direction(text, across_ranks=False)
    torch.testing.assert_close(local, F.normalize(text.mean(0), dim=0))
    with pytest.raises(DegenerateDirection):
        common_direction(text[:1], across_ranks=False)


@pytest.fixture(scope="module")
def long_caption_shards(tmp_path_factory):
    from align.data.synthetic_long import write_synthetic_longcaption

    out = tmp_path_factory.mktemp("longcaption")
    write_synthetic_longcaption(out, samples=12, shards=2, resolution=32, seed=3)
    return out


def test_command_end_to_end_on_a_tiny_clip(long_caption_shards, tmp_path, capsys):
    from align.rewards.tiny import write_tiny_hf_clip

    clip = write_tiny_hf_clip(tmp_path / "clip", seed=13)
    out = tmp_path / "report"
    rc = main(
        [
            "--reward",
            "clip",
            "--reward-source",
            str(clip),
            "--data",
            str(long_caption_shards),
            "--limit",
            "10",
            "--max-sentences",
            "3",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    report = json.loads((out / "retrieval.json").read_text())
    assert report["n"] == 10 and report["reward"] == "clip" and report["direction"] == "set"
    assert 0.0 <= report["r1_full"] <= 1.0 and 0.0 <= report["r1_relevant"] <= 1.0
    assert [c["sentences"] for c in report["curve"]] == [1, 2, 3]
    assert "R@1" in capsys.readouterr().out
    # bad input: one usable sample cannot be retrieved among; a missing path is named
    assert (
        main(
            [
                "--reward",
                "clip",
                "--reward-source",
                str(clip),
                "--data",
                str(long_caption_shards),
                "--limit",
                "1",
            ]
        )
        == 2
    )
    assert (
        main(
            ["--reward", "clip", "--reward-source", str(clip), "--data", str(tmp_path / "nowhere")]
        )
        == 2
    )
    assert "nowhere" in capsys.readouterr().err
