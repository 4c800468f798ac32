"""A differentiable relaxation of the shapes-world judge, as a registry reward
(``build_reward("shapes-judge")``).

Why it exists: the judge (``align.demo.judge``) is exact but reads images with argmins, thresholds
and majority votes, so it has no gradient; reward fine-tuning (``RFTModule`` with a direct reward)
backpropagates the reward through the decoded image, so it needs one. ``SoftJudge`` scores the same
facts with smooth operations. It is a training signal only: the exact judge stays the evaluator, and
the two agree in ranking on clear cases (tested), not in value.

The relaxation, per image and caption (objects parsed by ``judge.parse_caption``, exactly as the
judge does):

* every pixel gets a soft membership over {background, the 4 palette colours}:
  ``softmax(-||255 * pixel - colour|| / tau)`` (Euclidean distance, smoothed at 0; the judge takes
  the nearest colour, this is its soft version);
* colour fact = (target-colour mass in the object's cell) / max(foreground mass in the cell,
  ``min_pixels``): the share of the cell's foreground that has the stated colour (the judge's
  majority vote), near 0 for an empty cell (the judge's ``min_pixels``);
* shape fact = fit(stated shape) * softmax_shapes(fit / ``shape_temperature``)[stated shape], where
  fit(s) is the soft IoU of the cell's foreground (1 - p(background)) with shape s's mask as the
  renderer draws it, softly maximised over the renderer's position and size jitter (the best-fitting
  template): "an object is there, and it looks more like the stated shape than like the other" (the
  judge classifies the shape by its bounding-box fill instead, which has no useful gradient);
* object score = (colour + shape) / 2, reward = mean over objects, in [0, 1]; a caption stating no
  object scores 1, as with the judge. Cells the caption does not mention are ignored,
  as by the judge.

So a correct object scores near 1, the right shape in the wrong colour near 0.5, an empty cell near
0, the right colour in the wrong shape in between (as the judge's 1, 0.5, 0, 0.5). No trainable
parameters; the computation is float32 whatever ``.to(dtype)`` was applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from align.demo import world
from align.demo.judge import judge_many, parse_caption
from align.rewards.base import RewardModel
from align.rewards.registry import register_reward

# background first, then the palette in the judge's order
_PALETTE = torch.tensor([world.BACKGROUND, *world.COLORS.values()], dtype=torch.float32)
_COLOR_INDEX = {name: i + 1 for i, name in enumerate(world.COLORS)}


def _draw_mask(shape: str, cell: int, size: int, dx: float, dy: float, dhalf: float) -> np.ndarray:
    """The renderer's mask of one object (``world.render``'s geometry) with the given jitter."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    step = size // world.GRID
    left, top, _, _ = world.cell_box(cell, size)
    half, cx, cy = step * 0.34 + dhalf, left + step / 2 + dx, top + step / 2 + dy
    if shape == "square":
        box = [round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1]
        draw.rectangle(box, fill=1)
    else:
        corners = [(cx, cy - half - 1), (cx - half - 1, cy + half), (cx + half + 1, cy + half)]
        draw.polygon(corners, fill=1)
    return np.asarray(image, dtype=np.float32)


@lru_cache(maxsize=None)
def templates(size: int = world.SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape masks, cell masks): (len(SHAPES), cells, J, size, size) masks of every shape in every
    cell as the renderer draws it at J jitters (offsets in [-1, 1] px, half-size in [-0.5, 0.5] px:
    ``world.render``'s range), and (cells, size, size) masks of the cells."""
    offsets, halves = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    cells = world.GRID * world.GRID
    jitters = [(dx, dy, dh) for dx in offsets for dy in offsets for dh in halves]
    masks = [
        _draw_mask(s, c, size, *j) for s in world.SHAPES for c in range(cells) for j in jitters
    ]
    shapes = np.stack(masks).reshape(len(world.SHAPES), cells, len(jitters), size, size)
    boxes = np.zeros((cells, size, size), np.float32)
    for c in range(cells):
        left, top, right, bottom = world.cell_box(c, size)
        boxes[c, top:bottom, left:right] = 1.0
    return torch.from_numpy(shapes), torch.from_numpy(boxes)


class SoftJudge(RewardModel):
    """The judge's facts, relaxed to be differentiable (see the module doc).

    Args:
        tau: softness of the colour membership, in 0-255 pixel-distance units (smaller: closer to
            the judge's hard nearest colour, but vanishing gradients far from a decision boundary).
        min_pixels: foreground mass below which a cell's colour fact is damped
            (the judge's ``min_pixels``).
        fit_temperature: softness of the max over a template's jitters
            (smaller: closer to the best fit).
        shape_temperature: softness of the choice between the shapes' fits
            (smaller: closer to a hard choice).
    """

    name = "shapes-judge"

    def __init__(
        self,
        tau: float = 30.0,
        min_pixels: float = 12.0,
        fit_temperature: float = 0.02,
        shape_temperature: float = 0.08,
    ):
        super().__init__()
        self.tau, self.min_pixels = float(tau), float(min_pixels)
        self.fit_temperature = float(fit_temperature)
        self.shape_temperature = float(shape_temperature)
        # no parameters: this buffer only carries the device
        # (``.to(device)``) for ``RewardModel.score``
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # always computed in float32

    def preprocess_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
            raise ValueError(
                "shapes-judge needs square (N, 3, H, H) images in [0, 1]; got "
                f"{tuple(images.shape)}"
            )
        return images

    def memberships(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 1 + colours, H, W): soft membership of every pixel in {background,
        palette colours}."""
        x = pixel_values.float().clamp(0, 1) * 255.0
        palette = _PALETTE.to(x.device)
        d2 = ((x[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)  # (N, K, H, W)
        return torch.softmax(-torch.sqrt(d2 + 1.0) / self.tau, dim=1)

    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        p = self.memberships(pixel_values)
        shape_t, cell_t = (t.to(p.device) for t in templates(p.shape[-1]))
        fg = 1.0 - p[:, 0]
        out = []
        for i, prompt in enumerate(prompts):
            objs = parse_caption(prompt)
            if not objs:
                out.append(p.new_ones(()))
                continue
            scores = []
            for o in objs:
                fg_cell = fg[i] * cell_t[o.cell]
                mass = fg_cell.sum()
                color = (p[i, _COLOR_INDEX[o.color]] * cell_t[o.cell]).sum()
                color = color / mass.clamp(min=self.min_pixels)
                masks = shape_t[:, o.cell]  # (shapes, J, H, W)
                inter = (masks * fg_cell).sum((-2, -1))
                iou = inter / (masks.sum((-2, -1)) + mass - inter)
                # (shapes,): about the best jitter's
                fit = (torch.softmax(iou / self.fit_temperature, -1) * iou).sum(-1)
                k = world.SHAPES.index(o.shape)
                shape = fit[k] * torch.softmax(fit / self.shape_temperature, 0)[k]
                scores.append(0.5 * (color + shape))
            out.append(torch.stack(scores).mean())
        return torch.stack(out)


@register_reward("shapes-judge")
def build_soft_judge(source: str | None = None, **options) -> SoftJudge:
    """The soft shapes-world judge; it has no weights, so ``source`` is ignored."""
    return SoftJudge(**options)


class ExactJudge(SoftJudge):
    """The exact judge as a reward (no gradient): for methods that only need scores (GRPO,
    generated pairs). Images are rounded to 8 bits first, as the evaluation sees them."""

    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = (pixel_values.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        scores = judge_many(list(arrays), list(prompts))
        return torch.tensor(scores, dtype=torch.float32, device=pixel_values.device)


@register_reward("shapes-judge-exact")
def build_exact_judge(source: str | None = None, **_) -> ExactJudge:
    """The exact shapes-world judge; it has no weights, so ``source`` is ignored."""
    return ExactJudge()


class Redness(SoftJudge):
    """A deliberately misspecified reward: the share of the image drawn in the palette's red,
    whatever the caption says. Optimising it paints red over the stated colours, so the judge (the
    gold reward) falls while it rises: what ``align.callbacks.RewardMonitor`` must catch."""

    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        red = torch.tensor(world.COLORS["red"], dtype=torch.float32, device=pixel_values.device)
        pixels = pixel_values.float().permute(0, 2, 3, 1) * 255  # (N, H, W, 3)
        close = (pixels - red).norm(dim=-1) < 60  # the judge's nearest-colour radius, roughly
        return close.float().mean(dim=(1, 2))


@register_reward("shapes-redness")
def build_redness(source: str | None = None, **_) -> Redness:
    """The misspecified colour-only reward; no weights, so ``source`` is ignored."""
    return Redness()
