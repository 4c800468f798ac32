"""The shapes world: coloured squares and triangles in the cells of a grid on a dark background.

A scene is a list of objects, at most one per cell; its caption has one sentence per object, e.g.
``"a red square in the top left. a blue triangle in the bottom right."``. Everything is
deterministic given a ``random.Random``; rendering draws without anti-aliasing,
so colours are exact on rendered images.

Long captions (LongAlign) describe the same scenes with a sentence per object (the short sentence's
words plus a fact-free tail) after a preamble of sentences that carry no facts. The preamble alone
is 92 CLIP tokens, so every object's sentence starts beyond CLIP's 77 tokens: a 77-token encoder
never sees any fact of a long caption (``align.demo.longalign.cells_beyond`` names the cells whose
sentence lies past the limit).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
GRID = 2
BACKGROUND = (30, 30, 30)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
SHAPES = ("square", "triangle")
POSITIONS = (
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)  # cell index = row * GRID + col

LONG_PREAMBLE = (
    "this is a small synthetic picture drawn for a test of long prompts.",
    "the background of the whole picture is a plain dark grey without any texture or pattern at "
    "all.",
    "the picture is divided into four equal parts and every part holds at most a single object.",
    "the parts are not marked by any lines, and a part without an object shows only the plain "
    "background.",
    "every object is drawn with one flat colour and sharp edges, without any outline, shading or "
    "shadow.",
)  # no colour, shape or position words (the judge reads none of it); 92 CLIP tokens


@dataclass(frozen=True)
class Obj:
    cell: int  # 0..GRID*GRID-1, row-major
    color: str
    shape: str

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


Scene = tuple  # tuple[Obj, ...], sorted by cell


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = GRID * GRID) -> Scene:
    n = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    return tuple(Obj(c, rng.choice(list(COLORS)), rng.choice(SHAPES)) for c in cells)


def sentence(obj: Obj, long: bool = False) -> str:
    if long:
        return (
            f"a {obj.color} {obj.shape} in the {obj.position}, drawn flat and fairly large with "
            "sharp edges, "
            f"a single object on its own in that part of the picture."
        )
    return f"a {obj.color} {obj.shape} in the {obj.position}."


def caption(scene: Scene, long: bool = False) -> str:
    """The caption of a scene: one sentence per object (reading order); ``long`` adds a preamble."""
    parts = [sentence(o, long) for o in scene]
    return " ".join((list(LONG_PREAMBLE) if long else []) + parts)


def noisy_scene(scene: Scene, rng: random.Random, p_color: float, p_shape: float) -> Scene:
    """A copy of ``scene`` whose caption would lie: each object's colour (shape) wrong with
    ``p_color`` (``p_shape``).

    Used to caption the base model's training images so that it learns an imperfectly aligned model.
    """
    out = []
    for o in scene:
        color = (
            rng.choice([c for c in COLORS if c != o.color]) if rng.random() < p_color else o.color
        )
        shape = (
            rng.choice([s for s in SHAPES if s != o.shape]) if rng.random() < p_shape else o.shape
        )
        out.append(Obj(o.cell, color, shape))
    return tuple(out)


def cell_box(cell: int, size: int = SIZE) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), right/bottom exclusive, of a cell in pixels."""
    step = size // GRID
    r, c = divmod(cell, GRID)
    return c * step, r * step, (c + 1) * step, (r + 1) * step


def render(scene: Scene, rng: random.Random | None = None, size: int = SIZE) -> Image.Image:
    """The image of a scene; ``rng`` jitters each object's position and size by a pixel or so."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    step = size // GRID
    for o in scene:
        left, top, _, _ = cell_box(o.cell, size)
        half = step * 0.34 + (rng.uniform(-0.5, 0.5) if rng else 0.0)
        cx = left + step / 2 + (rng.uniform(-1, 1) if rng else 0.0)
        cy = top + step / 2 + (rng.uniform(-1, 1) if rng else 0.0)
        fill = COLORS[o.color]
        if o.shape == "square":
            draw.rectangle(
                [round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1],
                fill=fill,
            )
        else:
            draw.polygon(
                [(cx, cy - half - 1), (cx - half - 1, cy + half), (cx + half + 1, cy + half)],
                fill=fill,
            )
    return image


def to_array(image) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr


def scenes(n: int, seed: int, **kwargs) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, **kwargs) for _ in range(n)]
