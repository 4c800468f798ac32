import pytest
import torch

from align.objectives.denoise import denoise_loss, min_snr_weights


def _pair():
    # sample 0: errors 1 and 4 over two elements -> 2.5; sample 1: 1 and 1 -> 1
    pred = torch.tensor([[[[1.0, 2.0]]], [[[1.0, -1.0]]]])
    return pred, torch.zeros_like(pred)


def test_unweighted_is_mean_of_per_sample_mse():
    pred, target = _pair()
    out = denoise_loss(pred, target)
    assert out.loss.item() == pytest.approx(1.75)
    assert out.err.item() == pytest.approx(1.75)
    assert out.weight_mean.item() == 1.0
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(pred, target))


def test_weighted_is_not_renormalised():
    pred, target = _pair()
    out = denoise_loss(pred, target, weights=torch.tensor([2.0, 0.5]))
    assert out.loss.item() == pytest.approx((2.0 * 2.5 + 0.5 * 1.0) / 2)
    assert out.err.item() == pytest.approx(1.75)  # the raw error, whatever the weights
    assert out.weight_mean.item() == pytest.approx(1.25)


def test_gradient_flows_to_pred_not_weights_and_low_precision_is_upcast():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    weights = torch.tensor([1.0, 3.0], requires_grad=True)
    out = denoise_loss(pred, torch.zeros(2, 2), weights)
    out.loss.backward()
    # d/dpred of mean_i w_i * mean_j pred_ij^2 = w_i * 2 * pred_ij / (2 * 2)
    torch.testing.assert_close(pred.grad, torch.tensor([[0.5, 1.0], [4.5, 6.0]]))
    assert weights.grad is None
    assert all(not v.requires_grad for k, v in out.metrics().items() if k != "loss")
    assert (
        denoise_loss(pred.detach().bfloat16(), torch.zeros(2, 2, dtype=torch.bfloat16)).loss.dtype
        == torch.float32
    )


def test_shape_errors():
    with pytest.raises(ValueError):
        denoise_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        denoise_loss(torch.zeros(2, 3), torch.zeros(2, 3), weights=torch.ones(3))


def test_min_snr_hand_computed():
    # alphas_cumprod 0.9, 0.5, 0.1, 0.0 -> snr 9, 1, 1/9, 0
    ac = torch.tensor([0.9, 0.5, 0.1, 0.0], dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3])
    eps = min_snr_weights(t, ac, gamma=5.0, prediction_type="epsilon")
    torch.testing.assert_close(eps, torch.tensor([5 / 9, 1.0, 1.0, 1.0]))  # snr 0: the limit, 1
    v = min_snr_weights(t, ac, gamma=5.0, prediction_type="v_prediction")
    torch.testing.assert_close(v, torch.tensor([0.5, 0.5, 0.1, 0.0]))
    # gather by timestep, repeated and out of order
    torch.testing.assert_close(
        min_snr_weights(torch.tensor([1, 0, 0]), ac, gamma=1.0), torch.tensor([1.0, 1 / 9, 1 / 9])
    )


def test_min_snr_matches_diffusers_snr():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
    )
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(sched, t).double()
    # diffusers' epsilon weighting
    want = torch.stack([snr, torch.full_like(snr, 5.0)], dim=1).min(dim=1)[0] / snr
    torch.testing.assert_close(
        min_snr_weights(t, sched.alphas_cumprod, 5.0).double(), want, rtol=1e-5, atol=1e-7
    )


def test_min_snr_validation():
    ac = torch.tensor([0.9, 0.5])
    with pytest.raises(ValueError):
        min_snr_weights(torch.tensor([0]), ac, prediction_type="sample")
    with pytest.raises(ValueError):
        min_snr_weights(torch.tensor([0]), ac, gamma=0.0)
    with pytest.raises(ValueError):
        min_snr_weights(torch.tensor([0.5]), ac)
