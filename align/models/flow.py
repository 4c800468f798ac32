"""Flow matching (SD3/SD3.5, FLUX.1): training timesteps, noisy inputs, targets, loss weights and
the transformer call, as diffusers' training scripts compute them (``examples/dreambooth/
train_dreambooth_lora_sd3.py`` / ``..._flux.py``):

    u ~ density(weighting_scheme)          logit-normal, mode or uniform
    t = scheduler.timesteps[int(u * N)]    the training schedule's timesteps (SD3: shifted by 3)
    sigma = t / N;  x_t = (1 - sigma) x_0 + sigma * noise;  target = noise - x_0
    loss weight = compute_loss_weighting_for_sd3(weighting_scheme, sigma)   (1 but for sigma_sqrt /
    cosmap)

The per-sample error is the weighted float32 MSE over every non-batch dimension (the scripts' loss
before its batch mean: ``DiffusionModule.prediction_error``), so DPO, KTO and SFT take it as they
take the UNets'. The velocity target
is what the FLUX script, Flow-GRPO and its DPO baseline train; the SD3 script's default
``precondition_outputs`` (an x_0 target: pred_x0 = x_t - sigma * v) is offered as an option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from align.models.embeds import PromptEmbeds

SCHEMES = ("logit_normal", "mode", "uniform", "none", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class FlowMatching:
    """How a flow model is trained: the timestep density and loss weighting (defaults: the SD3
    script's logit-normal(0, 1), unweighted; ``DiffusionModule`` gives FLUX its script's uniform
    ``none``) and, for guidance-distilled FLUX.1 dev, the guidance the transformer is told during
    training (the FLUX script's default, 3.5)."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float = 3.5
    precondition_outputs: bool = False

    def __post_init__(self):
        if self.weighting_scheme not in SCHEMES:
            raise ValueError(
                f"flow weighting_scheme must be one of {SCHEMES}, got {self.weighting_scheme!r}"
            )

    def sample_timesteps(
        self, scheduler, n: int, generator: torch.Generator, low: int = 0, high: int = 1000
    ) -> torch.Tensor:
        """(n,) float timesteps of ``scheduler``'s training schedule, drawn as diffusers' scripts
        draw them; ``[low, high)`` keeps the same density on the timesteps in that range (the
        full range draws exactly the scripts' timesteps; ``high`` = N includes t = N)."""
        density = (self.weighting_scheme, n, self.logit_mean, self.logit_std, self.mode_scale)
        u = compute_density_for_timestep_sampling(*density, generator.device, generator)
        timesteps = scheduler.timesteps.to(generator.device)
        # flow timesteps lie in (0, N]: a range up to N includes t = N (sigma = 1)
        top = high >= scheduler.config.num_train_timesteps
        inside = ((timesteps >= low) & ((timesteps < high) | top)).nonzero().flatten()
        if inside.numel() == 0:
            raise ValueError(f"no training timestep of the flow schedule lies in [{low}, {high})")
        first, count = int(inside[0]), inside.numel()
        index = first + (u * count).long().clamp(max=count - 1)
        return timesteps[index]

    @staticmethod
    def sigmas(t: torch.Tensor, scheduler) -> torch.Tensor:
        return t.float() / scheduler.config.num_train_timesteps

    def noisy(self, latents, noise, t, scheduler) -> torch.Tensor:
        sigma = self.sigmas(t, scheduler).view(-1, *([1] * (latents.ndim - 1))).to(latents)
        return (1.0 - sigma) * latents + sigma * noise

    def prediction_and_target(self, pred, latents, noise, noisy, t, scheduler):
        """What the loss compares: the velocity and ``noise - latents``, or with
        ``precondition_outputs`` the implied x_0 and the latents."""
        if not self.precondition_outputs:
            return pred, noise - latents
        sigma = self.sigmas(t, scheduler).view(-1, *([1] * (latents.ndim - 1)))
        return pred.float() * -sigma.to(pred.device) + noisy.float(), latents

    def weights(self, t: torch.Tensor, scheduler) -> torch.Tensor | None:
        """Per-sample loss weights (N,), or None when they are all 1."""
        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigmas(t, scheduler))


def transformer_forward(
    family: str,
    transformer,
    noisy: torch.Tensor,
    t: torch.Tensor,
    cond: PromptEmbeds,
    guidance: float = 3.5,
) -> torch.Tensor:
    """The flow transformer's velocity for latents ``noisy`` (B, C, H, W), in the same layout.

    SD3 takes the raw timestep; FLUX.1 takes t / 1000, packed 2 x 2 latent patches with their
    position ids, zero text ids and (dev) the guidance embedding, as ``FluxPipeline`` calls it.
    """
    dtype = transformer.dtype
    pooled = cond.pooled.to(dtype)
    if family == "sd3":
        return transformer(
            hidden_states=noisy.to(dtype),
            timestep=t,
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=pooled,
        ).sample
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
    text_ids = torch.zeros(cond.embeds.shape[1], 3, device=noisy.device, dtype=dtype)
    embedded = None
    if transformer.config.guidance_embeds:
        embedded = torch.full((b,), float(guidance), device=noisy.device, dtype=torch.float32)
    velocity = transformer(
        hidden_states=packed,
        timestep=t / 1000,
        guidance=embedded,
        pooled_projections=pooled,
        encoder_hidden_states=cond.embeds.to(dtype),
        txt_ids=text_ids,
        img_ids=image_ids,
    ).sample
    # the pipeline's unpacking, from pixel sizes: 2 latent pixels a side per token, factor 1 here
    return FluxPipeline._unpack_latents(velocity, h, w, 1)
