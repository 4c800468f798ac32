"""The shapes world and its judge: exact on rendered images, stable on degraded ones,
captions round-trip."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from align.demo import world
from align.demo.judge import Fact, facts, judge, parse_caption, read_image


def _jpeg(image: Image.Image, **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_caption_round_trip_and_facts():
    scene = (world.Obj(0, "red", "square"), world.Obj(3, "blue", "triangle"))
    text = world.caption(scene)
    assert text == "a red square in the top left. a blue triangle in the bottom right."
    assert parse_caption(text) == list(scene)
    assert facts(text) == [
        Fact("color", 0, "red"),
        Fact("shape", 0, "square"),
        Fact("color", 3, "blue"),
        Fact("shape", 3, "triangle"),
    ]
    assert parse_caption(world.caption(scene, long=True)) == list(scene)
    assert parse_caption("a picture of nothing. a red thing somewhere.") == []


def test_judge_is_exact_on_rendered_images():
    rng = random.Random(0)
    for _ in range(400):
        scene = world.random_scene(rng)
        image = world.render(scene, rng)
        reading = read_image(image)
        cells = {o.cell: o for o in scene}
        for cell, r in enumerate(reading):
            if cell in cells:
                assert (r.color, r.shape) == (cells[cell].color, cells[cell].shape)
            else:
                assert r.color is None and r.shape is None
        assert judge(image, world.caption(scene)).value == 1.0
        assert judge(_jpeg(image, quality=95, subsampling=0), world.caption(scene)).value == 1.0


def test_judge_counts_exactly_the_violated_facts():
    rng = random.Random(1)
    for _ in range(200):
        scene = world.random_scene(rng)
        lie = world.noisy_scene(scene, rng, p_color=0.5, p_shape=0.5)
        wrong = sum(a.color != b.color for a, b in zip(scene, lie)) + sum(
            a.shape != b.shape for a, b in zip(scene, lie)
        )
        score = judge(world.render(scene, rng), world.caption(lie))
        assert score.total == 2 * len(scene)
        assert score.total - score.satisfied == wrong
    # an object at the wrong position: both its facts fail (the cell it names is empty)
    image = world.render((world.Obj(0, "green", "square"),))
    s = judge(image, "a green square in the bottom right.")
    assert (s.satisfied, s.total) == (0, 2)
    assert judge(image, "a green square in the top left.").value == 1.0


@pytest.mark.parametrize("degrade", ["blur", "jpeg", "noise"])
def test_judge_reads_colours_of_degraded_images(degrade):
    """Generated images are blurry and noisy; the colour reading
    (majority vote) must survive that."""
    rng = random.Random(2)
    nrng = np.random.default_rng(0)
    ok = total = 0
    for _ in range(200):
        scene = world.random_scene(rng)
        image = world.render(scene, rng)
        if degrade == "blur":
            image = image.filter(ImageFilter.GaussianBlur(0.8))
        elif degrade == "jpeg":
            image = _jpeg(image, quality=50)
        else:
            arr = np.asarray(image).astype(np.float32) + nrng.normal(0, 20, (32, 32, 3))
            image = np.clip(arr, 0, 255).astype(np.uint8)
        s = judge(image, world.caption(scene))
        ok += s.color_ok
        total += s.objects
    assert ok == total


def test_long_captions_put_late_objects_beyond_77_tokens():
    from align.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    scene = tuple(world.Obj(c, "red", "square") for c in range(4))
    text = world.caption(scene, long=True)
    ids = tok(text).input_ids
    assert len(ids) > 77
    last = world.sentence(scene[-1], long=True)
    prefix = text[: text.index(last)]
    assert (
        len(tok(prefix).input_ids) - 1 >= 76
    )  # the last object's sentence starts at or after token 77


def test_noisy_scene_rates():
    rng = random.Random(3)
    scenes = [world.random_scene(rng) for _ in range(2000)]
    objs = [(o, n) for s in scenes for o, n in zip(s, world.noisy_scene(s, rng, 0.25, 0.1))]
    color_rate = np.mean([o.color != n.color for o, n in objs])
    shape_rate = np.mean([o.shape != n.shape for o, n in objs])
    assert abs(color_rate - 0.25) < 0.03 and abs(shape_rate - 0.1) < 0.03
    assert all(o.cell == n.cell for o, n in objs)
