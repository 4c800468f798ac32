"""Sampling inside a training step (RFT, GRPO): timesteps, guided predictions, stochastic
transitions with their log-probability, decoding.

UNets (SD1.5, SDXL) sample with DDIM (DDPO's transition at ``eta`` > 0); flow models (SD3, FLUX.1)
with Flow-GRPO's SDE form of the flow ODE (``noise_level`` = ``eta``) on the pipeline's own sigma
schedule. SD1.5/SDXL/SD3 guide by classifier-free guidance; FLUX.1 dev by its guidance embedding
(one forward, no unconditional rows), as its pipeline does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from align.models.embeds import PromptEmbeds
from align.objectives.grpo import (
    ddim_std,
    ddim_step_logprob,
    flow_sde_std,
    flow_sde_step_logprob,
)


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """DDIM's "trailing" spacing (the official 999, 979, ..., 19 for 1000 / 50)."""
    ts = torch.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps).round().long() - 1
    return ts[:num_steps]


class PolicySampling:
    """Mixed into a ``DiffusionModule`` that samples its own images while it trains; the subclass
    sets ``guidance_scale``, ``resolution`` and ``vae_checkpointing``, and calls
    ``setup_sampler`` for the sampler's schedule (GRPO's stochastic transitions, RFT's DDIM)."""

    guidance_scale: float
    resolution: int
    vae_checkpointing: bool = False

    @property
    def uses_cfg(self) -> bool:
        """Classifier-free guidance ([cond; uncond] rows); FLUX.1 is guided by its embedding."""
        return self.components.family != "flux"

    def conditioning(self, prompts: list[str]) -> tuple[PromptEmbeds, torch.Tensor | None]:
        """[cond; uncond] embeddings of ``prompts`` (cond only without CFG) and SDXL's time ids
        for as many rows."""
        n = len(prompts)
        with torch.no_grad():
            cond = self.encode_prompts(prompts)
            if not self.uses_cfg:
                return cond, None
            uncond = self.encode_prompts([""] * n)
        pooled = None if cond.pooled is None else torch.cat([cond.pooled, uncond.pooled])
        both = PromptEmbeds(torch.cat([cond.embeds, uncond.embeds]), pooled)
        return both, self.time_ids({}, 2 * n)

    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        side = self.resolution // self.components.vae_scale_factor
        device = self.device if generator is None else generator.device
        shape = (n, self.vae.config.latent_channels, side, side)
        return torch.randn(shape, generator=generator, device=device).to(self.device)

    def setup_sampler(self, num_steps: int, eta: float) -> None:
        """The sampler's timesteps (``self.timesteps``, what the denoiser is told) and the
        schedule of its transitions: DDIM's trailing spacing and alphas (UNets), or the flow
        pipeline's sigmas, FLUX's shifted for the image size (flow models)."""
        self.eta = eta
        if not self.components.is_flow:
            timesteps = ddim_timesteps(self.scheduler.config.num_train_timesteps, num_steps)
            alphas = self.scheduler.alphas_cumprod.float()
            prev = torch.cat([alphas[timesteps[1:]], alphas[:1]])
            self.register_buffer("timesteps", timesteps, persistent=False)
            self.register_buffer("a_t", alphas[timesteps], persistent=False)
            self.register_buffer("a_prev", prev, persistent=False)
            return
        sampler, kwargs = self.components.sampler(), {}
        if sampler.config.use_dynamic_shifting:  # FLUX: FluxPipeline's sigmas and shift
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            side = self.resolution // self.components.vae_scale_factor
            c = sampler.config
            limits = (c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            kwargs["mu"] = calculate_shift((side // 2) ** 2, *limits)
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
            # the embedded guidance is the sampler's, not the training default
            self.flow = dataclasses.replace(self.flow, guidance=self.guidance_scale)
        sampler.set_timesteps(None if "sigmas" in kwargs else num_steps, **kwargs)
        self.register_buffer("timesteps", sampler.timesteps.float(), persistent=False)
        self.register_buffer("sigmas", sampler.sigmas.float(), persistent=False)

    def transition(self, step: int, pred, x, prev_sample=None, generator=None):
        """(x_next, log-probability (N,), transition mean) of step ``step`` from the guided
        prediction ``pred`` at ``x``: drawn (``generator``), or ``prev_sample``'s."""
        if self.components.is_flow:
            sigmas = self.sigmas[step], self.sigmas[step + 1]
            args = (pred.float(), *sigmas, x, self.eta)
            return flow_sde_step_logprob(*args, prev_sample=prev_sample, generator=generator)
        x0, eps = self.x0_eps(pred, x, self.a_t[step])
        return ddim_step_logprob(
            x0, eps, self.a_t[step], self.a_prev[step], self.eta, prev_sample, generator
        )

    def transition_std(self, step: int) -> torch.Tensor:
        """The transition's standard deviation (the KL to the reference divides by it)."""
        if self.components.is_flow:
            return flow_sde_std(self.sigmas[step], self.sigmas[step + 1], self.eta)[1]
        return ddim_std(self.a_t[step], self.a_prev[step], self.eta)

    def guided_prediction(self, x, t, cond: PromptEmbeds, time_ids, unet=None) -> torch.Tensor:
        """CFG: one UNet call on [x; x] with [cond; uncond] -> uncond + s * (cond - uncond);
        without CFG (FLUX.1), the conditional prediction. ``unet``: default the policy's."""
        n, unet = x.shape[0], self.unet if unet is None else unet
        if not self.uses_cfg:
            return self.unet_forward(unet, x, t.expand(n), cond, time_ids)
        out = self.unet_forward(unet, torch.cat([x, x]), t.expand(2 * n), cond, time_ids)
        c, u = out[:n], out[n:]
        return u + self.guidance_scale * (c - u)

    def x0_eps(self, pred: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor):
        """(x0, eps) predicted at x_t from the UNet's output (epsilon or v), in float32."""
        pred = pred.float()
        if self.prediction_type == "epsilon":
            return (x - (1 - a_t).sqrt() * pred) / a_t.sqrt(), pred
        if self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * pred
            return x0, a_t.sqrt() * pred + (1 - a_t).sqrt() * x
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (float32), differentiable w.r.t. the latents
        (the VAE is frozen)."""
        vae = self.vae
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        z = z.to(vae.dtype)

        def run(z):
            return vae.decode(z).sample

        if self.vae_checkpointing and torch.is_grad_enabled():
            images = checkpoint(run, z, use_reentrant=False)
        else:
            images = run(z)
        return (images.float() * 0.5 + 0.5).clamp(0, 1)
