"""Dry-run a training config: batch, steps, data passes, learning rate, memory and time per GPU.

Examples:
    align plan configs/dpo/sd15.yaml --devices 16 --num-samples 851293
    align plan --config configs/dpo/sdxl.yaml --gpu a100 --mfu 0.3
    align plan configs/kto/sd15.yaml --config configs/trainer/ddp_6gpu.yaml --trainer.max_steps 5000

Nothing is downloaded and nothing trains: the config is resolved as ``align fit`` resolves it (later
configs and dotted flags override), the data's size comes from its shards' manifests (or
--num-samples; remote shards' manifests are fetched from where the shards are, and remote shards
that no manifest lists are not downloaded to count them), memory and FLOPs from the model built on
the meta device (DPO and KTO configs; about 25 s for SD1.5; with FSDP's FULL_SHARD or HYBRID_SHARD
the static memory is divided by the GPUs sharing it). For the paper configs the official
launcher's settings are printed beside ours. A plan that cannot fit the GPU exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import replace

from align.commands import tool_parser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parser() -> argparse.ArgumentParser:
    from align.bench.plan import GPUS

    p = tool_parser("align plan", __doc__, details=True)

    add = p.add_argument
    add("configs", nargs="*", help="config files (as --config)")
    add("--config", action="append", default=[], help="config file; repeat to compose")
    add("--devices", type=int, help="GPUs per node (default: trainer.devices)")
    add("--num-nodes", type=int, help="nodes (default: trainer.num_nodes)")
    add("--gpu", default="h100", help=f"GPU for memory and time: {', '.join(GPUS)}")
    add("--num-samples", type=int, help="training samples (default: the shards' manifests)")
    add(
        "--mfu",
        type=float,
        help="model FLOP utilisation for the time estimate "
        "(default: the nearest measured one in docs/)",
    )
    add("--preset", help="architecture to estimate the model with (default: from the model id)")
    add("--no-estimate", action="store_true", help="skip the memory and time estimates")
    return p


def resolve(configs: list[str], overrides: list[str]) -> dict:
    """The config as ``align fit`` would resolve it, without instantiating anything."""
    from align.lightning_cli import CLI_KWARGS, AlignCLI

    class PlanCLI(AlignCLI):
        def instantiate_classes(self) -> None:  # a plan builds nothing
            pass

    args = [a for c in configs for a in ("--config", c)] + overrides
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to"
    warnings.filterwarnings(
        "ignore", message=".*args parameter is intended to run from within Python"
    )
    return PlanCLI(**CLI_KWARGS, run=False, args=args).config.as_dict()


def main(argv: list[str] | None = None) -> int:
    from align.bench import plan as P
    from align.bench.recipes import COMMON_REASONS, recipe_for

    args, overrides = parser().parse_known_args(argv)
    configs = args.configs + args.config
    if not configs:
        parser().error("give at least one config")
    try:
        device = P.gpu(args.gpu)
        cfg = resolve(configs, overrides)
        world = P.world_size(cfg["trainer"], args.devices, args.num_nodes)
        plan = P.make_plan(cfg, world, args.num_samples)
    except ValueError as err:
        print(f"align plan: error: {err}", file=sys.stderr)
        return 2
    unit = plan.unit
    print(f"plan of {' + '.join(configs)}")
    target = f" (data.global_batch_size {plan.target_batch})" if plan.target_batch else ""
    print(
        f"  batch       {plan.world} GPUs x {plan.micro} per micro-batch x accumulation "
        f"{plan.accumulation} = {plan.global_batch:,} {unit}s per optimizer step{target}"
    )
    for note in plan.notes:
        print(f"  note        {note}")
    if plan.samples is None:
        print(f"  data        unknown: {plan.samples_from}")
    else:
        print(f"  data        {plan.samples:,} {unit}s (from {plan.samples_from})")
        print(
            f"  epoch       {plan.epoch_batches:,} micro-batches per GPU = "
            f"{plan.steps_per_epoch:,} steps = {plan.per_pass:,} {unit}s "
            f"({max(0, plan.samples - plan.per_pass):,} sit out each pass)"
        )
    if plan.steps is None:
        print("  steps       unknown: trainer.max_epochs needs the data size")
    else:
        print(f"  steps       {plan.steps:,} optimizer steps; {plan.seen:,} {unit}s seen")
        if plan.samples:
            print(
                f"  passes      {plan.seen / plan.samples:.2f} per {unit} "
                f"({plan.steps / plan.steps_per_epoch:.2f} epochs); "
                f"{min(plan.per_pass, plan.seen):,} distinct {unit}s"
            )
        lrs = P.lr_points(cfg["model"]["init_args"], plan.steps)
        print("  lr          " + ", ".join(f"step {s:,}: {lr:.4g}" for s, lr in lrs))
    refusal = None if args.no_estimate else print_estimates(cfg, plan, device, args)
    if found := recipe_for(configs[0]):
        key, recipe = found
        print(f"\nconfigs/{key} vs the official launcher ({recipe.source}):")
        reasons = {**COMMON_REASONS, **recipe.reasons}
        if plan.target_batch and plan.global_batch != plan.target_batch:
            reasons["global batch"] = plan.notes[0]
        print(f"  {'setting':16s} {'ours':>12s} {'official':>12s}")
        for setting, mine, theirs, mark in P.compare(
            P.our_settings(cfg, plan), recipe.settings, reasons
        ):
            print(f"  {setting:16s} {mine:>12s} {theirs:>12s}  {mark}")
    if refusal:
        print(f"align plan: error: {refusal}", file=sys.stderr)
        return 1
    return 0


def print_estimates(cfg: dict, plan, device, args) -> str | None:
    """Memory and time lines; the reason the plan cannot run on ``device``, if it cannot."""
    from align.bench import plan as P
    from align.bench.flops import count_step_flops

    preset = P.preset_of(str(cfg["model"]["init_args"].get("model")), args.preset)
    step = P.step_config(cfg, preset) if preset else None
    if step is None:
        why = (
            "align bench estimates DPO and KTO only, not "
            + P.class_name(cfg["model"]["class_path"])
            if preset
            else "no architecture preset for this model (--preset)"
        )
        print(f"  memory      not estimated: {why}")
        return None
    fsdp = P.fsdp_shards(cfg["trainer"], plan.world)
    shards, sharded = 1, ""
    if fsdp is not None:
        shards, fsdp_checkpointing = fsdp
        step = replace(
            step, gradient_checkpointing=step.gradient_checkpointing or fsdp_checkpointing
        )
        sharded = f", FSDP: static memory / {shards}"
    low, high = P.memory_gib(step, shards)
    checkpointing = "checkpointing" if step.gradient_checkpointing else "no checkpointing"
    reserve = P.OVERHEAD_GIB
    print(
        f"  memory      {low:.1f}-{high:.1f} GiB per GPU "
        f"({preset}, {step.optimizer}, {checkpointing}{sharded}); "
        f"{device.name}: {device.memory_gib:.1f} GiB, {reserve:.0f} GiB kept for CUDA"
    )
    if fsdp is None and "fsdp" in str(cfg["trainer"].get("strategy")).lower():
        print("              (unsharded: this FSDP sharding strategy is estimated as DDP)")
    elif low + reserve > device.memory_gib:
        return (
            f"needs at least {low:.1f} GiB per GPU (+{reserve:.0f}), the {device.name} has "
            f"{device.memory_gib:.1f} GiB: lower data.batch_size, enable gradient_checkpointing, "
            "LoRA or frozen_dtype, or pick a larger GPU"
        )
    elif high + reserve > device.memory_gib:
        print("              may not fit: the upper estimate exceeds the GPU")
    mfu, why = args.mfu, "--mfu"
    if mfu is None and (measured := P.measured_mfu(step.objective, preset, step.batch)):
        mfu, rec = measured
        why = (
            f"measured at {rec['batch']} per micro-batch on {rec['env']['device']} "
            "(docs/bench_results.jsonl)"
        )
    if mfu is None or plan.steps is None:
        missing = "no measured MFU for this set-up (--mfu)" if mfu is None else "unknown steps"
        print(f"  time        not estimated: {missing}")
        return None
    flops = count_step_flops(step).total  # of one micro-batch on one GPU
    h = P.hours(plan, flops, device, mfu, step)
    recompute = (
        f" x {P.CHECKPOINT_RECOMPUTE} (checkpointing)" if step.gradient_checkpointing else ""
    )
    peak = "TF32" if step.precision == "32" else "16-bit"
    print(
        f"  time        {h:.1f} h on {plan.world} x {device.name} ({h * plan.world:,.0f} GPU-hours)"
    )
    print(
        f"              {flops / 1e12:.2f} TFLOP per micro-batch{recompute} "
        f"at MFU {mfu:.1%} of the {peak} peak, {why}"
    )
    return None
