import math

import pytest
import torch

from align.objectives.kto import UTILITIES, kto_loss, kto_reference_point


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _f64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_reference_point_is_mean_implicit_reward():
    # g = ref - policy = [0.3, 0.1] -> z0 = 0.2
    z0 = kto_reference_point(_f64(0.1, 0.3), _f64(0.4, 0.4))
    assert z0.item() == pytest.approx(0.2, abs=1e-7)
    assert z0.ndim == 0 and not z0.requires_grad


def test_reference_point_clamped_at_zero():
    # policy worse than reference everywhere: mean g = -0.2 -> z0 = 0, not negative
    assert kto_reference_point(_f64(0.5, 0.7), _f64(0.4, 0.4)).item() == 0.0


def test_hand_computed_kahneman_tversky():
    # g = [0.3, 0.1], z0 = 0.2, desirable [T, F], beta 10: x = [10*0.1, -10*(-0.1)] = [1, 1]
    out = kto_loss(_f64(0.1, 0.3), _f64(0.4, 0.4), torch.tensor([True, False]), beta=10.0)
    assert out.loss.item() == pytest.approx(1.0 - _sig(1.0), rel=1e-6)
    assert out.reference_point.item() == pytest.approx(0.2, abs=1e-7)
    assert out.reward_desirable.item() == pytest.approx(0.3)
    assert out.reward_undesirable.item() == pytest.approx(0.1)
    assert out.frac_desirable.item() == 0.5
    assert out.implicit_acc.item() == 1.0  # x = [1, 1]: both on their class's side
    assert out.policy_err.item() == pytest.approx(0.2)
    assert out.ref_err.item() == pytest.approx(0.4)


def test_hand_computed_with_explicit_reference_point_and_lambdas():
    # g = [0.3, 0.1, -0.2], z0 = 0.05, desirable [T, F, F], beta 4:
    # x = [4*0.25, -4*0.05, -4*(-0.25)] = [1, -0.2, 1]
    policy, ref = _f64(0.1, 0.3, 0.6), _f64(0.4, 0.4, 0.4)
    desirable = torch.tensor([True, False, False])
    xs, lams = [1.0, -0.2, 1.0], [2.0, 0.5, 0.5]
    expected = {
        "kahneman-tversky": lambda x: _sig(x),
        "loss-averse": lambda x: math.log(_sig(x)),
        "risk-seeking": lambda x: -math.log(_sig(-x)),
    }
    for name, u in expected.items():
        out = kto_loss(
            policy,
            ref,
            desirable,
            beta=4.0,
            reference_point=0.05,
            utility=name,
            lambda_d=2.0,
            lambda_u=0.5,
        )
        want = sum(lam * (1.0 - u(x)) for lam, x in zip(lams, xs)) / 3
        assert out.loss.item() == pytest.approx(want, rel=1e-6), name
        assert out.reference_point.item() == pytest.approx(0.05)
        assert out.implicit_acc.item() == pytest.approx(2 / 3)  # x = [1, -0.2, 1]


def test_policy_equals_reference_gives_half():
    err = torch.rand(6)
    out = kto_loss(err.clone(), err.clone(), torch.tensor([True, True, False, True, False, True]))
    assert out.loss.item() == pytest.approx(0.5)  # x = 0 -> 1 - sigmoid(0)
    assert out.reference_point.item() == 0.0
    assert out.implicit_acc.item() == 0.5  # every sample on z0: ties count half


def test_absent_class_reports_zero_not_nan():
    out = kto_loss(_f64(0.1, 0.2), _f64(0.3, 0.3), torch.tensor([True, True]), beta=10.0)
    assert out.reward_undesirable.item() == 0.0
    assert out.reward_desirable.item() == pytest.approx(0.15)
    assert out.frac_desirable.item() == 1.0
    assert all(torch.isfinite(v).all() for v in out.metrics().values())
    out = kto_loss(_f64(0.1, 0.2), _f64(0.3, 0.3), torch.tensor([False, False]), beta=10.0)
    assert out.reward_desirable.item() == 0.0
    assert out.frac_desirable.item() == 0.0


def test_gradient_lowers_desirable_and_raises_undesirable_error():
    policy = torch.tensor([0.3, 0.3, 0.5, 0.5], requires_grad=True)
    ref = torch.tensor([0.3, 0.3, 0.5, 0.5])
    desirable = torch.tensor([True, False, True, False])
    kto_loss(policy, ref, desirable, beta=10.0).loss.backward()
    assert (policy.grad[desirable] > 0).all()  # descent lowers the error of desirable samples
    assert (policy.grad[~desirable] < 0).all()  # and raises it for undesirable ones


def test_reference_point_carries_no_gradient():
    ref = torch.tensor([0.1, 0.2, 0.15, 0.12, 0.3])
    desirable = torch.tensor([True, False, True, True, False])
    p1 = (ref - torch.tensor([0.002, -0.001, 0.003, 0.001, 0.0])).requires_grad_()  # mean g = 0.001
    out = kto_loss(p1, ref, desirable, beta=500.0)
    assert out.reference_point.item() > 0  # not clamped, so a leaking gradient would show
    out.loss.backward()
    p2 = p1.detach().clone().requires_grad_()
    kto_loss(
        p2, ref, desirable, beta=500.0, reference_point=out.reference_point.item()
    ).loss.backward()
    torch.testing.assert_close(p1.grad, p2.grad)


def test_reference_gets_no_gradient_and_metrics_detached():
    policy, ref = torch.rand(4, requires_grad=True), torch.rand(4, requires_grad=True)
    out = kto_loss(policy, ref, torch.tensor([True, False, True, False]))
    out.loss.backward()
    assert ref.grad is None
    metrics = out.metrics()
    assert set(metrics) == {
        "loss",
        "reward_desirable",
        "reward_undesirable",
        "reference_point",
        "implicit_acc",
        "frac_desirable",
        "policy_err",
        "ref_err",
    }
    assert all(not v.requires_grad for v in metrics.values())


def test_unknown_utility_lists_options():
    with pytest.raises(ValueError) as err:
        kto_loss(torch.rand(2), torch.rand(2), torch.tensor([True, False]), utility="prospect")
    for name in UTILITIES:
        assert name in str(err.value)


def test_input_validation():
    with pytest.raises(ValueError):
        kto_loss(torch.rand(3), torch.rand(2), torch.tensor([True, False, True]))
    with pytest.raises(ValueError):
        kto_loss(torch.rand(3), torch.rand(3), torch.tensor([True, False]))
    with pytest.raises(TypeError):
        kto_loss(torch.rand(2), torch.rand(2), torch.tensor([1, 0]))
    with pytest.raises(ValueError):
        kto_loss(
            torch.rand(2),
            torch.rand(2),
            torch.tensor([True, False]),
            reference_point=torch.zeros(2),
        )
