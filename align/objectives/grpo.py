"""GRPO for denoising models (DDPO's stochastic DDIM, Flow-GRPO's group advantages): pure tensors.

A policy samples G images per prompt with DDIM at eta > 0, which makes every step a Gaussian
transition x_t -> x_{t-1} with a known density (ddpo-pytorch ``ddim_step_with_logprob``):

    mean = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps
    std  = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))

and log p(x_{t-1} | x_t) is that Gaussian's log density, averaged over the latent's dimensions
(DDPO's choice: a per-element mean keeps ratios near 1 whatever the latent size). Rewards become
advantages within each prompt's group (reward - group mean) / group std; a group whose rewards are
all equal carries no preference and is masked out (counted by the caller, never a NaN). The loss is
PPO's clipped surrogate on the ratio exp(logp_new - logp_old), optionally plus beta * KL to the
reference (the squared difference of the two transition means over 2 std^2: the Gaussians' exact
KL, Flow-GRPO's estimate).

``flow_sde_step_logprob`` is the same transition for flow matching (SD3, FLUX): Flow-GRPO's SDE
step with the velocity v (yifan123/flow_grpo, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py,
``sde_step_with_logprob``), with s the current sigma, dt = s_next - s < 0 and a the noise level:

    std_t = a * sqrt(s / (1 - s)),  s = 1 taken as s_next in the denominator (the first step)
    mean  = x + [v + std_t^2 / (2 s) * (x + (1 - s) v)] dt,  std = std_t * sqrt(-dt)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align.objectives.common import ObjectiveOutput


def ddim_std(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """The DDIM transition's standard deviation sigma_t(eta) (DDIM eq. 16)."""
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    return eta * variance.clamp(min=0).sqrt()


def _gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per sample (N,), averaged over the other dimensions."""
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.flatten(1).mean(dim=1)


def ddim_step_logprob(
    x0: torch.Tensor,
    eps: torch.Tensor,
    a_t: torch.Tensor,
    a_prev: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step from the model's x0 and eps predictions (float32).

    Returns (x_{t-1}, log p(x_{t-1} | x_t) per sample (N,), the transition mean). Without
    ``prev_sample`` x_{t-1} is drawn (``generator``); with it, its density is evaluated (the
    sample is detached: only the mean carries the policy's gradient)."""
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a transition density, got {eta}")
    x0, eps = x0.float(), eps.float()
    std = ddim_std(a_t.float(), a_prev.float(), eta)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        prev_sample = mean.detach() + std * noise
    prev_sample = prev_sample.detach().float()
    return prev_sample, _gaussian_logprob(prev_sample, mean, std), mean


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float, a 0-d or an (N,) tensor as a tensor broadcasting against ``like`` (N, ...)."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.view(-1, *[1] * (like.ndim - 1)) if value.ndim == 1 else value


def flow_sde_std(
    sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE noise scale std_t = a * sqrt(s / (1 - s)) and the transition's standard
    deviation std_t * sqrt(s - s_next). At s = 1 (the first step) the official code puts
    sigmas[1], the first step's s_next, in the denominator; so does this."""
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    std_t = noise_level * (sigma / (1 - torch.where(sigma == 1, sigma_next, sigma))).sqrt()
    return std_t, std_t * (sigma - sigma_next).sqrt()


def flow_sde_step_logprob(
    velocity: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step from x_t = ``sample`` at ``sigma`` to ``sigma_next`` < ``sigma``
    with the model's velocity (float32 at least). ``sigma`` and ``sigma_next``: floats, or (N,)
    tensors, one per sample. ``noise_level`` is Flow-GRPO's a (its default 0.7).

    Returns (x_next, log p(x_next | x_t) per sample (N,), the transition mean). Without
    ``prev_sample`` x_next is drawn (``generator``); with it, its density is evaluated (the sample
    is detached: only the mean carries the policy's gradient)."""
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for a transition density, got {noise_level}")
    dtype = torch.promote_types(torch.promote_types(velocity.dtype, sample.dtype), torch.float32)
    velocity, sample = velocity.to(dtype), sample.to(dtype)
    sigma, sigma_next = _per_sample(sigma, sample), _per_sample(sigma_next, sample)
    std_t, std = flow_sde_std(sigma, sigma_next, noise_level)
    dt = sigma_next - sigma
    mean = (
        sample * (1 + std_t**2 / (2 * sigma) * dt)
        + velocity * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=dtype)
        prev_sample = mean.detach() + std * noise
    prev_sample = prev_sample.detach().to(dtype)
    return prev_sample, _gaussian_logprob(prev_sample, mean, std), mean


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-4, clip: float | None = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r - group mean) / (group std + eps) within each group of ``group_size`` consecutive
    samples (Flow-GRPO's normalisation; the population std).

    Returns (advantages (N,), valid (N,) bool). A group whose rewards are all equal (std <= eps)
    has no advantage: its entries are 0 and not valid. ``clip`` bounds |advantage| (DDPO: 5)."""
    if rewards.ndim != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} must be (N,) with N a multiple of group_size >= 2 "
            f"(got group_size {group_size})"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("non-finite rewards: drop those samples before computing advantages")
    groups = rewards.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)  # numpy's, as DDPO and Flow-GRPO
    valid = (std > eps).expand_as(groups)
    adv = torch.where(valid, (groups - mean) / (std + eps), torch.zeros_like(groups))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.reshape(-1), valid.reshape(-1)


@dataclass
class GRPOOutput(ObjectiveOutput):
    loss: torch.Tensor
    ratio: torch.Tensor  # mean exp(logp_new - logp_old)
    clip_frac: torch.Tensor  # fraction of samples where the clip was active
    approx_kl: torch.Tensor  # 0.5 * mean (logp_new - logp_old)^2 (DDPO's diagnostic)
    kl_ref: torch.Tensor  # mean KL to the reference transition (0 without one)


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = 1e-4,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> GRPOOutput:
    """PPO's clipped surrogate for one denoising step of N samples:

        loss = mean(max(-A * r, -A * clip(r, 1 - c, 1 + c))) + kl_beta * mean KL

    with r = exp(log_prob - old_log_prob). The KL term needs the policy's and the reference's
    transition means and the step's std: KL = ||mean - ref_mean||^2 / (2 std^2), averaged over the
    latent's dimensions like the log-probabilities."""
    if not log_prob.shape == old_log_prob.shape == advantages.shape or log_prob.ndim != 1:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
            f"advantages {tuple(advantages.shape)} must all be (N,)"
        )
    advantages = advantages.detach().float()
    diff = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    kl = torch.zeros((), device=loss.device)
    if kl_beta:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("kl_beta > 0 needs mean, ref_mean and std")
        kl = ((mean.float() - ref_mean.detach().float()) ** 2).flatten(1).mean(dim=1)
        kl = (kl / (2 * std.float() ** 2)).mean()
        loss = loss + kl_beta * kl
    with torch.no_grad():
        return GRPOOutput(
            loss=loss,
            ratio=ratio.mean(),
            clip_frac=((ratio - 1).abs() > clip_range).float().mean(),
            approx_kl=0.5 * (diff**2).mean(),
            kl_ref=kl.detach(),
        )
