"""The programmatic judge: reads a shapes-world image back and scores how many facts of a caption it
satisfies.

Facts of a caption: for every sentence naming a colour, a shape and a position, "the cell at that
position holds an object of that colour" and "... of that shape" (sentences without all three carry
no facts). Reading an image: in each cell, pixels far from the background are foreground; each takes
the nearest palette colour; the cell's colour is the majority colour if at least ``min_pixels``
pixels have it, else the cell is empty. Its shape is read from how much of the majority colour's
bounding box it fills (a square fills it, a triangle about half). Exact on rendered images (tested);
majority votes keep it stable on blurry generated ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from align.demo.world import BACKGROUND, COLORS, GRID, POSITIONS, SHAPES, Obj, cell_box, to_array

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)
_SENTENCE = re.compile(r"[^.]+")
_WORD = {name: re.compile(rf"\b{name}\b") for name in [*COLORS, *SHAPES, *POSITIONS]}


@dataclass(frozen=True)
class Fact:
    kind: str  # "color" or "shape"
    cell: int
    value: str


def parse_caption(text: str) -> list[Obj]:
    """The objects a caption states, in order: every sentence with one colour,
    one shape and one position."""
    objs = []
    for sent in _SENTENCE.findall(text.lower()):
        colors = [c for c in COLORS if _WORD[c].search(sent)]
        shapes = [s for s in SHAPES if _WORD[s].search(sent)]
        cells = [i for i, p in enumerate(POSITIONS) if _WORD[p].search(sent)]
        if len(colors) == 1 and len(shapes) == 1 and len(cells) == 1:
            objs.append(Obj(cells[0], colors[0], shapes[0]))
    return objs


def facts(text: str) -> list[Fact]:
    out = []
    for o in parse_caption(text):
        out += [Fact("color", o.cell, o.color), Fact("shape", o.cell, o.shape)]
    return out


@dataclass
class Reading:
    """What the judge sees in one cell: colour (None: empty) and shape (None: empty)."""

    color: str | None
    shape: str | None
    pixels: int


def read_image(
    image, fg_threshold: float = 90.0, min_pixels: int = 12, square_fill: float = 0.74
) -> list[Reading]:
    """One ``Reading`` per cell, row-major. ``image``: PIL, or an (H, W, 3) array
    (uint8, or float in [0, 1])."""
    arr = to_array(image).astype(np.float32)
    size = arr.shape[0]
    fg = np.linalg.norm(arr - np.array(BACKGROUND, np.float32), axis=-1) > fg_threshold
    nearest = np.argmin(((arr[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)
    out = []
    for cell in range(GRID * GRID):
        left, top, right, bottom = cell_box(cell, size)
        f, n = fg[top:bottom, left:right], nearest[top:bottom, left:right]
        counts = np.bincount(n[f], minlength=len(_NAMES))
        best = int(counts.argmax())
        if counts[best] < min_pixels:
            out.append(Reading(None, None, int(counts[best])))
            continue
        mask = f & (n == best)
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        shape = "square" if mask.sum() / box >= square_fill else "triangle"
        out.append(Reading(_NAMES[best], shape, int(counts[best])))
    return out


@dataclass
class Score:
    satisfied: int
    total: int
    color_ok: int
    shape_ok: int
    objects: int

    @property
    def value(self) -> float:
        """Fraction of the caption's facts the image satisfies (1.0 for a caption with no facts)."""
        return self.satisfied / self.total if self.total else 1.0


def judge(image, text: str, only_cells: set[int] | None = None) -> Score:
    """Score one image against one caption; ``only_cells`` restricts the facts to those cells'
    objects."""
    reading = read_image(image)
    objs = [o for o in parse_caption(text) if only_cells is None or o.cell in only_cells]
    color_ok = sum(reading[o.cell].color == o.color for o in objs)
    shape_ok = sum(reading[o.cell].shape == o.shape for o in objs)  # an empty cell has no shape
    return Score(color_ok + shape_ok, 2 * len(objs), color_ok, shape_ok, len(objs))


def judge_many(images, texts, only_cells=None) -> np.ndarray:
    """Scores (fractions of facts satisfied) of ``images[i]`` against ``texts[i]``, on the facts of
    ``only_cells[i]`` (None: every fact)."""
    cells = only_cells if only_cells is not None else [None] * len(texts)
    return np.array([judge(*args).value for args in zip(images, texts, cells)], dtype=np.float64)
