"""FLOPs of one training step, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the
module's real ``training_step`` and ``backward`` (on the meta device: nothing allocated, so an
SDXL-size step is counted on a laptop), and the device's measured matmul rate.

"Model FLOPs": the denoisers' (the UNets of SD1.5/SDXL, the flow transformers of SD3/FLUX.1: policy
forward + backward, reference forward), counted without gradient checkpointing or
``torch.compile``, since recomputation is hardware work, not model work, and with attention on
SDPA's math path (two matmuls forward, their gradients backward) on every device: the meta device
has no other, and the counter knows no formula for the CPU's fused kernel. The prompt encoder is
reported separately and the VAE encoder in ``other``; with cached latents and embeddings they do
not run. docs/benchmarks.md has the details and the figures.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from align.bench.report import new_record, software_versions
from align.bench.step import StepConfig, build_module, make_batch, sync


@dataclass
class StepFlops:
    """FLOPs of one step (forward + backward + reference forward), split by component."""

    total: int
    unet: int  # the denoiser's (UNet or flow transformer): policy fwd + bwd, reference fwd
    text: int  # prompt encoder forward
    other: int  # everything else (the VAE encoder when latents are not cached)
    images: int  # images per step through the policy (2 x pairs for DPO)
    by_op: dict[str, int]


def count_step_flops(cfg: StepConfig, meta: bool = True) -> StepFlops:
    """Count the FLOPs of ``cfg``'s step with the real module (on the meta device, or the CPU)."""
    cached_text = cfg.cached_text
    # The meta device cannot run the cached-embeddings path (it branches on a tensor's value); count
    # the text encoders and drop them below instead: with cached embeddings they do not run,
    # and nothing else changes.
    cfg = cfg.replace(
        gradient_checkpointing=False,
        compile_unet=False,
        compile_reference=False,
        cached_text=cfg.cached_text and not meta,
    )
    module = build_module(cfg, meta=meta)
    batch = make_batch(module, cfg)
    # warnings: self.log() without a Trainer
    with warnings.catch_warnings(action="ignore"), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            module.training_step(batch, 0).backward()
    counts = counter.get_flop_counts()

    def flops_of(name: str) -> int:
        return int(sum(counts.get(name, {}).values()))

    total = int(counter.get_total_flops())
    unet = flops_of(type(module.unet).__name__)
    text = flops_of(type(module.prompt_encoder).__name__)
    by_op = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
    if cached_text and meta:
        total, text = total - text, 0
    return StepFlops(
        total=total, unet=unet, text=text, other=total - unet - text, images=cfg.images, by_op=by_op
    )


def flops_record(cfg: StepConfig, flops: StepFlops) -> dict:
    """A FLOP-count-only record (meta device: no timing, no memory)."""
    return {
        **new_record(cfg, "flops"),
        "unet_flops_per_step": flops.unet,
        "text_flops_per_step": flops.text,
        "other_flops_per_step": flops.other,
        "total_flops_per_step": flops.total,
        "unet_flops_per_sample": flops.unet / cfg.batch,
        "flops_by_op": flops.by_op,
        "env": {
            "device": "meta (shapes only; FLOPs are device-independent)",
            **software_versions(),
        },
    }


def measure_matmul_rate(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """The device's measured dense matmul rate in FLOP/s: the best of 5 timings of a few square
    ``n x n`` matmuls (2 n^3 FLOPs each). The denominator of "fraction of peak"."""
    device = torch.device(device)
    n, iters = (8192, 20) if device.type == "cuda" else (1024, 4)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, allocator
    sync(device)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best
