"""Synthetic long-caption shards (``jpg``, ``txt``, ``json``; see ``align.data.schema``) for the
embedded LongAlign default and the tests.

Each image is a plain background with three to five flat shapes, one per cell of an invisible 3 x 3
grid; its caption describes the scene sentence by sentence: the background, every shape (size,
colour, kind, grid position), then spatial relations between pairs of shapes. Every sentence is true
of the image, and captions run to roughly 100-200 CLIP tokens, so what is said after CLIP's 77th
token (the later shapes and relations) is information a 77-token encoder never sees and the segment
encoder does.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from align.data.synthetic import BACKGROUNDS, COLORS, SHAPES, _article, _write_shards
from align.data.synthetic import draw_shape, jpeg_bytes

CELLS = [
    "top left corner",
    "top middle",
    "top right corner",
    "middle of the left side",
    "center",
    "middle of the right side",
    "bottom left corner",
    "bottom middle",
    "bottom right corner",
]
SIZES = {"small": 0.22, "large": 0.40}  # radius as a fraction of a grid cell's side


def _relation(a: dict, b: dict) -> str:
    """A true spatial relation of shape ``a`` to shape ``b`` (cells differ, so one always holds)."""
    ra, ca = divmod(a["cell"], 3)
    rb, cb = divmod(b["cell"], 3)
    if ca != cb:
        where = "to the left of" if ca < cb else "to the right of"
    else:
        where = "above" if ra < rb else "below"
    return f"The {a['color']} {a['shape']} is {where} the {b['color']} {b['shape']}."


def synthetic_scene(rng: random.Random) -> dict:
    """Background and 3-5 shapes with distinct cells and distinct (colour, shape) combinations."""
    n = rng.randint(3, 5)
    cells = rng.sample(range(9), n)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    objects = [
        {"cell": cell, "color": color, "shape": shape, "size": rng.choice(list(SIZES))}
        for cell, (color, shape) in zip(cells, kinds)
    ]
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects}


def scene_caption(scene: dict, rng: random.Random) -> str:
    objects = scene["objects"]
    sentences = [
        f"This picture shows {len(objects)} flat geometric shapes on a plain {scene['background']} "
        f"background, arranged on an invisible three by three grid."
    ]
    for i, o in enumerate(objects):
        opener = "First" if i == 0 else ("Finally" if i == len(objects) - 1 else "Next")
        sentences.append(
            f"{opener}, in the {CELLS[o['cell']]} there is {_article(o['size'])} {o['size']} "
            f"{o['color']} {o['shape']} with sharp edges and a uniform colour."
        )
    pairs = [(a, b) for a in objects for b in objects if a is not b]
    for a, b in rng.sample(pairs, min(3, len(pairs))):
        sentences.append(_relation(a, b))
    sentences.append(
        f"Nothing else appears in the image, and the {scene['background']} background is "
        f"completely even, without texture, shadows or text."
    )
    return " ".join(sentences)


def render_scene(scene: dict, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for o in scene["objects"]:
        row, col = divmod(o["cell"], 3)
        cx = (col + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        cy = (row + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        draw_shape(draw, o["shape"], o["color"], cx, cy, SIZES[o["size"]] * cell)
    return image


def synthetic_longcaption(index: int, size: int, rng: random.Random) -> dict:
    """One long-caption sample: ``jpg``, ``txt`` (the caption) and ``json``
    (source and the scene)."""
    scene = synthetic_scene(rng)
    caption = scene_caption(scene, rng)
    meta = {"source": "synthetic", "index": index, **scene}
    return {
        "__key__": f"{index:09d}",
        "jpg": jpeg_bytes(render_scene(scene, size, rng)),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta).encode(),
    }


def write_synthetic_longcaption(
    out_dir: str | Path, samples: int = 256, shards: int = 4, resolution: int = 64, seed: int = 0
) -> list[Path]:
    """Write ``samples`` long-caption samples into ``shards`` tars ``longcaption-000000.tar`` ...;
    returns them."""

    def make(i: int, rng: random.Random) -> dict:
        return synthetic_longcaption(i, resolution, rng)

    return _write_shards(out_dir, "longcaption", samples, shards, make, seed)
