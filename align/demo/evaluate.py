"""Sampling and judging: DDIM (flow models: Euler) with classifier-free guidance through a stock
diffusers pipeline, fixed seeds."""

from __future__ import annotations

import time

import numpy as np
import torch

from align.demo.judge import judge_many


def make_pipeline(components, unet=None):
    """The judged sampler: DDIM for the UNets, the flow models' own Euler sampler."""
    from diffusers import DDIMScheduler

    if components.is_flow:
        scheduler = components.sampler()
    else:
        scheduler = DDIMScheduler.from_config(components.noise_scheduler.config)
    pipe = components.to_pipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(
    pipe,
    captions: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 4.0,
    encoder=None,
    batch: int = 64,
) -> np.ndarray:
    """(len(captions) * len(seeds), H, W, 3) uint8, caption-major:
    image j of caption i from seed ``seeds[j]``."""
    from align.models.sampling import denoiser_of, generate

    prompts = [c for c in captions for _ in seeds]
    all_seeds = [s for _ in captions for s in seeds]
    unet = denoiser_of(pipe)
    was_training = unet.training
    unet.eval()
    out = []
    try:
        for i in range(0, len(prompts), batch):
            imgs = generate(
                pipe,
                prompts[i : i + batch],
                encoder=encoder,
                steps=steps,
                guidance=guidance,
                seed=all_seeds[i : i + batch],
                output_type="np",
            )
            out.append((np.clip(np.asarray(imgs), 0, 1) * 255).round().astype(np.uint8))
    finally:
        unet.train(was_training)
    return np.concatenate(out)


def first_seeds_score(scores, seeds_per_caption: int, k: int | None) -> float:
    """Mean of caption-major ``scores`` (``seeds_per_caption`` per caption) over each caption's
    first ``k`` seeds."""
    return float(np.asarray(scores, dtype=np.float64).reshape(-1, seeds_per_caption)[:, :k].mean())


def caption_means(scores, seeds_per_caption: int) -> list[float]:
    """Each caption's mean score over its sampling seeds (``scores`` caption-major)."""
    return np.asarray(scores, dtype=np.float64).reshape(-1, seeds_per_caption).mean(1).tolist()


def evaluate(
    pipe, captions: list[str], seeds: list[int], encoder=None, only_cells=None, **kw
) -> dict:
    """Mean judge score (fraction of facts satisfied) of samples for ``captions`` x ``seeds``;
    ``only_cells``: per caption, the cells whose facts are judged (None: every fact)."""
    t = time.time()
    images = sample(pipe, captions, seeds, encoder=encoder, **kw)
    texts = [c for c in captions for _ in seeds]
    cells = None if only_cells is None else [k for k in only_cells for _ in seeds]
    scores = judge_many(images, texts, cells)
    return {
        "score": float(scores.mean()),
        "scores": scores,
        "images": images,
        "seconds": time.time() - t,
    }
