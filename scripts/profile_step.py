"""Where a benchmarked step's time goes: torch.profiler over a few steps of `align bench`'s own step.

    python scripts/profile_step.py --preset sd15-arch --batch 4 [--mode bare|lightning] [--compile] ...

Prints, per step: wall time, the time the GPU spent in kernels (the sum of kernel durations), kernel launches,
host-device synchronisations (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize``, each of which stops the
host from queueing work ahead of the GPU) and ``cudaMemcpy*`` calls (copies either way; one from pageable host
memory may synchronise too); then the ops with the most host time. A step whose GPU time is far below its wall time is launch- or sync-bound, not compute-bound.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from align.bench.runner import _loader, pick_device, sync
from align.bench.step import BareStep, StepConfig, build_module, make_batch

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def summarise(prof, steps: int, wall: float, device: torch.device) -> None:
    events = prof.key_averages()
    # as torch's own "Self CUDA time total": kernels and copies, not user annotations such as ProfilerStep#
    kernel_us = sum(e.self_device_time_total for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)  # cudaLaunchKernel[ExC], cuLaunchKernel[Ex]
    syncs = {e.key: e.count // steps for e in events if e.key.startswith(SYNC_EVENTS)}
    items = sum(e.count for e in events if e.key == "aten::_local_scalar_dense") // steps
    print(f"per step: wall {1000 * wall / steps:.1f} ms | GPU kernels {kernel_us / 1000 / steps:.1f} ms "
          f"| {launches // steps} kernel launches | .item()-style reads {items} | syncs {syncs}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", default="dpo")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--mode", choices=["bare", "lightning"], default="bare")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    cfg = StepConfig(objective=args.objective, preset=args.preset, batch=args.batch,
                     precision="bf16" if device.type == "cuda" else "32", compile_unet=args.compile,
                     channels_last=args.channels_last, optimizer=args.optimizer)
    module = build_module(cfg, device)
    batch = make_batch(module, cfg, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    total = args.warmup + args.steps
    prof = profile(activities=activities, schedule=schedule(wait=args.warmup, warmup=0, active=args.steps))
    marks: list[float] = []
    if args.mode == "bare":
        step = BareStep(module, cfg)
        with prof:
            for index, b in enumerate(_loader(batch, total)):
                sync(device)
                marks.append(time.perf_counter())
                step(b, index)
                prof.step()
            sync(device)
            marks.append(time.perf_counter())
    else:
        import lightning as L

        class Step(L.Callback):
            def on_train_batch_start(self, *a):
                sync(device)
                marks.append(time.perf_counter())

            def on_train_batch_end(self, *a):
                prof.step()

        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                            precision="bf16-mixed" if cfg.precision == "bf16" else "32-true", max_steps=total + 1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            gradient_clip_val=cfg.grad_clip, callbacks=[Step()])
        with prof:
            trainer.fit(module, train_dataloaders=_loader(batch, total + 1))
    wall = marks[total] - marks[args.warmup]
    print(f"{args.objective} / {args.preset}, batch {args.batch}, {cfg.precision}, {args.mode}, {device}")
    summarise(prof, args.steps, wall, device)


if __name__ == "__main__":
    main()
