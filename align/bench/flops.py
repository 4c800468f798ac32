"""FLOPs of one training step, counted by torch's own FLOP counter,
and the device's measured matmul rate.

``count_step_flops`` runs the module's real ``training_step`` and ``backward`` under
``torch.utils.flop_counter.FlopCounterMode``. With ``meta=True`` every weight and activation lives
on the meta device: shapes propagate, nothing is allocated or computed, so the FLOPs of an SDXL-size
step are counted on a laptop in seconds.

What is counted (the convention of "model FLOPs"):
* the UNet FLOPs: policy forward + backward and reference forward, on every image of the step (for
  DPO the winner and the loser of each pair); this is the numerator of achieved TFLOP/s and of the
  fraction of peak;
* the prompt encoder's forward, reported separately, and 0 when the batch carries cached prompt
  embeddings (on the meta device it is counted and then removed: by_op still includes it);
* the VAE encoder only when latents are not cached (``other``).
Counted with gradient checkpointing off and without ``torch.compile``: recomputation is hardware
work, not model work. On the meta device attention runs SDPA's math path (two matmuls forward, their
gradients backward); a flash kernel does the same model FLOPs (plus a recompute in its backward,
which is not counted).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from align.bench.step import StepConfig, build_module, make_batch


@dataclass
class StepFlops:
    """FLOPs of one step (forward + backward + reference forward), split by component."""

    total: int
    unet: int  # policy forward + backward, reference forward
    text: int  # prompt encoder forward
    other: int  # everything else (the VAE encoder when latents are not cached)
    images: int  # images per step through the policy (2 x pairs for DPO)
    by_op: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def count_step_flops(
    cfg: StepConfig, meta: bool = True, device: torch.device | str = "cpu"
) -> StepFlops:
    """Count the FLOPs of ``cfg``'s step with the real module (on the meta device by default)."""
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
    module = build_module(cfg, device=device, meta=meta)
    batch = make_batch(module, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer
        with FlopCounterMode(display=False) as counter:
            loss = module.training_step(batch, 0)
            loss.backward()
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int | None = None,
    iters: int | None = None,
    trials: int = 5,
) -> float:
    """The device's measured dense matmul rate in FLOP/s: the best of ``trials`` timings of
    ``iters`` square ``n x n`` matmuls (2 n^3 FLOPs each). The denominator of "fraction of peak"."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    if iters is None:
        iters = 20 if device.type == "cuda" else 4
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, allocator
    _sync(device)
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best
