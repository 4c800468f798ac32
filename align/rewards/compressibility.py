"""DDPO's weight-free rewards: JPEG compressibility and incompressibility (Black et al. 2023).

Score = -(JPEG size in kB) (``jpeg-compressibility``: simpler images score higher) or +size
(``jpeg-incompressibility``), at quality 95 as ddpo-pytorch encodes. No weights, so it trains and
tests anywhere, and a policy visibly learns it within minutes: the embedded default of the online
configs. Not differentiable (RFT cannot use it; GRPO and generated pairs can).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from align.rewards.base import RewardModel
from align.rewards.registry import register_reward


class JpegSize(RewardModel):
    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def preprocess_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return images.clamp(0, 1)

    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = (pixel_values.detach().float().cpu() * 255).round().to(torch.uint8)
        sizes = []
        for image in pixels.permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=95)
            sizes.append(buf.tell() / 1000)
        return self.sign * torch.tensor(sizes, device=pixel_values.device)


@register_reward("jpeg-compressibility")
def build_compressibility(source: str | None = None, **_) -> JpegSize:
    return JpegSize(-1.0)


@register_reward("jpeg-incompressibility")
def build_incompressibility(source: str | None = None, **_) -> JpegSize:
    return JpegSize(1.0)
