"""Diffusion-KTO (Li et al., NeurIPS 2024), as the official code computes it.

KTO needs no pairs: each image carries its own label, desirable or undesirable. With e the
per-sample denoising error and g = e_ref - e_policy the implicit reward (positive when the policy
denoises the sample better than the frozen reference does):

    z0   = reference point, detached        (default: mean of g over the global batch, clamped at 0)
    x    = sign(y) * beta * (g - z0)        sign +1 desirable, -1 undesirable
    loss = mean over samples of lambda_y * (1 - u(x))

u is the utility: ``kahneman-tversky`` = sigmoid (the paper's choice), ``loss-averse`` = log
sigmoid, ``risk-seeking`` = -log sigmoid(-x). There is no 0.5 factor (unlike DPO's official code),
so beta = 5000 here is not DPO's beta = 5000. The reference point is what makes KTO more than "push
desirable up, undesirable down": a sample only gains utility by beating the batch's typical
improvement, and clamping at 0 stops a policy that got worse everywhere from being rewarded for
being merely less bad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from align.objectives.common import ObjectiveOutput
from align.objectives.distributed import all_reduce_mean

UTILITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "kahneman-tversky": torch.sigmoid,
    "loss-averse": F.logsigmoid,
    "risk-seeking": lambda x: -F.logsigmoid(-x),
}


@dataclass
class KTOOutput(ObjectiveOutput):
    """The loss and what a researcher watches while it trains (all detached except ``loss``).

    ``reward_desirable`` / ``reward_undesirable`` are the mean implicit reward g over this rank's
    samples of that class. A batch may hold no sample of a class (P(desirable) = 0.8 makes
    all-desirable batches common at small per-GPU batch sizes); the mean is then 0.0, never NaN, so
    an epoch average is not poisoned. ``frac_desirable`` (0 or 1 in exactly those batches) says when
    that happened; weight by it when exact per-class averages matter.
    """

    loss: torch.Tensor
    reward_desirable: torch.Tensor  # mean g over desirable samples; 0.0 when the batch has none
    reward_undesirable: torch.Tensor  # mean g over undesirable samples; 0.0 when the batch has none
    reference_point: torch.Tensor  # z0 used in this step
    implicit_acc: torch.Tensor  # fraction on their class's side of z0 (x > 0); a tie counts half
    frac_desirable: torch.Tensor  # fraction of this rank's samples labelled desirable
    policy_err: torch.Tensor  # mean policy error
    ref_err: torch.Tensor  # mean reference error


def kto_reference_point(policy_err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean of g = ref_err - policy_err over the global batch), detached,
    float32 scalar.

    Under DDP the mean runs over every rank's samples, each weighted equally (sums and counts are
    all-reduced, so ranks with unequal batch sizes are weighted by their counts). Every rank must
    call it. Detached because z0 is a baseline, not something the policy should move: with a
    gradient through it the loss could be lowered by shifting the whole batch's errors instead of
    separating the classes.
    """
    if policy_err.shape != ref_err.shape or policy_err.ndim != 1:
        raise ValueError(
            f"policy_err {tuple(policy_err.shape)} and ref_err {tuple(ref_err.shape)} "
            "must both be (N,)"
        )
    g = ref_err.detach().float() - policy_err.detach().float()
    mean, _ = all_reduce_mean(g)
    return mean.clamp(min=0.0)


def _class_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask, 0.0 (not NaN) when mask is empty."""
    count = mask.sum()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / count.clamp(min=1)


def kto_loss(
    policy_err: torch.Tensor,
    ref_err: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 5000.0,
    reference_point: torch.Tensor | float | None = None,
    utility: str = "kahneman-tversky",
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> KTOOutput:
    """Diffusion-KTO loss from per-sample errors (N,) and a bool ``desirable`` label (N,).

    ``reference_point`` None computes :func:`kto_reference_point` (a collective under DDP: call on
    every rank); pass a value to use another estimate, e.g. the paper's mismatched prompt/image
    variant. It is detached either way. ``lambda_d`` / ``lambda_u`` weight desirable / undesirable
    samples (1 and 1 in the paper).
    """
    if utility not in UTILITIES:
        raise ValueError(f"unknown utility {utility!r}; expected one of {sorted(UTILITIES)}")
    if policy_err.ndim != 1 or not policy_err.shape == ref_err.shape == desirable.shape:
        raise ValueError(
            f"policy_err {tuple(policy_err.shape)}, ref_err {tuple(ref_err.shape)} and desirable "
            f"{tuple(desirable.shape)} must all have the same shape (N,)"
        )
    if policy_err.shape[0] == 0:
        raise ValueError("kto_loss needs at least one sample")
    if desirable.dtype != torch.bool:
        raise TypeError(
            f"desirable must be a bool tensor, got {desirable.dtype} (use labels.bool() "
            "for 0/1 labels)"
        )
    desirable = desirable.to(policy_err.device)
    if reference_point is None:
        z0 = kto_reference_point(policy_err, ref_err)
    else:
        z0 = torch.as_tensor(
            reference_point, dtype=torch.float32, device=policy_err.device
        ).detach()
        if z0.ndim != 0:
            raise ValueError(f"reference_point must be a scalar, got shape {tuple(z0.shape)}")

    g = ref_err.detach().float() - policy_err.float()
    sign = torch.where(desirable, 1.0, -1.0).to(g)
    lam = torch.where(desirable, float(lambda_d), float(lambda_u)).to(g)
    x = sign * beta * (g - z0)
    loss = (lam * (1.0 - UTILITIES[utility](x))).mean()

    with torch.no_grad():
        g = g.detach()
        return KTOOutput(
            loss=loss,
            reward_desirable=_class_mean(g, desirable),
            reward_undesirable=_class_mean(g, ~desirable),
            reference_point=z0,
            implicit_acc=(torch.sign(x.detach()) + 1.0).mean() / 2.0,
            frac_desirable=desirable.float().mean(),
            policy_err=policy_err.detach().float().mean(),
            ref_err=ref_err.detach().float().mean(),
        )
