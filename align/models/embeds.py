"""What a prompt encoder hands the UNet (the CLIP and the segment encoders both make it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeds:
    """UNet conditioning of a batch: ``embeds`` (B, L, D); ``pooled`` (B, P) for SDXL, else None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def repeat(self, n: int) -> "PromptEmbeds":
        """The batch stacked n times along dim 0 (pairs: winners and losers share one caption)."""
        return PromptEmbeds(
            self.embeds.repeat(n, 1, 1), None if self.pooled is None else self.pooled.repeat(n, 1)
        )

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        return PromptEmbeds(
            self.embeds.to(*args, **kwargs),
            None if self.pooled is None else self.pooled.to(*args, **kwargs),
        )
