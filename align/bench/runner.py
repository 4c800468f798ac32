"""Step times and peak memory of a step, through Lightning's Trainer (``lightning``) or a plain loop
doing the same work (``bare``, ``align.bench.step.BareStep``), on one in-memory batch fetched from a
``DataLoader`` each step, so data loading is not timed.

Step time is the interval between consecutive batch starts (the device synchronized at each): it
includes everything the loop does between two steps. Peak memory: CUDA's max allocated bytes; on
the CPU the whole process's peak RSS. docs/benchmarks.md says what each figure means.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone

import lightning as L
import torch
from lightning.pytorch.callbacks import LambdaCallback

from align.bench.flops import StepFlops, measure_matmul_rate
from align.bench.report import new_record, software_versions
from align.bench.step import PRECISIONS, BareStep, StepConfig, build_module, make_batch
from align.bench.step import quiet_logger, sync


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        model = next(names, model)
    return f"{model}, {os.cpu_count()} logical cores visible"


def _loader(batch: dict, n: int) -> torch.utils.data.DataLoader:
    """``n`` times one pre-built batch: data loading costs nothing, so only the step is timed."""
    return torch.utils.data.DataLoader([batch] * n, batch_size=None, collate_fn=lambda b: b)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib


def time_steps(
    mode: str, cfg: StepConfig, device: torch.device, warmup: int, steps: int
) -> tuple[list[float], int]:
    """(post-warm-up step times in seconds, peak memory in bytes) of ``warmup + steps`` steps of
    ``cfg`` in ``mode`` (``bare`` or ``lightning``) on a fresh module."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(cfg.seed)
    module = build_module(cfg, device)
    total = warmup + steps + 1
    loader = _loader(make_batch(module, cfg, device), total)
    if device.type == "cuda":
        # from here: the weights stay allocated and count, the build's transient (weights created
        # in float32 on the GPU, then frozen parts cast) does not; a real run builds on the CPU
        torch.cuda.reset_peak_memory_stats(device)
    starts = []

    def mark() -> None:
        sync(device)
        starts.append(time.perf_counter())

    if mode == "bare":
        step = BareStep(module, cfg)
        for index, batch in enumerate(loader):
            mark()
            step(batch, index)
        sync(device)
    else:
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
            callbacks=[LambdaCallback(on_train_batch_start=lambda *args: mark())],
        )
        trainer.fit(module, train_dataloaders=loader)
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    return intervals[warmup:], _peak_memory(device)


@functools.cache
def matmul_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """Measured matmul rate for the step's compute dtype: bf16 on CUDA for bf16 runs,
    else float32."""
    dtype = torch.bfloat16 if (precision == "bf16" and device.type == "cuda") else torch.float32
    return measure_matmul_rate(device, dtype), str(dtype).replace("torch.", "")


def run(
    cfg: StepConfig,
    device: torch.device,
    flops: StepFlops,
    warmup: int = 3,
    steps: int = 20,
    compare_bare: bool = False,
    rounds: int = 1,
) -> list[dict]:
    """Benchmark ``cfg`` and return one record per mode
    (``lightning``, and ``bare`` with ``compare_bare``).

    ``rounds`` > 1 alternates the modes that many times (fresh modules each round) and pools the
    timed steps, which evens out slow drifts of a shared machine.
    """
    if steps < 1 or warmup < 0 or rounds < 1:
        raise ValueError("need steps >= 1, warmup >= 0, rounds >= 1")
    modes = ("bare", "lightning") if compare_bare else ("lightning",)
    peak_rate, peak_dtype = matmul_peak(device, cfg.precision)
    load_start = os.getloadavg()
    started = datetime.now(timezone.utc)
    step_times = {mode: [] for mode in modes}
    peak_mem = dict.fromkeys(modes, 0)
    quiet = quiet_logger("lightning.pytorch", logging.WARNING)
    with quiet, warnings.catch_warnings(action="ignore"):
        for _ in range(rounds):
            for mode in modes:
                times, peak = time_steps(mode, cfg, device, warmup, steps)
                step_times[mode] += times
                peak_mem[mode] = max(peak_mem[mode], peak)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        **software_versions(),
    }
    mem_kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_process_peak_rss"
    records = []
    for mode in modes:
        times = step_times[mode]
        median = statistics.median(times)
        achieved = flops.unet / median
        records.append(
            {
                **new_record(cfg, mode, started),
                "warmup": warmup,
                "steps": steps,
                "rounds": rounds,
                "timed_steps": len(times),
                "median_step_s": median,
                "min_step_s": min(times),
                "max_step_s": max(times),
                "samples_per_s": cfg.batch / median,
                "images_per_s": cfg.images / median,
                "unet_flops_per_step": flops.unet,
                "total_flops_per_step": flops.total,
                "achieved_tflops": achieved / 1e12,
                "peak_tflops": peak_rate / 1e12,
                "peak_dtype": peak_dtype,
                "frac_of_peak": achieved / peak_rate,
                "peak_mem_mb": peak_mem[mode] / 2**20,
                "mem_kind": mem_kind,
                "env": env,
            }
        )
    if compare_bare:
        bare, lit = records
        lit["overhead_vs_bare_pct"] = 100.0 * (lit["median_step_s"] / bare["median_step_s"] - 1.0)
    return records
