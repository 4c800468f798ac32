"""Warm-up, timing and peak memory of a step, through Lightning's Trainer or a bare PyTorch loop.

Both paths run the same module code on the same in-memory batch,
fetched from a ``DataLoader`` each step:

* ``lightning``: ``Trainer.fit`` with ``max_steps`` (no logger, checkpointing, progress bar or
  sanity check; ``self.log`` bookkeeping, hooks, precision plugin and gradient clipping run as in a
  real run);
* ``bare``: a plain loop doing the same work (``align.bench.step.BareStep``).

Step time is the interval between consecutive batch starts (the device synchronized at each), so it
includes everything the loop does between two steps. The first ``warmup`` intervals are dropped; the
median of the rest is reported. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the
mode (weights, gradients, optimizer state and activations; the counter is reset before the module is
built); on the CPU the process's peak resident set size (``ru_maxrss``): a high-water mark of the
whole process so far (Python, libraries, the models and any earlier mode), not a per-step figure.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from align.bench.flops import StepFlops, count_step_flops, measure_matmul_rate
from align.bench.step import PRECISIONS, BareStep, StepConfig, build_module, make_batch
from align.models.presets import get_preset

MODES = ("bare", "lightning")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores visible"


class _SameBatch(torch.utils.data.Dataset):
    """``n`` copies of one pre-built batch: data loading costs nothing,
    so only the step is timed."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.batch


def _identity(x):
    return x


def _loader(batch: dict, n: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _SameBatch(batch, n), batch_size=None, collate_fn=_identity, num_workers=0
    )


class _PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda_max_memory_allocated"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss * (1 if sys.platform == "darwin" else 1024), "cpu_process_peak_rss"


@dataclass
class Timing:
    mode: str
    step_times: list[float] = field(default_factory=list)  # post-warm-up intervals, seconds
    peak_mem_bytes: int = 0
    mem_kind: str = ""


def time_bare(cfg: StepConfig, device: torch.device, warmup: int, steps: int) -> Timing:
    memory = _PeakMemory(device)
    memory.reset()
    torch.manual_seed(cfg.seed)
    module = build_module(cfg, device)
    step = BareStep(module, cfg)
    starts = []
    for index, batch in enumerate(_loader(make_batch(module, cfg, device), warmup + steps + 1)):
        sync(device)
        starts.append(time.perf_counter())
        step(batch, index)
    sync(device)
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    peak, kind = memory.peak()
    del step, module
    return Timing("bare", intervals[warmup:], peak, kind)


def time_lightning(cfg: StepConfig, device: torch.device, warmup: int, steps: int) -> Timing:
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self):
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync(device)
            self.starts.append(time.perf_counter())

    memory = _PeakMemory(device)
    memory.reset()
    torch.manual_seed(cfg.seed)
    module = build_module(cfg, device)
    batch = make_batch(module, cfg, device)
    timer = StepTimer()
    total = warmup + steps + 1
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=PRECISIONS[cfg.precision],
        max_steps=total,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=cfg.grad_clip or None,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=_loader(batch, total))
    intervals = [b - a for a, b in zip(timer.starts, timer.starts[1:])]
    peak, kind = memory.peak()
    del trainer, module
    return Timing("lightning", intervals[warmup:], peak, kind)


def software_versions() -> dict[str, str]:
    import diffusers
    import lightning
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cuda": torch.version.cuda or "",
        "platform": platform.platform(),
    }


_PEAK_CACHE: dict[tuple[str, str], float] = {}


def matmul_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """Measured matmul rate for the step's compute dtype: bf16 on CUDA for bf16 runs,
    else float32."""
    dtype = torch.bfloat16 if (precision == "bf16" and device.type == "cuda") else torch.float32
    key = (str(device), str(dtype))
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = measure_matmul_rate(device, dtype)
    return _PEAK_CACHE[key], str(dtype).replace("torch.", "")


def run(
    cfg: StepConfig,
    device: torch.device,
    warmup: int = 3,
    steps: int = 20,
    compare_bare: bool = False,
    rounds: int = 1,
    flops: StepFlops | None = None,
) -> list[dict]:
    """Benchmark ``cfg`` and return one record per mode
    (``lightning``, and ``bare`` with ``compare_bare``).

    ``rounds`` > 1 alternates the modes that many times (fresh modules each round) and pools the
    timed steps, which evens out slow drifts of a shared machine.
    """
    if steps < 1 or warmup < 0 or rounds < 1:
        raise ValueError("need steps >= 1, warmup >= 0, rounds >= 1")
    modes = ("bare", "lightning") if compare_bare else ("lightning",)
    flops = flops or count_step_flops(cfg)
    peak_rate, peak_dtype = matmul_peak(device, cfg.precision)
    load_start = os.getloadavg()
    started = datetime.now(timezone.utc)
    timings = {mode: Timing(mode) for mode in modes}
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(rounds):
                for mode in modes:
                    timing = (time_bare if mode == "bare" else time_lightning)(
                        cfg, device, warmup, steps
                    )
                    pooled = timings[mode]
                    pooled.step_times += timing.step_times
                    pooled.peak_mem_bytes = max(pooled.peak_mem_bytes, timing.peak_mem_bytes)
                    pooled.mem_kind = timing.mem_kind
    finally:
        lightning_logger.setLevel(level)
    load_end = os.getloadavg()
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        **software_versions(),
    }
    records = []
    for mode in modes:
        t = timings[mode]
        median = statistics.median(t.step_times)
        achieved = flops.unet / median
        records.append(
            {
                "time_utc": started.isoformat(timespec="seconds"),
                "mode": mode,
                **cfg.to_dict(),
                "resolution": cfg.resolution or _native_resolution(cfg.preset),
                "sample_unit": cfg.sample_unit,
                "warmup": warmup,
                "steps": steps,
                "rounds": rounds,
                "timed_steps": len(t.step_times),
                "median_step_s": median,
                "min_step_s": min(t.step_times),
                "max_step_s": max(t.step_times),
                "samples_per_s": cfg.batch / median,
                "images_per_s": cfg.images / median,
                "unet_flops_per_step": flops.unet,
                "total_flops_per_step": flops.total,
                "achieved_tflops": achieved / 1e12,
                "peak_tflops": peak_rate / 1e12,
                "peak_dtype": peak_dtype,
                "frac_of_peak": achieved / peak_rate,
                "peak_mem_mb": t.peak_mem_bytes / 2**20,
                "mem_kind": t.mem_kind,
                "env": env,
            }
        )
    if compare_bare:
        bare, lit = records
        lit["overhead_vs_bare_pct"] = 100.0 * (lit["median_step_s"] / bare["median_step_s"] - 1.0)
    return records


def _native_resolution(preset: str) -> int:
    return get_preset(preset).resolution


def flops_record(cfg: StepConfig, flops: StepFlops) -> dict:
    """A FLOP-count-only record (meta device: no timing, no memory)."""
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "flops",
        **cfg.to_dict(),
        "resolution": cfg.resolution or _native_resolution(cfg.preset),
        "sample_unit": cfg.sample_unit,
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
