"""Supervised fine-tuning (SFT): the plain denoising loss, as LongAlign's SFT stage trains it.

loss = mean over samples of w_i * e_i, with e_i the per-sample error of
:func:`align.objectives.common.per_sample_error` (float32 MSE over C, H, W) and w_i = 1 by default.
Min-SNR-gamma weights (Hang et al. 2023) are offered as an option: they cap the weight of low-noise
timesteps, whose easy targets otherwise dominate the gradient. LongAlign itself trains with
unweighted MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.objectives.common import ObjectiveOutput, per_sample_error


@dataclass
class DenoiseOutput(ObjectiveOutput):
    """The loss and its diagnostics (all detached except ``loss``)."""

    loss: torch.Tensor
    err: torch.Tensor  # mean *unweighted* per-sample error: comparable across weighting schemes
    weight_mean: torch.Tensor  # mean per-sample weight (1.0 when unweighted)


def denoise_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> DenoiseOutput:
    """Mean over the batch of (optionally weighted) per-sample errors.

    ``weights`` (N,) multiply the errors and are *not* renormalised (the mean is over N, as
    diffusers' Min-SNR training computes it), so weights < 1 also shrink the effective learning
    rate. They are treated as constants (detached).
    """
    if pred.shape != target.shape or pred.ndim < 2:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match, shape (N, ...)"
        )
    err = per_sample_error(pred, target)
    if weights is None:
        loss = err.mean()
        weight_mean = torch.ones((), device=err.device)
    else:
        if weights.shape != err.shape:
            raise ValueError(
                f"weights must have shape ({err.shape[0]},), got {tuple(weights.shape)}"
            )
        weights = weights.detach().to(device=err.device, dtype=err.dtype)
        loss = (weights * err).mean()
        weight_mean = weights.mean()
    return DenoiseOutput(loss=loss, err=err.detach().mean(), weight_mean=weight_mean.detach())


def min_snr_weights(
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gamma: float = 5.0,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (N,) for integer ``timesteps`` (N,).

    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t]). Epsilon prediction: min(snr, gamma) / snr;
    v-prediction: min(snr, gamma) / (snr + 1), as in diffusers' training scripts. At snr = 0 (the
    last step of a zero-terminal-SNR schedule) the epsilon weight is its limit, 1, rather than 0/0.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if timesteps.ndim != 1 or timesteps.dtype.is_floating_point:
        raise ValueError(
            f"timesteps must be an integer (N,) tensor, got {timesteps.dtype} "
            f"{tuple(timesteps.shape)}"
        )
    ac = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]
    snr = ac / (1.0 - ac)
    capped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        weights = torch.where(
            snr > 0, capped / torch.where(snr > 0, snr, torch.ones_like(snr)), torch.ones_like(snr)
        )
    elif prediction_type == "v_prediction":
        weights = capped / (snr + 1.0)
    else:
        raise ValueError(
            f"unsupported prediction_type {prediction_type!r} (expected 'epsilon' or "
            "'v_prediction')"
        )
    return weights.float()
