"""The soft judge (the shapes world's differentiable reward): ranks images as the exact judge does
on clear cases, has gradients w.r.t. the pixels, no parameters,
and is built by the reward registry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from align.demo import world
from align.demo.judge import judge
from align.demo.soft_judge import SoftJudge, templates

O = world.Obj


@pytest.fixture(scope="module")
def soft():
    return SoftJudge().freeze()


def renders(scene, n=4, seed=0):
    rng = random.Random(seed)
    return [world.render(scene, rng) for _ in range(n)]


def as_tensor(images) -> torch.Tensor:
    return torch.from_numpy(
        np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    ).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "cell,color,shape", [(0, "red", "square"), (3, "yellow", "triangle"), (1, "blue", "triangle")]
)
def test_ranks_correct_over_wrong_colour_over_empty_and_right_over_wrong_shape(
    soft, cell, color, shape
):
    cap = world.caption((O(cell, color, shape),))
    other_color = next(c for c in world.COLORS if c != color)
    other_shape = next(s for s in world.SHAPES if s != shape)
    cases = {
        "correct": (O(cell, color, shape),),
        "wrong colour": (O(cell, other_color, shape),),
        "wrong shape": (O(cell, color, other_shape),),
        "empty": (),
        "other cell": (O((cell + 1) % 4, color, shape),),
    }
    got = {name: soft.score(renders(scene), cap) for name, scene in cases.items()}
    worst, best = (
        {k: float(v.min()) for k, v in got.items()},
        {k: float(v.max()) for k, v in got.items()},
    )
    assert worst["correct"] > 0.9 and best["empty"] < 0.1 and best["other cell"] < 0.1
    assert (
        worst["correct"] > best["wrong colour"] > 0.3 > best["empty"]
    )  # right shape, wrong colour: ~0.5
    assert worst["correct"] > best["wrong shape"] and worst["wrong shape"] > best["empty"]
    # the same on PIL and tensor input, and on blurred images (generated ones are blurry)
    images = renders(cases["correct"])
    torch.testing.assert_close(soft.score(as_tensor(images), cap), got["correct"])
    blurred = [im.filter(ImageFilter.GaussianBlur(1.0)) for im in images]
    assert float(soft.score(blurred, cap).min()) > best["wrong colour"]


def test_agrees_in_ranking_with_the_exact_judge(soft):
    """On rendered scenes under noisy captions (0, 1 or 2 wrong facts per object), every image the
    judge ranks higher the soft judge ranks higher too."""
    rng = random.Random(0)
    scenes = [world.random_scene(rng, max_objects=2) for _ in range(60)]
    caps = [world.caption(world.noisy_scene(s, rng, 0.5, 0.5)) for s in scenes]
    images = [world.render(s, rng) for s in scenes]
    exact = np.array([judge(im, c).value for im, c in zip(images, caps)])
    got = soft.score(images, caps).numpy()
    levels = sorted(set(exact))
    assert len(levels) >= 3
    for lo, hi in zip(levels, levels[1:]):
        assert got[exact == lo].max() < got[exact == hi].min(), (lo, hi)
    # hand-made: two objects, one right, one wrong colour; and a caption with no facts scores 1
    # (as the judge)
    scene = (O(0, "green", "square"), O(3, "blue", "triangle"))
    im = world.render(scene)
    both = "a green square in the top left. a blue triangle in the bottom right."
    half = "a green square in the top left. a red triangle in the bottom right."
    assert judge(im, both).value > judge(im, half).value
    assert float(soft.score([im], both)) > float(soft.score([im], half))
    assert (
        float(soft.score([im], "a picture of nothing."))
        == 1.0
        == judge(im, "a picture of nothing.").value
    )


def test_gradients_wrt_the_images_are_finite_and_non_zero(soft):
    images = renders((O(2, "red", "triangle"),), n=2) + [world.render(())]
    x = as_tensor(images)
    x = (0.8 * x + 0.1).requires_grad_(True)  # off the exact palette, as a generated image is
    caps = [
        "a red triangle in the bottom left.",
        "a blue square in the bottom left.",
        "a red triangle in the bottom left.",
    ]
    scores = soft.score(x, caps, grad=True)
    assert scores.requires_grad and scores.shape == (3,)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(float(g.abs().sum()) > 0 for g in x.grad)  # every image, the empty one included
    # the gradient lives in the objects' cell: the other cells do not enter the score
    left, top, right, bottom = world.cell_box(2)
    outside = x.grad.clone()
    outside[..., top:bottom, left:right] = 0
    assert float(outside.abs().sum()) == 0.0


def test_templates_are_the_renderers_shapes():
    shapes, cells = templates(world.SIZE)
    assert shapes.shape[:2] == (len(world.SHAPES), world.GRID * world.GRID)
    centre = shapes.shape[2] // 2  # the middle jitter is no jitter
    for s, shape in enumerate(world.SHAPES):
        for cell in range(world.GRID * world.GRID):
            drawn = np.asarray(world.render((O(cell, "red", shape),))) != np.array(
                world.BACKGROUND, np.uint8
            )
            assert np.array_equal(shapes[s, cell, centre].numpy() > 0, drawn.any(-1))
            assert (
                float((shapes[s, cell] * (1 - cells[cell])).sum()) == 0
            )  # every jitter stays in its cell


def test_registry_builds_it_without_parameters_in_any_dtype():
    from align.rewards import available_rewards, build_reward

    assert "shapes-judge" in available_rewards()
    reward = build_reward("shapes-judge", source="ignored", dtype=torch.bfloat16)
    assert isinstance(reward, SoftJudge) and reward.name == "shapes-judge"
    assert not list(reward.parameters()) and not reward.training
    image = world.render((O(0, "red", "square"),))
    score = reward.score([image], "a red square in the top left.")
    assert score.dtype == torch.float32 and float(score) > 0.9
    assert not hasattr(reward, "embed_images")  # not CLIP-based: RFT maximises it directly


def test_exact_judge_reward_is_the_judge_and_redness_pays_for_red_only():
    from align.rewards import build_reward

    scene = (O(0, "red", "square"), O(3, "blue", "triangle"))
    wrong = (O(0, "red", "square"), O(3, "red", "triangle"))
    images = renders(scene, 2) + renders(wrong, 2)
    caption = world.caption(scene)
    exact = build_reward("align.demo.soft_judge:shapes-judge-exact")
    scores = exact.score(as_tensor(images), [caption] * 4)
    assert scores.tolist() == pytest.approx([judge(im, caption).value for im in images])
    assert scores[0] == 1.0 and scores[2] < 1.0
    red = build_reward("align.demo.soft_judge:shapes-redness").score(
        as_tensor(images), [caption] * 4
    )
    assert red[2] > red[0] > 0  # the wrong image has more red, and scores higher
