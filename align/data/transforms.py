"""Image preprocessing of the official recipes: resize the shorter side, crop
(center or random), flip.

Crops and flips are drawn here (not by torchvision's random transforms) because SDXL conditions on
the crop's top-left corner and the original size, so the module needs the numbers; a pair's two
images can share their crop and flip ("joint") or draw them independently.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image


@dataclass
class Augmented:
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before any resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


@dataclass
class ImageTransform:
    """Resize shorter side to ``resolution``, crop a square (``center``/``random``),
    flip with ``flip_prob``."""

    resolution: int = 512
    crop: str = "center"
    flip_prob: float = 0.5

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")

    def draw(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int, bool]:
        """(top, left, flip) for an image of PIL ``size`` (width, height) after resizing."""
        w, h = size
        scale = self.resolution / min(w, h)
        rw, rh = max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))
        if self.crop == "center":
            top, left = (rh - self.resolution) // 2, (rw - self.resolution) // 2
        else:
            top, left = rng.randint(0, rh - self.resolution), rng.randint(0, rw - self.resolution)
        return top, left, rng.random() < self.flip_prob

    def apply(self, image: Image.Image, top: int, left: int, flip: bool) -> Augmented:
        w, h = image.size
        resized = TF.resize(
            image, self.resolution, interpolation=TF.InterpolationMode.BILINEAR, antialias=True
        )
        cropped = TF.crop(resized, top, left, self.resolution, self.resolution)
        if flip:
            cropped = TF.hflip(cropped)
        pixels = TF.to_tensor(cropped) * 2.0 - 1.0
        return Augmented(pixels, (h, w), (top, left))

    def __call__(self, image: Image.Image, rng: random.Random = random) -> Augmented:
        return self.apply(image, *self.draw(image.size, rng))


def augment_pair(
    transform: ImageTransform,
    first: Image.Image,
    second: Image.Image,
    joint: bool,
    rng: random.Random = random,
) -> tuple[Augmented, Augmented]:
    """Both images of a pair; ``joint`` gives them the same crop and flip when their sizes match."""
    params = transform.draw(first.size, rng)
    other = params if (joint and first.size == second.size) else transform.draw(second.size, rng)
    return transform.apply(first, *params), transform.apply(second, *other)
