"""Sampling inside a training step (RFT, GRPO): DDIM timesteps, guided predictions, decoding."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from align.models.embeds import PromptEmbeds


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """DDIM's "trailing" spacing (the official 999, 979, ..., 19 for 1000 / 50)."""
    ts = torch.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps).round().long() - 1
    return ts[:num_steps]


class DDIMSampling:
    """Mixed into a ``DiffusionModule`` that samples its own images while it trains; the subclass
    sets ``guidance_scale``, ``resolution`` and ``vae_checkpointing``."""

    guidance_scale: float
    resolution: int
    vae_checkpointing: bool = False

    def conditioning(self, prompts: list[str]) -> tuple[PromptEmbeds, torch.Tensor | None]:
        """[cond; uncond] embeddings of ``prompts`` and SDXL's time ids for 2 N rows."""
        n = len(prompts)
        with torch.no_grad():
            cond, uncond = self.encode_prompts(prompts), self.encode_prompts([""] * n)
        pooled = None if cond.pooled is None else torch.cat([cond.pooled, uncond.pooled])
        both = PromptEmbeds(torch.cat([cond.embeds, uncond.embeds]), pooled)
        return both, self.time_ids({}, 2 * n)

    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        side = self.resolution // self.components.vae_scale_factor
        device = self.device if generator is None else generator.device
        shape = (n, self.unet.config.in_channels, side, side)
        return torch.randn(shape, generator=generator, device=device).to(self.device)

    def guided_prediction(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: PromptEmbeds,
        time_ids: torch.Tensor | None,
        unet: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """CFG: one UNet call on [x; x] with [cond; uncond] -> uncond + s * (cond - uncond)."""
        n = x.shape[0]
        out = self.unet_forward(
            unet or self.unet, torch.cat([x, x]), t.expand(2 * n), cond, time_ids
        )
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
