"""Benchmark a training step: median step time, samples/s, TFLOP/s and fraction of peak,
peak memory.

Examples:
    align bench --objective dpo --preset sd15-arch --batch 4 --steps 20  # on a GPU: bf16, Lightning
    align bench --preset tiny --steps 20 --compare-bare                  # Lightning vs a bare loop
    align bench --preset sd15-arch sdxl-arch --batch 1 --flops-only      # FLOPs from meta tensors
    align bench --preset tiny --logit-noise                              # precision vs float64
    align bench --preset sdxl-arch --batch 2 --memory-estimate --optimizer adafactor

Every run prints a table and appends one JSON record per row to ``--json`` (default
reports/bench.jsonl). See docs/benchmarks.md for what each figure means and the measured numbers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

from align.commands import tool_parser, options_of
from align.extras import require

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser() -> argparse.ArgumentParser:
    from align.bench.step import OBJECTIVES, OPTIMIZERS, PRECISIONS
    from align.models.presets import PRESETS

    p = tool_parser("align bench", __doc__, details=True)
    add = p.add_argument
    add("--objective", nargs="+", default=["dpo"], choices=sorted(OBJECTIVES))
    add("--preset", nargs="+", default=["tiny"], choices=sorted(PRESETS))
    add("--batch", type=int, default=4, help="pairs (dpo) or images (kto) per micro-batch")
    add("--resolution", type=int, help="pixels (default: the preset's native size)")
    add("--steps", type=int, default=20, help="timed steps after the warm-up")
    add("--warmup", type=int, default=3)
    add("--rounds", type=int, default=1, help="alternate the modes this many times, pooling steps")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    add(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op CPU threads (0: torch's default); 1 is steadier on a shared CPU",
    )
    add(
        "--precision",
        default="auto",
        choices=["auto", *PRECISIONS],
        help="bf16 = Lightning's bf16-mixed autocast; auto: bf16 on CUDA, 32 on the CPU",
    )
    add("--compare-bare", action="store_true", help="also time the step in a plain PyTorch loop")
    only = p.add_mutually_exclusive_group()
    only.add_argument(
        "--logit-noise",
        action="store_true",
        help="std of the DPO logit's error from each precision vs float64 (beta 5000); no timing",
    )
    only.add_argument("--flops-only", action="store_true", help="count FLOPs; no timing")
    only.add_argument(
        "--memory-estimate",
        action="store_true",
        help="estimate GPU memory on the meta device (weights, gradients, optimizer state, "
        "activations); no timing; precision auto means bf16 here",
    )
    # the options below are StepConfig's fields, by their dest
    add("--lora-rank", type=int, default=0, help="> 0: LoRA, reference = adapters disabled")
    add("--gradient-checkpointing", action="store_true")
    add("--channels-last", action="store_true")
    add("--compile", action="store_true", dest="compile_unet", help="compile the policy UNet")
    add("--compile-reference", action="store_true", help="compile the frozen reference UNet")
    add(
        "--compile-mode",
        help="torch.compile's mode: reduce-overhead (CUDA graphs), max-autotune, ... "
        "(default: its default)",
    )
    add(
        "--reference-no-grad",
        action="store_false",
        dest="reference_inference_mode",
        help="reference forward under no_grad instead of inference_mode",
    )
    add(
        "--frozen-dtype",
        choices=["bf16", "fp16"],
        help="store the frozen reference UNet, VAE and text encoders in this dtype "
        "(configs/perf/lowmem.yaml)",
    )
    add(
        "--no-fp32-output",
        action="store_false",
        dest="fp32_output",
        help="the denoiser's last layer under autocast like the rest (default: float32, so "
        "per-sample errors are not rounded to bf16): what the float32 layer costs",
    )
    add(
        "--pixels",
        action="store_false",
        dest="cached_latents",
        help="encode pixels with the VAE (default: cached latents)",
    )
    add(
        "--captions",
        action="store_false",
        dest="cached_text",
        help="encode captions with the text encoders (default: cached prompt embeddings)",
    )
    add("--optimizer", default="adamw", choices=OPTIMIZERS)
    add("--lr", type=float, default=1e-5)
    add("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    add("--json", default="reports/bench.jsonl", help="append records here ('' disables)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.logit_noise:
        from align.bench.precision import logit_noise

        device = "cpu" if args.device == "auto" else args.device
        for preset in args.preset:
            for name, std in logit_noise(preset, device=device).items():
                print(f"{preset:10s} {name:18s} DPO logit noise (std, beta 5000): {std:.5f}")
        return 0
    from align.bench.flops import count_step_flops, flops_record
    from align.bench.memory import memory_record
    from align.bench.report import append_jsonl, format_table
    from align.bench.runner import pick_device, run
    from align.bench.step import StepConfig

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.optimizer == "adamw8bit" and not (args.memory_estimate or args.flops_only):
        require("bitsandbytes", "8bit", "--optimizer adamw8bit")  # before any model is built
    device = pick_device(args.device)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or args.memory_estimate else "32"
    # the options named as StepConfig's fields (by their dest), for every objective and preset
    switches = options_of(StepConfig, args)
    switches.update(precision=precision, grad_clip=args.grad_clip or None)
    timing = {k: getattr(args, k) for k in ("warmup", "steps", "compare_bare", "rounds")}
    records = []
    for objective, preset in itertools.product(args.objective, args.preset):
        cfg = StepConfig(**{**switches, "objective": objective, "preset": preset})
        print(
            f"align bench: {objective} / {preset}, batch {cfg.batch}, {precision}, {device} ...",
            file=sys.stderr,
            flush=True,
        )
        if args.memory_estimate:
            records.append(memory_record(cfg))
            continue
        flops = count_step_flops(cfg)
        if args.flops_only:
            records.append(flops_record(cfg, flops))
            continue
        records += run(cfg, device, flops, **timing)
    for record in records:
        record["argv"] = ["align", "bench", *(sys.argv[2:] if argv is None else argv)]
    print(format_table(records), flush=True)
    if args.json:
        path = append_jsonl(records, args.json)
        print(f"appended {len(records)} record(s) to {path}", file=sys.stderr)
    return 0
