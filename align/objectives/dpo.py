"""Diffusion-DPO (Wallace et al. 2023), exactly as the official training script computes it.

Rows ``[:B]`` of every input are the winners of B pairs and rows ``[B:]`` the losers; a pair's two
rows share noise and timestep (the module guarantees that). With e the per-sample denoising error:

    d_model = e_policy(w) - e_policy(l)
    d_ref   = e_ref(w)    - e_ref(l)            (no gradient)
    inside  = -0.5 * beta * (d_model - d_ref)
    loss    = mean over pairs of -log sigmoid(inside)

The diffusers example drops the 0.5 and halves beta (2500 vs 5000): the same loss. At initialisation
(policy == reference) inside = 0 and the loss is log 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from align.objectives.common import ObjectiveOutput


@dataclass
class DPOOutput(ObjectiveOutput):
    """The loss and what a researcher watches while it trains (all detached except ``loss``)."""

    loss: torch.Tensor
    implicit_acc: torch.Tensor  # fraction of pairs with inside > 0; a tie (inside == 0) counts half
    # mean of inside: implicit reward of the winner minus that of the loser
    reward_margin: torch.Tensor
    policy_err: torch.Tensor  # mean policy error over winners and losers
    ref_err: torch.Tensor  # mean reference error over winners and losers
    policy_err_w: torch.Tensor
    policy_err_l: torch.Tensor
    ref_err_w: torch.Tensor
    ref_err_l: torch.Tensor


def _split_pairs(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 1 or x.shape[0] % 2:
        raise ValueError(
            f"{name} must have shape (2B,) with winners in [:B] and losers in [B:], got "
            f"{tuple(x.shape)}"
        )
    return x.chunk(2)


def dpo_loss(policy_err: torch.Tensor, ref_err: torch.Tensor, beta: float = 5000.0) -> DPOOutput:
    """Diffusion-DPO loss from per-sample errors of shape (2B,), winners first.

    ``beta`` follows the official launchers' convention (with the 0.5 factor):
    5000 for SD1.5 and SDXL.
    """
    if policy_err.shape != ref_err.shape:
        raise ValueError(
            f"policy_err {tuple(policy_err.shape)} and ref_err {tuple(ref_err.shape)} "
            "differ in shape"
        )
    model_w, model_l = _split_pairs(policy_err, "policy_err")
    ref_w, ref_l = _split_pairs(ref_err.detach(), "ref_err")
    d_model = model_w - model_l
    d_ref = ref_w - ref_l
    inside = -0.5 * beta * (d_model - d_ref)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        acc = (inside > 0).float() + 0.5 * (inside == 0).float()
        return DPOOutput(
            loss=loss,
            implicit_acc=acc.mean(),
            reward_margin=inside.mean(),
            policy_err=policy_err.detach().mean(),
            ref_err=ref_err.detach().mean(),
            policy_err_w=model_w.detach().mean(),
            policy_err_l=model_l.detach().mean(),
            ref_err_w=ref_w.mean(),
            ref_err_l=ref_l.mean(),
        )
