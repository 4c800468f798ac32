import math

import pytest
import torch

from align.objectives.preference import preference_loss


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def _ce(a, b, l0):
    """soft cross-entropy of softmax([a, b]) against [l0, 1 - l0], by hand."""
    lse = max(a, b) + math.log(math.exp(a - max(a, b)) + math.exp(b - max(a, b)))
    return -(l0 * (a - lse) + (1 - l0) * (b - lse))


def test_hand_computed_clear_preference():
    out = preference_loss(_t(0.3), _t(0.1), _t(1.0), _t(0.0), logit_scale=100.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-20.0)), rel=1e-9)
    assert out.accuracy.item() == 1.0 and out.n_decided.item() == 1
    assert out.score_margin.item() == pytest.approx(0.2)


def test_hand_computed_tie_and_wrong_order():
    # tie: CE against (0.5, 0.5) of logits (30, 10) = 10 + log(1 + e^-20)
    out = preference_loss(_t(0.3), _t(0.1), _t(0.5), _t(0.5), logit_scale=100.0)
    assert out.loss.item() == pytest.approx(10.0 + math.log1p(math.exp(-20.0)), rel=1e-9)
    # image 1 preferred but scored lower: loss = log(1 + e^20)
    out = preference_loss(_t(0.3), _t(0.1), _t(0.0), _t(1.0), logit_scale=100.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(20.0)), rel=1e-9)
    assert out.accuracy.item() == 0.0


def test_batch_mean_accuracy_ties_excluded_and_score_ties_half():
    s0 = _t(0.3, 0.3, 0.2, 0.5, 0.4)
    s1 = _t(0.1, 0.1, 0.2, 0.1, 0.9)
    l0 = _t(1.0, 0.0, 1.0, 0.5, 1.0)
    out = preference_loss(s0, s1, l0, 1 - l0, logit_scale=10.0)
    expected = (
        sum(_ce(10 * a, 10 * b, l) for a, b, l in zip(s0.tolist(), s1.tolist(), l0.tolist())) / 5
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.pair_loss.item() == pytest.approx(expected, rel=1e-9)
    # decided pairs: correct, wrong, score tie (half), wrong -> 1.5 / 4
    assert out.accuracy.item() == pytest.approx(0.375)
    assert out.n_decided.item() == 4
    assert out.tie_frac.item() == pytest.approx(0.2)
    assert out.score_margin.item() == pytest.approx((0.2 - 0.2 + 0.0 - 0.5) / 4)


def test_only_ties_reports_chance_accuracy_with_zero_decided():
    out = preference_loss(_t(0.3, 0.1), _t(0.1, 0.2), _t(0.5, 0.5), _t(0.5, 0.5), logit_scale=100.0)
    assert out.accuracy.item() == 0.5
    assert out.n_decided.item() == 0
    assert out.score_margin.item() == 0.0
    assert out.tie_frac.item() == 1.0
    assert all(torch.isfinite(v).all() for v in out.metrics().values())


def test_segment_term_mask_aware_per_pair_mean():
    nan = float("nan")
    s0, s1 = _t(0.3, 0.2, 0.1), _t(0.1, 0.4, 0.1)
    l0 = _t(1.0, 0.0, 1.0)
    seg0 = _t([0.3, nan, nan], [0.1, 0.5, 0.0], [nan, nan, nan])
    seg1 = _t([0.1, 2.0, nan], [0.4, 0.2, 9.0], [nan, nan, nan])
    mask = torch.tensor([[True, False, False], [True, True, False], [False, False, False]])
    scale = 10.0
    pair = (
        sum(_ce(scale * a, scale * b, l) for a, b, l in zip(s0.tolist(), s1.tolist(), l0.tolist()))
        / 3
    )
    pair_a = _ce(3.0, 1.0, 1.0)
    pair_b = (_ce(1.0, 4.0, 0.0) + _ce(5.0, 2.0, 0.0)) / 2
    segment = (pair_a + pair_b) / 2  # the third pair has no real segment and is left out
    out = preference_loss(s0, s1, l0, 1 - l0, scale, seg0, seg1, mask, segment_weight=0.5)
    assert out.segment_loss.item() == pytest.approx(segment, rel=1e-9)
    assert out.pair_loss.item() == pytest.approx(pair, rel=1e-9)
    assert out.loss.item() == pytest.approx(pair + 0.5 * segment, rel=1e-9)
    # weight 0: logged, not added
    out0 = preference_loss(s0, s1, l0, 1 - l0, scale, seg0, seg1, mask)
    assert out0.segment_loss.item() == pytest.approx(segment, rel=1e-9)
    assert out0.loss.item() == pytest.approx(pair, rel=1e-9)


def test_segment_term_without_mask_uses_every_segment():
    seg0, seg1 = _t([0.3, 0.1]), _t([0.1, 0.4])
    out = preference_loss(_t(0.2), _t(0.25), _t(1.0), _t(0.0), 10.0, seg0, seg1, segment_weight=1.0)
    assert out.segment_loss.item() == pytest.approx(
        (_ce(3.0, 1.0, 1.0) + _ce(1.0, 4.0, 1.0)) / 2, rel=1e-9
    )


def test_gradients_raise_preferred_score_and_stay_finite_through_nan_padding():
    s0 = torch.tensor([0.2, 0.2], requires_grad=True)
    s1 = torch.tensor([0.2, 0.2], requires_grad=True)
    seg0 = torch.tensor([[0.2, float("nan")], [0.1, 0.3]], requires_grad=True)
    seg1 = torch.tensor([[0.2, float("nan")], [0.3, 0.1]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    logit_scale = torch.tensor(50.0, requires_grad=True)
    out = preference_loss(
        s0,
        s1,
        torch.tensor([1.0, 0.0]),
        torch.tensor([0.0, 1.0]),
        logit_scale,
        seg0,
        seg1,
        mask,
        segment_weight=1.0,
    )
    out.loss.backward()
    assert s0.grad[0] < 0 < s1.grad[0]  # descent raises the preferred image's score
    assert s1.grad[1] < 0 < s0.grad[1]
    assert torch.isfinite(seg0.grad).all() and torch.isfinite(seg1.grad).all()
    assert seg0.grad[0, 1] == 0 and seg1.grad[0, 1] == 0
    assert logit_scale.grad is not None and torch.isfinite(logit_scale.grad)
    assert all(not v.requires_grad for v in out.metrics().values())


def test_input_validation():
    one = torch.ones(2)
    with pytest.raises(ValueError):
        preference_loss(one, torch.ones(3), one, 1 - one, 100.0)
    with pytest.raises(ValueError):  # labels must sum to 1
        preference_loss(one, one, one, one, 100.0)
    with pytest.raises(ValueError):  # weight without segment scores
        preference_loss(one, one, one, 1 - one, 100.0, segment_weight=0.5)
    with pytest.raises(ValueError):  # only one side's segment scores
        preference_loss(one, one, one, 1 - one, 100.0, segment_scores_0=torch.ones(2, 3))
    with pytest.raises(ValueError):
        preference_loss(one, one, one, 1 - one, 100.0, torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError):
        preference_loss(
            one, one, one, 1 - one, 100.0, torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3)
        )
