import math

import pytest
import torch
from diffusers import DDIMScheduler

from align.objectives.grpo import ddim_std, ddim_step_logprob, group_advantages, grpo_loss


def _scheduler(**kw) -> DDIMScheduler:
    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        **kw,
    )


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_step_equals_diffusers_ddim_and_a_float64_gaussian_density(eta):
    sched = _scheduler()
    sched.set_timesteps(10)
    t, prev_t = 501, 401  # leading spacing, 10 steps: 901, 801, ..., 1
    torch.manual_seed(0)
    x, eps, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    expected = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample

    a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[prev_t]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    _, log_prob, mean = ddim_step_logprob(x0, eps, a_t, a_prev, eta, prev_sample=expected)
    std = ddim_std(a_t, a_prev, eta)
    torch.testing.assert_close(mean + std * noise, expected, atol=1e-5, rtol=1e-5)

    # independently, in float64: DDIM eq. 12 and 16 and the Gaussian density per element
    a, ap = a_t.double(), a_prev.double()
    x64, e64 = x.double(), eps.double()
    sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    x0_64 = (x64 - (1 - a).sqrt() * e64) / a.sqrt()
    mean64 = ap.sqrt() * x0_64 + math.sqrt(1 - ap - sigma**2) * e64
    density = torch.distributions.Normal(mean64, sigma).log_prob(expected.double())
    torch.testing.assert_close(log_prob.double(), density.flatten(1).mean(1), atol=1e-4, rtol=0)


def test_drawn_sample_is_reproducible_and_its_density_is_the_one_reported():
    a_t, a_prev = torch.tensor(0.3), torch.tensor(0.5)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    first = ddim_step_logprob(x0, eps, a_t, a_prev, 1.0, generator=torch.Generator().manual_seed(1))
    again = ddim_step_logprob(x0, eps, a_t, a_prev, 1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first[0], again[0])
    evaluated = ddim_step_logprob(x0, eps, a_t, a_prev, 1.0, prev_sample=first[0])
    torch.testing.assert_close(evaluated[1], first[1])


def test_zero_terminal_snr_first_step_is_finite():
    # a_t = 0 at the last training timestep with zero terminal SNR: x0 comes from the v target
    _, log_prob, _ = ddim_step_logprob(
        torch.randn(2, 4), torch.randn(2, 4), torch.tensor(0.0), torch.tensor(0.2), 1.0
    )
    assert torch.isfinite(log_prob).all()


def test_eta_zero_has_no_density():
    with pytest.raises(ValueError, match="eta"):
        ddim_step_logprob(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor(0.3), 0.5, 0.0)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 0.0, 0.0, 4.0])
    adv, valid = group_advantages(rewards, group_size=4, eps=0.0)
    # group 1: mean 2, population std sqrt(0.5); group 2: mean 1, std sqrt(3)
    s1, s2 = math.sqrt(0.5), math.sqrt(3.0)
    expected = [-1 / s1, 1 / s1, 0.0, 0.0, -1 / s2, -1 / s2, -1 / s2, 3 / s2]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert valid.all()


def test_group_of_equal_rewards_has_no_advantage_and_no_nan():
    adv, valid = group_advantages(torch.tensor([0.5, 0.5, 0.1, 0.9]), group_size=2)
    assert adv[:2].tolist() == [0.0, 0.0] and valid.tolist() == [False, False, True, True]
    assert torch.isfinite(adv).all()


def test_advantages_clipped():
    adv, _ = group_advantages(torch.tensor([0.0] * 9 + [1.0]), group_size=10, clip=2.0)
    assert adv.max().item() == 2.0


@pytest.mark.parametrize(
    "rewards, group",
    [(torch.ones(3), 2), (torch.ones(4), 1), (torch.tensor([1.0, float("nan")]), 2)],
)
def test_bad_rewards_refused(rewards, group):
    with pytest.raises(ValueError):
        group_advantages(rewards, group)


def test_clipped_loss_by_hand():
    # ratios e^0.2 (beyond 1 + 0.1) and e^-0.05 (inside); advantages +1 and -2
    log_prob = torch.tensor([0.2, -0.05], requires_grad=True)
    out = grpo_loss(log_prob, torch.zeros(2), torch.tensor([1.0, -2.0]), clip_range=0.1)
    r1, r2 = math.exp(0.2), math.exp(-0.05)
    # sample 1: max(-r1, -1.1) = -1.1 (clipped, no gradient); sample 2: max(2 r2, 2 * 0.95) = 2 r2
    assert out.loss.item() == pytest.approx((-1.1 + 2 * r2) / 2, rel=1e-6)
    out.loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, r2]))
    assert out.clip_frac.item() == 0.5
    assert out.ratio.item() == pytest.approx((r1 + r2) / 2, rel=1e-6)
    assert out.approx_kl.item() == pytest.approx(0.5 * (0.04 + 0.0025) / 2, rel=1e-6)


def test_kl_to_the_reference_by_hand():
    mean = torch.zeros(2, 1, 2, 2)
    ref = torch.full((2, 1, 2, 2), 0.5)
    out = grpo_loss(
        torch.zeros(2),
        torch.zeros(2),
        torch.zeros(2),
        mean=mean,
        ref_mean=ref,
        std=torch.tensor(0.5),
        kl_beta=0.1,
    )
    # KL = 0.25 / (2 * 0.25) = 0.5 per element; the surrogate is 0 with zero advantages
    assert out.kl_ref.item() == pytest.approx(0.5)
    assert out.loss.item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="kl_beta"):
        grpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), kl_beta=0.1)
