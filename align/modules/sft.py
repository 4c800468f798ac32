"""Supervised fine-tuning (SFT) as a LightningModule: images and captions in, ``denoise_loss`` out.

LongAlign's SFT stage (segment encoder, UNet LoRA, T5 adapter trainable) and the SFT baselines of
the Diffusion-DPO / Diffusion-KTO papers (full or LoRA fine-tuning on preferred images, CLIP
encoder) are this one module with different configs. There is no reference model.
"""

from __future__ import annotations

from pathlib import Path

from align.models.sampling import save_prompt_encoder
from align.modules.base import DiffusionModule
from align.objectives.denoise import DenoiseOutput, denoise_loss, min_snr_weights


class SFTModule(DiffusionModule):
    """The denoising loss on batches of B images with captions, with any prompt encoder.

    Args:
        snr_gamma: Min-SNR-gamma loss weights (e.g. 5.0); None
            (default, as LongAlign) trains unweighted MSE.
        Everything else: see ``DiffusionModule``. With ``prompt_encoder: segment`` and
        ``prompt_encoder_args: {t5: {source: ...}}`` the T5 adapter trains with the UNet
            (or its LoRA).

    Export (``DiffusersExport``): the base's diffusers export (pipeline directory, or LoRA file),
    plus ``prompt_encoder.json`` and, with the T5 branch, ``text_adapter/`` (layout:
    ``align.models.sampling``).
    """

    needs_reference = False

    def __init__(self, snr_gamma: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if snr_gamma is not None and self.flow is not None:
            raise ValueError(
                "snr_gamma (Min-SNR) weights DDPM timesteps; a flow model's loss weighting is "
                "flow.weighting_scheme (sigma_sqrt, cosmap, or none)"
            )
        self.snr_gamma = snr_gamma

    def objective_output(self, batch: dict) -> DenoiseOutput:
        # caption dropout, then the encoder (or a latent cache's embeddings)
        cond = self.prompt_embeds(batch)
        latents = self.encode_latents(batch)
        noise, t = self.sample_noise(latents)
        time_ids = self.time_ids(batch, latents.shape[0])
        noisy = self.noisy_latents(latents, noise, t)
        pred = self.unet_forward(self.unet, noisy, t, cond, time_ids)
        pred, target, weights = self.prediction_target(pred, latents, noise, noisy, t)
        if self.snr_gamma is not None:  # UNets only: a flow model refuses snr_gamma
            weights = min_snr_weights(
                t, self.scheduler.alphas_cumprod, self.snr_gamma, self.prediction_type
            )
        return denoise_loss(pred, target, weights)

    def export(self, out_dir: str | Path) -> Path:
        out, hp = super().export(out_dir), self.hparams
        save_prompt_encoder(
            self.prompt_encoder, out, hp.prompt_encoder, hp.get("prompt_encoder_args")
        )
        return out
