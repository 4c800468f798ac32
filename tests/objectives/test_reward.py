import math

import pytest
import torch
import torch.nn.functional as F

from align.objectives.reward import (
    DegenerateDirection,
    NonFiniteReward,
    common_direction,
    decompose_text,
    decomposed_score,
    load_direction,
    rft_loss,
    save_direction,
    segment_cosines,
    segment_score,
    segment_text_embedding,
)


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- segment scores -------------------------------------------------------------------------------


def test_segment_text_embedding_hand_computed_not_renormalised():
    # segments (3, 4) and (0, 2) normalise to (0.6, 0.8) and (0, 1); their mean
    # (0.3, 0.9) has norm < 1
    emb = segment_text_embedding(_t([[3.0, 4.0], [0.0, 2.0]]))
    torch.testing.assert_close(emb, _t([0.3, 0.9]))
    assert emb.norm().item() == pytest.approx(math.sqrt(0.9))


def test_segment_text_embedding_mask_ignores_padding_even_nan():
    seg = _t([[3.0, 4.0], [0.0, 2.0], [float("nan"), 1.0]], [[0.0, 5.0], [7.0, 7.0], [1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(segment_text_embedding(seg, mask), _t([0.3, 0.9], [0.0, 1.0]))


def test_segment_text_embedding_empty_row_is_zero_with_finite_gradient():
    seg = torch.randn(2, 3, 4, dtype=torch.float64)
    seg[1, 2] = float("nan")  # padding may hold anything
    seg.requires_grad_()
    mask = torch.tensor([[True, False, True], [False, False, False]])
    emb = segment_text_embedding(seg, mask)
    assert torch.equal(emb[1], torch.zeros(4, dtype=torch.float64))
    emb.sum().backward()
    assert torch.isfinite(seg.grad).all()
    assert torch.equal(seg.grad[1], torch.zeros(3, 4, dtype=torch.float64))


def test_segment_score_is_mean_of_segment_cosines():
    torch.manual_seed(0)
    img, seg = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 5, 8, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool
    )
    cos = F.cosine_similarity(img.unsqueeze(1), seg, dim=-1)  # (B, S), independent computation
    expected = torch.stack([cos[b][mask[b]].mean() for b in range(4)])
    torch.testing.assert_close(segment_score(img, seg, mask), expected)
    torch.testing.assert_close(segment_score(img, seg), cos.mean(dim=1))
    torch.testing.assert_close(segment_cosines(img, seg), cos)


def test_segment_score_hand_computed_and_image_scale_invariant():
    # image (2, 0) -> (1, 0); segments (0.6, 0.8), (0, 1): cosines 0.6 and 0 -> score 0.3
    img, seg = _t([2.0, 0.0]), _t([[3.0, 4.0], [0.0, 2.0]])
    assert segment_score(img, seg).item() == pytest.approx(0.3)
    assert segment_score(img * 7, seg).item() == pytest.approx(0.3)


def test_segment_shape_errors():
    with pytest.raises(ValueError):
        segment_text_embedding(torch.randn(2, 4))
    with pytest.raises(ValueError):
        segment_text_embedding(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError):
        segment_text_embedding(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError):
        segment_score(torch.randn(2, 5), torch.randn(2, 3, 4))


# --- common direction -----------------------------------------------------------------------------


def test_common_direction_hand_computed():
    v = common_direction(_t([1.0, 0.0], [0.0, 1.0], [2.0, 2.0]))  # mean (1, 1) -> (1, 1)/sqrt 2
    torch.testing.assert_close(v, torch.full((2,), 1 / math.sqrt(2)))
    assert not v.requires_grad


def test_common_direction_is_detached():
    text = torch.randn(4, 3, requires_grad=True)
    assert not common_direction(text).requires_grad


def test_common_direction_degenerate():
    with pytest.raises(DegenerateDirection):
        common_direction(torch.randn(1, 4))  # one caption: no "common" direction
    with pytest.raises(DegenerateDirection):
        common_direction(torch.randn(0, 4))
    with pytest.raises(DegenerateDirection):
        common_direction(_t([1.0, -1.0], [-1.0, 1.0]))  # mean exactly 0
    assert common_direction(torch.randn(3, 4), min_count=3).shape == (4,)


def test_direction_round_trip(tmp_path):
    v = F.normalize(torch.randn(16), dim=0)
    path = tmp_path / "direction.safetensors"
    save_direction(v, path)
    loaded = load_direction(path)
    torch.testing.assert_close(loaded, v)
    assert loaded.dtype == torch.float32
    with pytest.raises(FileNotFoundError):
        load_direction(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError):
        save_direction(torch.randn(2, 3), tmp_path / "bad.safetensors")


# --- decomposition --------------------------------------------------------------------------------


def test_decomposition_2d_hand_computed():
    # img (1, 0); t (0.5, 0.5); v (1, 0): eta 0.5, t - eta v = (0, 0.5)
    out = decomposed_score(
        _t([3.0, 0.0]), _t([0.5, 0.5]), torch.tensor([1.0, 0.0], dtype=torch.float64), w=0.3
    )
    assert out.original.item() == pytest.approx(0.5)
    assert out.relevant.item() == pytest.approx(0.0, abs=1e-12)
    assert out.irrelevant.item() == pytest.approx(0.5)
    assert out.eta.item() == pytest.approx(0.5)
    assert out.weighted.item() == pytest.approx(0.15)


def test_decomposition_3d_hand_computed():
    # img (1, 2, 2)/3; t (0.3, 0.9, 0); v (0, 0.6, 0.8): eta 0.54; t - eta v = (0.3, 0.576, -0.432)
    # relevant = 0.588/3 = 0.196; <img, v> = 2.8/3; irrelevant = 0.504; original 0.7;
    # weighted 0.196 + 0.3*0.504
    out = decomposed_score(
        _t([1.0, 2.0, 2.0]), _t([0.3, 0.9, 0.0]), torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    )
    assert out.eta.item() == pytest.approx(0.54)
    assert out.relevant.item() == pytest.approx(0.196)
    assert out.irrelevant.item() == pytest.approx(0.504)
    assert out.original.item() == pytest.approx(0.7)
    assert out.weighted.item() == pytest.approx(0.3472)
    relevant_t, common_t, eta = decompose_text(
        _t([0.3, 0.9, 0.0]), torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    )
    torch.testing.assert_close(relevant_t, _t([0.3, 0.576, -0.432]))
    torch.testing.assert_close(common_t, _t([0.0, 0.324, 0.432]))


def test_w_one_gives_original_exactly_and_parts_add_up():
    torch.manual_seed(1)
    img, text = torch.randn(6, 32), torch.randn(6, 32)
    v = F.normalize(torch.randn(32), dim=0)
    out = decomposed_score(img, text, v, w=1.0)
    assert torch.equal(out.weighted, out.original)
    torch.testing.assert_close(out.relevant + out.irrelevant, out.original)
    torch.testing.assert_close(out.original, (F.normalize(img, dim=-1) * text).sum(-1))
    w = 0.3
    torch.testing.assert_close(
        decomposed_score(img, text, v, w=w).weighted, out.relevant + w * out.irrelevant
    )


def test_relevant_text_is_orthogonal_to_direction():
    torch.manual_seed(2)
    text, v = (
        torch.randn(5, 64, dtype=torch.float64),
        F.normalize(torch.randn(64, dtype=torch.float64), dim=0),
    )
    relevant_t, common_t, eta = decompose_text(text, v)
    torch.testing.assert_close(
        relevant_t @ v, torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(relevant_t + common_t, text)
    torch.testing.assert_close(eta, text @ v)


def test_decomposition_metrics_and_shape_errors():
    out = decomposed_score(
        torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), F.normalize(torch.randn(4), dim=0)
    )
    assert set(out.metrics()) == {"original", "relevant", "irrelevant", "weighted", "eta"}
    assert all(m.ndim == 0 and not m.requires_grad for m in out.metrics().values())
    with pytest.raises(ValueError):
        decomposed_score(torch.randn(3, 4), torch.randn(3, 5), torch.randn(4))
    with pytest.raises(ValueError):
        decomposed_score(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5))


# --- RFT loss -------------------------------------------------------------------------------------


def test_rft_loss_hand_computed_and_gradient():
    scores = torch.tensor([0.2, 0.4], requires_grad=True)
    loss = rft_loss(scores)
    assert loss.item() == pytest.approx(0.35)
    loss.backward()
    # descent raises every score
    torch.testing.assert_close(scores.grad, torch.tensor([-0.25, -0.25]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rft_loss_refuses_non_finite(bad):
    with pytest.raises(NonFiniteReward) as err:
        rft_loss(torch.tensor([0.2, bad, 0.3]))
    assert isinstance(err.value, ValueError)
    assert "1 of 3" in str(err.value)


def test_rft_loss_shape_errors():
    with pytest.raises(ValueError):
        rft_loss(torch.zeros(0))
    with pytest.raises(ValueError):
        rft_loss(torch.zeros(2, 2))


def test_rft_end_to_end_gradient_reaches_image_embedding():
    torch.manual_seed(3)
    img = torch.randn(4, 16, requires_grad=True)
    seg = torch.randn(4, 3, 16)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    text = segment_text_embedding(seg, mask)
    v = common_direction(text)
    out = decomposed_score(img, text, v)
    torch.testing.assert_close(out.original, segment_score(img, seg, mask))
    rft_loss(out.weighted).backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
