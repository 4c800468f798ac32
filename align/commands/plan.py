"""Dry-run a training config: batch, steps, data passes, learning rate, memory and time per GPU.

Examples:
    align plan configs/dpo/sd15.yaml --devices 16 --num-samples 851293
    align plan --config configs/dpo/sdxl.yaml --gpu a100 --mfu 0.3
    align plan configs/kto/sd15.yaml --config configs/trainer/ddp_6gpu.yaml --trainer.max_steps 5000

Nothing is downloaded and nothing trains: the config is resolved as ``align fit`` resolves it (later
configs and dotted flags override), the data's size comes from its shards' manifests (or
--num-samples; remote shards' manifests are fetched from where the shards are, and remote shards
that no manifest lists are not downloaded to count them), memory and FLOPs from the model built on
the meta device (DPO and KTO configs; about 25 s for SD1.5). For the paper configs the official
launcher's settings are printed beside ours. A plan that cannot fit the GPU exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from align.commands import doc_details, doc_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parser() -> argparse.ArgumentParser:
    from align.bench.plan import GPUS

    p = argparse.ArgumentParser(
        prog="align plan",
        description=doc_summary(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc_details(__doc__),
    )
    p.add_argument("configs", nargs="*", help="config files (as --config)")
    p.add_argument("--config", action="append", default=[], help="config file; repeat to compose")
    p.add_argument("--devices", type=int, help="GPUs per node (default: trainer.devices)")
    p.add_argument("--num-nodes", type=int, help="nodes (default: trainer.num_nodes)")
    p.add_argument("--gpu", default="h100", help=f"GPU for memory and time: {', '.join(GPUS)}")
    p.add_argument(
        "--num-samples", type=int, help="training samples (default: the shards' manifests)"
    )
    p.add_argument(
        "--mfu",
        type=float,
        help="model FLOP utilisation for the time estimate "
        "(default: the nearest measured one in docs/)",
    )
    p.add_argument(
        "--preset", help="architecture to estimate the model with (default: from the model id)"
    )
    p.add_argument("--no-estimate", action="store_true", help="skip the memory and time estimates")
    return p


def resolve(configs: list[str], overrides: list[str]) -> dict:
    """The config as ``align fit`` would resolve it, without instantiating anything."""
    import lightning as L

    from align.lightning_cli import AlignCLI

    class PlanCLI(AlignCLI):
        def instantiate_classes(self) -> None:  # a plan builds nothing
            pass

    args = [a for c in configs for a in ("--config", c)] + overrides
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to"
    warnings.filterwarnings(
        "ignore", message=".*args parameter is intended to run from within Python"
    )
    cli = PlanCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
    )
    return cli.config.as_dict()


def training_samples(
    cfg: dict, plan, num_samples: int | None
) -> tuple[int | None, int | None, str]:
    """(samples, batches per rank per epoch, where the count comes from)."""
    from align.bench.plan import data_epoch
    from align.data.epochs import no_shard_downloads

    data = cfg["data"]["init_args"]
    if num_samples is not None:
        epoch = data_epoch(num_samples, data, plan.world, plan.accumulation)
        return num_samples, epoch, "--num-samples"
    module, _, name = cfg["data"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not hasattr(cls, "epoch_plan"):
        return None, None, f"{name} does not stream data epochs"
    try:
        with no_shard_downloads():  # a plan downloads nothing
            datamodule = cls(**data)
            samples, epoch = datamodule.epoch_plan(plan.world, plan.accumulation)
    except (FileNotFoundError, ValueError) as err:
        return None, None, f"{err} (pass --num-samples)"
    return samples, epoch, "the shards"


def main(argv: list[str] | None = None) -> int:
    from align.bench import plan as P
    from align.bench.recipes import COMMON_REASONS, recipe_for

    args, overrides = parser().parse_known_args(argv)
    configs = args.configs + args.config
    if not configs:
        parser().error("give at least one config")
    fail = lambda msg: print(f"align plan: error: {msg}", file=sys.stderr) or 2  # noqa: E731
    try:
        device = P.gpu(args.gpu)
        cfg = resolve(configs, overrides)
        plan = P.batching(cfg, P.world_size(cfg["trainer"], args.devices, args.num_nodes))
        samples, epoch, source = training_samples(cfg, plan, args.num_samples)
    except ValueError as err:
        return fail(err)
    P.add_schedule(plan, cfg, samples, epoch)
    out = print
    out(f"plan of {' + '.join(configs)}")
    target = f" (data.global_batch_size {plan.target_batch})" if plan.target_batch else ""
    out(
        f"  batch       {plan.world} GPUs x {plan.micro} per micro-batch x accumulation "
        f"{plan.accumulation} = {plan.global_batch:,} {plan.unit}s per optimizer step{target}"
    )
    for note in plan.notes:
        out(f"  note        {note}")
    if samples is None:
        out(f"  data        unknown: {source}")
    else:
        out(f"  data        {samples:,} {plan.unit}s (from {source})")
        out(
            f"  epoch       {plan.epoch_batches:,} micro-batches per GPU = "
            f"{plan.steps_per_epoch:,} steps = {plan.per_pass:,} {plan.unit}s "
            f"({max(0, samples - plan.per_pass):,} sit out each pass)"
        )
    if plan.steps is None:
        out("  steps       unknown: trainer.max_epochs needs the data size")
    else:
        out(f"  steps       {plan.steps:,} optimizer steps; {plan.seen:,} {plan.unit}s seen")
        if samples:
            distinct = min(plan.per_pass, plan.seen)
            out(
                f"  passes      {plan.seen / samples:.2f} per {plan.unit} "
                f"({plan.steps / plan.steps_per_epoch:.2f}"
                f" epochs); {distinct:,} distinct {plan.unit}s"
            )
        lrs = ", ".join(
            f"step {s:,}: {lr:.4g}" for s, lr in P.lr_points(cfg["model"]["init_args"], plan.steps)
        )
        out(f"  lr          {lrs}")
    refusal = None
    if not args.no_estimate:
        refusal = print_estimates(cfg, plan, device, args, out)
    found = recipe_for(configs[0])
    if found:
        key, recipe = found
        out(f"\nconfigs/{key} vs the official launcher ({recipe.source}):")
        ours = P.our_settings(cfg, plan)
        reasons = {**COMMON_REASONS, **recipe.reasons}
        if plan.target_batch and plan.global_batch != plan.target_batch:
            reasons["global batch"] = plan.notes[0]
        rows = P.compare(ours, recipe.settings, reasons)
        out(f"  {'setting':16s} {'ours':>12s} {'official':>12s}")
        for key, mine, theirs, mark in rows:
            out(f"  {key:16s} {mine:>12s} {theirs:>12s}  {mark}")
    if refusal:
        return fail(refusal) - 1
    return 0


def print_estimates(cfg: dict, plan, device, args, out) -> str | None:
    """Memory and time lines; the reason the plan cannot run on ``device``, if it cannot."""
    from align.bench import plan as P

    model = cfg["model"]["init_args"]
    preset = P.preset_of(str(model.get("model")), args.preset)
    step = P.step_config(cfg, preset) if preset else None
    if step is None:
        why = (
            "no architecture preset for this model (--preset)"
            if not preset
            else "align bench estimates DPO and KTO only, not "
            + P.class_name(cfg["model"]["class_path"])
        )
        out(f"  memory      not estimated: {why}")
        return None
    low, high = P.memory_gib(step)
    checkpointing = "checkpointing" if step.gradient_checkpointing else "no checkpointing"
    out(
        f"  memory      {low:.1f}-{high:.1f} GiB per GPU "
        f"({preset}, {step.optimizer}, {checkpointing}); "
        f"{device.name}: {device.memory_gib:.1f} GiB, {P.OVERHEAD_GIB:.0f} GiB kept for CUDA"
    )
    if "fsdp" in str(cfg["trainer"].get("strategy")).lower():
        out(
            "              (unsharded: FSDP divides weights, gradients and optimizer state "
            "by the GPUs)"
        )
    elif low + P.OVERHEAD_GIB > device.memory_gib:
        return (
            f"needs at least {low:.1f} GiB per GPU (+{P.OVERHEAD_GIB:.0f}), the {device.name} has "
            f"{device.memory_gib:.1f} GiB: lower data.batch_size, enable gradient_checkpointing, "
            "LoRA or frozen_dtype, or pick a larger GPU"
        )
    elif high + P.OVERHEAD_GIB > device.memory_gib:
        out("              may not fit: the upper estimate exceeds the GPU")
    mfu, why = args.mfu, "--mfu"
    if mfu is None:
        measured = P.measured_mfu(step.objective, preset, step.batch)
        if measured:
            mfu, rec = measured
            why = (
                f"measured at {rec['batch']} per micro-batch on {rec['env']['device']} "
                f"(docs/bench_results.jsonl)"
            )
    if mfu is None or plan.steps is None:
        out(
            "  time        not estimated: "
            + ("no measured MFU for this set-up (--mfu)" if mfu is None else "unknown steps")
        )
        return None
    flops = P.step_flops(step)
    h = P.hours(plan, flops, device, mfu, step.gradient_checkpointing, step.precision == "32")
    recompute = (
        f" x {P.CHECKPOINT_RECOMPUTE} (checkpointing)" if step.gradient_checkpointing else ""
    )
    out(
        f"  time        {h:.1f} h on {plan.world} x {device.name} ({h * plan.world:,.0f} GPU-hours)"
    )
    out(
        f"              {flops / 1e12:.2f} TFLOP per micro-batch{recompute} "
        f"at MFU {mfu:.1%} of the "
        f"{'TF32' if step.precision == '32' else '16-bit'} peak, {why}"
    )
    return None
