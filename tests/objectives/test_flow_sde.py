import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from align.objectives.grpo import flow_sde_std, flow_sde_step_logprob


def _scheduler(steps: int = 10) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's
    sched.set_timesteps(steps)
    return sched


def _official(sched, velocity, timesteps, sample, noise_level, prev_sample):
    """Flow-GRPO's sde_step_with_logprob (yifan123/flow_grpo, sd3_sde_with_logprob.py), restated:
    the step found from the scheduler's timestep, sigma = 1 replaced by sched.sigmas[1]."""
    index = [sched.index_for_timestep(t) for t in timesteps]
    shape = (-1,) + (1,) * (sample.ndim - 1)
    s = sched.sigmas[index].view(shape)
    s_prev = sched.sigmas[[i + 1 for i in index]].view(shape)
    dt = s_prev - s
    std_t = torch.sqrt(s / (1 - torch.where(s == 1, sched.sigmas[1].item(), s))) * noise_level
    mean = (
        sample * (1 + std_t**2 / (2 * s) * dt) + velocity * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    )
    std = std_t * torch.sqrt(-dt)
    log_prob = (
        -((prev_sample - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean


@pytest.mark.parametrize("step", [0, 4, 9])  # the first (sigma = 1), a middle and the last step
@pytest.mark.parametrize("noise_level", [0.7, 0.3])
def test_log_prob_is_a_float64_gaussian_density(step, noise_level):
    sched = _scheduler()
    s, s_next = sched.sigmas[step].item(), sched.sigmas[step + 1].item()
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x_next, log_prob, mean = flow_sde_step_logprob(
        v, s, s_next, x, noise_level, generator=torch.Generator().manual_seed(2)
    )

    # independently, in float64: the SDE of Flow-GRPO eq. 9 discretised (Euler-Maruyama)
    x64, v64, dt = x.double(), v.double(), s_next - s
    std_t = noise_level * math.sqrt(s / (1 - (s_next if s == 1 else s)))
    mean64 = x64 + (v64 + std_t**2 / (2 * s) * (x64 + (1 - s) * v64)) * dt
    density = torch.distributions.Normal(mean64, std_t * math.sqrt(-dt)).log_prob(x_next.double())
    torch.testing.assert_close(mean.double(), mean64, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(log_prob.double(), density.flatten(1).mean(1), atol=1e-4, rtol=0)
    assert log_prob.shape == (3,) and log_prob.dtype == torch.float32
    _, std = flow_sde_std(s, s_next, noise_level)
    assert std.item() == pytest.approx(std_t * math.sqrt(-dt), rel=1e-6)


@pytest.mark.parametrize("step", [1, 5, 9])
def test_small_noise_mean_is_the_diffusers_euler_step(step):
    sched = _scheduler()
    torch.manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ode = sched.step(v, sched.timesteps[step], x).prev_sample
    sigma, sigma_next = sched.sigmas[step], sched.sigmas[step + 1]
    _, _, mean = flow_sde_step_logprob(v, sigma, sigma_next, x, noise_level=1e-4)
    torch.testing.assert_close(mean, ode, atol=1e-5, rtol=1e-5)
    # at the default noise level the mean moves off the ODE (towards the score's direction)
    _, _, mean = flow_sde_step_logprob(v, sigma, sigma_next, x)
    assert not torch.allclose(mean, ode, atol=1e-3)


def test_equals_the_official_step_on_random_inputs_with_a_step_per_sample():
    sched = _scheduler(40)
    steps = torch.tensor([0, 1, 17, 39])  # the first step's sigma = 1 among them
    torch.manual_seed(0)
    x, v, x_next = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    expected, expected_mean = _official(sched, v, sched.timesteps[steps], x, 0.7, x_next)
    _, log_prob, mean = flow_sde_step_logprob(
        v, sched.sigmas[steps], sched.sigmas[steps + 1], x, prev_sample=x_next
    )
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(log_prob, expected)


def test_packed_flux_latents_are_reduced_over_all_non_batch_dims():
    # FLUX's transformer sees (N, tokens, channels)
    x, v = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    out = flow_sde_step_logprob(v, torch.tensor([0.8, 0.5]), torch.tensor([0.7, 0.4]), x)
    assert out[0].shape == x.shape and out[1].shape == (2,)


def test_drawn_sample_is_reproducible_and_its_density_is_the_one_reported():
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    first = flow_sde_step_logprob(v, 0.6, 0.5, x, generator=torch.Generator().manual_seed(1))
    again = flow_sde_step_logprob(v, 0.6, 0.5, x, generator=torch.Generator().manual_seed(1))
    other = flow_sde_step_logprob(v, 0.6, 0.5, x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first[0], again[0])
    assert not torch.equal(first[0], other[0])
    evaluated = flow_sde_step_logprob(v, 0.6, 0.5, x, prev_sample=first[0])
    torch.testing.assert_close(evaluated[1], first[1])
    torch.testing.assert_close(evaluated[2], first[2])


def test_gradient_reaches_the_velocity_only_through_the_mean():
    x = torch.randn(2, 4, 4, 4)
    v = torch.randn(2, 4, 4, 4, requires_grad=True)
    x_next, log_prob, _ = flow_sde_step_logprob(v, 0.6, 0.5, x)
    assert not x_next.requires_grad
    log_prob.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_bf16_inputs_are_computed_in_float32():
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    low = flow_sde_step_logprob(v.bfloat16(), 0.6, 0.5, x.bfloat16(), prev_sample=x.bfloat16())
    assert all(t.dtype == torch.float32 for t in low)


def test_first_step_sigma_one_is_finite():
    sched = _scheduler(28)
    assert sched.sigmas[0].item() == 1.0
    x_next, log_prob, mean = flow_sde_step_logprob(
        torch.randn(2, 4, 8, 8), sched.sigmas[0], sched.sigmas[1], torch.randn(2, 4, 8, 8)
    )
    assert all(torch.isfinite(t).all() for t in (x_next, log_prob, mean))
    std_t, _ = flow_sde_std(sched.sigmas[0], sched.sigmas[1], 0.7)
    s1 = sched.sigmas[1].item()
    assert std_t.item() == pytest.approx(0.7 * math.sqrt(1 / (1 - s1)), rel=1e-5)


def test_noise_level_zero_has_no_density():
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_step_logprob(torch.zeros(1, 2), 0.5, 0.4, torch.zeros(1, 2), noise_level=0.0)
