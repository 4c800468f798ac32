"""align sample's rendering: fixed seeds, determinism, batching, resume, layout,
scheduler defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from align.eval.layout import ImageSetError, scan_image_set
from align.eval.sampling import SampleConfig, initial_latents, sample_images

PROMPTS = ["a cat", "a dog on a red car", "a mountain at sunset"]


@pytest.fixture(scope="module")
def tiny():
    from align.models import load_components

    return load_components("tiny")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def render(components, out, **kw):
    kw.setdefault("steps", 4)
    return sample_images(
        PROMPTS, out, SampleConfig("tiny", progress=False, **kw), components=components
    )


def test_layout_and_settings(tiny, tmp_path):
    result = render(tiny, tmp_path / "a", images_per_prompt=2, seed=10, steps=None)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert names == [
        "00000_10.png",
        "00000_11.png",
        "00001_10.png",
        "00001_11.png",
        "00002_10.png",
        "00002_11.png",
    ]
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert (meta["scheduler"], meta["steps"], meta["guidance_scale"]) == ("unipc", 25, 7.5)
    assert (meta["height"], meta["width"], meta["seeds"], meta["dtype"]) == (
        32,
        32,
        [10, 11],
        "float32",
    )
    image_set = scan_image_set(tmp_path / "a")
    assert (
        image_set.prompts == PROMPTS and image_set.seeds == [10, 11] and len(image_set.entries) == 6
    )
    assert result["rendered"] == 6 and result["kept"] == 0
    assert Image.open(tmp_path / "a" / "00001_11.png").size == (32, 32)


def test_ddim_defaults_to_50_steps(tiny, tmp_path):
    result = sample_images(
        PROMPTS[:1],
        tmp_path,
        SampleConfig("tiny", scheduler="ddim", progress=False),
        components=tiny,
    )
    assert result["settings"]["steps"] == 50 and result["settings"]["scheduler"] == "ddim"


def test_same_seed_same_image_any_batching(tiny, tmp_path):
    render(tiny, tmp_path / "a", images_per_prompt=2, batch_size=6)
    render(tiny, tmp_path / "b", images_per_prompt=2, batch_size=1)
    render(tiny, tmp_path / "c", images_per_prompt=2, batch_size=4)
    for path in (tmp_path / "a").glob("*.png"):
        a, b, c = (
            pixels(path),
            pixels(tmp_path / "b" / path.name),
            pixels(tmp_path / "c" / path.name),
        )
        # batched matmuls: +-1 level
        assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() <= 1, path.name
    a0, a1 = pixels(tmp_path / "a" / "00000_0.png"), pixels(tmp_path / "a" / "00000_1.png")
    assert np.abs(a0 - a1).mean() > 5  # another seed, another image
    # exactly reproducible run to run
    render(tiny, tmp_path / "d", images_per_prompt=2, batch_size=6)
    for path in (tmp_path / "a").glob("*.png"):
        assert (pixels(path) == pixels(tmp_path / "d" / path.name)).all()


def test_initial_noise_is_per_seed():
    both = initial_latents([3, 4], (4, 4, 4))
    torch_one = initial_latents([4], (4, 4, 4))
    assert (both[1] == torch_one[0]).all() and not (both[0] == both[1]).all()


def test_resume_keeps_rendered_images(tiny, tmp_path):
    out = tmp_path / "r"
    render(tiny, out, images_per_prompt=1)
    kept = out / "00001_0.png"
    stamp = kept.stat().st_mtime_ns
    (out / "00002_0.png").unlink()  # lost
    (out / "00000_0.png").write_bytes(b"truncated")  # interrupted mid-write by some other tool
    result = render(tiny, out, images_per_prompt=2)
    assert result["rendered"] == 2 + 3 and result["kept"] == 1
    assert kept.stat().st_mtime_ns == stamp
    assert json.loads((out / "meta.json").read_text())["seeds"] == [0, 1]
    assert render(tiny, out, images_per_prompt=2)["rendered"] == 0


def test_resume_refuses_other_settings_or_prompts(tiny, tmp_path):
    out = tmp_path / "r"
    render(tiny, out)
    with pytest.raises(ImageSetError, match="steps: 4 -> 5"):
        render(tiny, out, steps=5, images_per_prompt=2)
    with pytest.raises(ImageSetError, match="only in this prompt set"):
        sample_images(
            ["something else"], out, SampleConfig("tiny", steps=4, progress=False), components=tiny
        )


def test_sdxl_defaults_to_guidance_5(tmp_path):
    from align.models import load_components

    result = sample_images(
        ["a cat"],
        tmp_path,
        SampleConfig("tiny-xl", steps=2, progress=False),
        components=load_components("tiny-xl"),
    )
    assert (
        result["settings"]["guidance_scale"] == 5.0 and result["settings"]["model_type"] == "sdxl"
    )
    assert Image.open(tmp_path / "00000_0.png").size == (32, 32)
