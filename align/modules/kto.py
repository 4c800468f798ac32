"""Diffusion-KTO as a LightningModule: single labelled images in, ``kto_loss`` out
(``align.objectives.kto``)."""

from __future__ import annotations

import torch

from align.models.embeds import PromptEmbeds
from align.modules.base import DiffusionModule
from align.objectives.kto import kto_loss, kto_reference_point


def roll_prompts(cond: PromptEmbeds, shift: int = 1) -> PromptEmbeds:
    """Each image paired with another image's prompt (the paper's mismatched pairs): image i gets
    prompt i - ``shift`` (``roll``), so with a batch of one an image keeps its own prompt."""
    pooled = None if cond.pooled is None else cond.pooled.roll(shift, dims=0)
    return PromptEmbeds(cond.embeds.roll(shift, dims=0), pooled)


class KTOModule(DiffusionModule):
    """Diffusion-KTO (Li et al., NeurIPS 2024) on batches of images with a ``desirable`` bool label.

    Args:
        beta: 5000 in the paper (no 0.5 factor: x = sign * beta * (g - z0)).
        utility: ``kahneman-tversky`` (sigmoid, the paper's), ``loss-averse`` or ``risk-seeking``.
        lambda_d / lambda_u: per-class weights (1 and 1 in the paper).
        reference_point: ``batch`` — the mean of (ref_err - policy_err) over the global batch,
            clamped at 0 (default); ``mismatched`` — the same mean measured on the batch's images
            paired with the previous image's prompt (same noisy latents), the paper's estimate of
            the KL term; costs two more forwards without gradients,
            and needs at least 2 images per rank's batch.
    """

    def __init__(
        self,
        beta: float = 5000.0,
        utility: str = "kahneman-tversky",
        lambda_d: float = 1.0,
        lambda_u: float = 1.0,
        reference_point: str = "batch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if reference_point not in ("batch", "mismatched"):
            raise ValueError(
                f"reference_point must be 'batch' or 'mismatched', got {reference_point!r}"
            )
        self.beta, self.utility, self.lambda_d, self.lambda_u = beta, utility, lambda_d, lambda_u
        self.reference_point = reference_point

    def on_fit_start(self) -> None:
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if self.reference_point == "mismatched" and batch_size is not None and batch_size < 2:
            raise ValueError(
                "reference_point 'mismatched' pairs each image with another image's prompt in its "
                f"batch: it needs data.init_args.batch_size >= 2 per rank, got {batch_size}"
            )

    def objective_output(self, batch: dict):
        cond = self.prompt_embeds(batch)  # cached embeddings when the batch has them
        latents = self.encode_latents(batch)
        noise, t = self.sample_noise(latents)
        time_ids = self.time_ids(batch, latents.shape[0])
        policy = self.unet_errors(latents, noise, t, cond, time_ids)
        ref = self.unet_errors(latents, noise, t, cond, time_ids, reference=True)
        z0 = None
        if self.reference_point == "mismatched":
            mismatched = roll_prompts(cond)
            with torch.no_grad():
                policy_mm = self.unet_errors(latents, noise, t, mismatched, time_ids)
            ref_mm = self.unet_errors(latents, noise, t, mismatched, time_ids, reference=True)
            z0 = kto_reference_point(policy_mm, ref_mm)
        desirable = batch["desirable"].to(self.device)
        return kto_loss(
            policy,
            ref,
            desirable,
            beta=self.beta,
            reference_point=z0,
            utility=self.utility,
            lambda_d=self.lambda_d,
            lambda_u=self.lambda_u,
        )
