"""Pieces shared by the objectives: the regression target, the per-sample error and the base of
their output dataclasses."""

from __future__ import annotations

import torch


class ObjectiveOutput:
    """Base of an objective's output dataclass: ``loss`` and diagnostics, logged by ``metrics``."""

    def metrics(self) -> dict[str, torch.Tensor]:
        """Every field, detached."""
        return {k: v.detach() for k, v in self.__dict__.items()}


def diffusion_target(
    prediction_type: str,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler=None,
) -> torch.Tensor:
    """What the UNet is trained to predict, per the scheduler's ``prediction_type``.

    ``epsilon``: the noise. ``v_prediction``: the velocity alpha_t * noise - sigma_t * x0, computed
    by the scheduler itself (``get_velocity``) so that our target can never drift from the one
    diffusers samples with.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        if scheduler is None:
            raise ValueError("v_prediction needs the noise scheduler to compute the velocity")
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r} (expected 'epsilon' or 'v_prediction')"
    )


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dimension but the batch: shape (N,).

    Computed in float32 whatever the autocast dtype, because DPO and KTO take *differences* of these
    errors and multiply them by beta = 5000: bf16 rounding there would swamp the signal.
    """
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)
