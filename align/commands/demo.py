"""The shapes-world demo: base model, judge-made data, every method's config + controls,
judged report.

Usage::

    align demo [--quick] [--out reports/] [--seeds 3] [--artifacts artifacts/shapes] [--threads 1]
    align demo --eval-set validation --methods dpo,dpo-flipped --steps 250 --eval-every 50
    align demo --family sd3     # DPO, KTO, GRPO and their controls on a flow-matching base
    align demo --family sd3 --base-only   # train (or reuse) the base only

Builds the world (the base model, cached under ``<artifacts>/base``; on-policy preference shards
judged by the exact judge; long-caption shards; the held-out judge set), then runs every method
(DPO, KTO and their flipped controls, LongAlign SFT with segment encoding and with 77-token
truncation, RFT with the judge's relaxation and with a tiny CLIP preference model) for ``--seeds``
training seeds as ``align fit --config configs/demo/<method>.yaml``, and writes
``<out>/README.md`` (table, verdicts, commands, timings), ``<out>/judge_curves.png``,
``<out>/samples.png`` and ``<out>/demo.json``. ``--eval-set validation`` judges on other held-out
captions and seeds (also kept out of training): for choosing settings without looking at the
report's test set. ``--family sd3`` builds the world around a flow-matching (SD3-shaped) base
instead (cached under ``artifacts/shapes-sd3``) and runs the same configs on it.
"""

from __future__ import annotations

import argparse
import os
import sys

from align.commands import tool_parser
from align.demo.report import PLOTS
from align.demo.run import FLOW_METHODS, METHODS
from align.extras import require


def parser() -> argparse.ArgumentParser:
    p = tool_parser("align demo", __doc__)
    add = p.add_argument
    add("--quick", action="store_true", help="fewer captions and steps (CI scale)")
    add(
        "--family",
        choices=("sd15", "sd3"),
        default="sd15",
        help="the base: a UNet (sd15, default) or a flow-matching transformer (sd3)",
    )
    add("--out", default="reports", help="report directory (default: reports)")
    add(
        "--base-only",
        action="store_true",
        help="train (or reuse) the base under <artifacts>/base and stop",
    )
    add(
        "--artifacts",
        help="base model, shards and runs, cached (default: artifacts/shapes[-sd3]; "
        "--quick: artifacts/shapes[-sd3]-quick)",
    )
    add("--seeds", type=int, help="training seeds per method (default: 3; --quick: 1)")
    add(
        "--threads",
        type=int,
        help="torch threads of the driver: base training, sampling (default: all cores)",
    )
    add(
        "--workers",
        type=int,
        help="processes running training runs side by side, one thread each (default: 2)",
    )
    add(
        "--methods",
        help=f"comma-separated subset of {','.join(METHODS)} (default: all but the label-free "
        "controls dpo-shuffled and kto-shuffled and the online methods; sd3: "
        f"{','.join(FLOW_METHODS)}, the label-free controls opt-in)",
    )
    add("--lr", type=float, help="the learning rate of DPO and KTO")
    add("--beta", type=float, help="beta of DPO and KTO")
    add("--steps", type=int, help="the training steps of every method")
    add("--batch-size", type=int, help="the batch size of every method")
    add(
        "--eval-every",
        type=int,
        help="judge every method every N steps (default 0: at the end only)",
    )
    add(
        "--eval-set",
        choices=("test", "validation"),
        default="test",
        help="held-out captions and seeds to judge on (default: test, the report's)",
    )
    return p


def demo_config(args: argparse.Namespace):
    """The ``DemoConfig`` the command line asks for: the full or quick defaults, its overrides
    given to every run as ``align fit`` flags (after the quick sizes, so they win)."""
    from align.demo.base import BaseConfig
    from align.demo.run import DemoConfig, batch_of, default_artifacts, quick_config, steps

    given = {
        k: v for k, v in (("seeds", args.seeds), ("artifacts", args.artifacts)) if v is not None
    }
    if args.quick:
        cfg = quick_config(args.family, out=args.out, eval_set=args.eval_set, **given)
    else:
        given.setdefault("artifacts", default_artifacts(args.family))
        cfg = DemoConfig(
            out=args.out, eval_set=args.eval_set, base=BaseConfig(family=args.family), **given
        )
    if args.family != "sd15":
        cfg.methods = FLOW_METHODS
    fit_args = {k: list(v) for k, v in cfg.fit_args.items()}
    every = (steps(args.steps) if args.steps else []) + (
        batch_of(args.batch_size) if args.batch_size else []
    )
    for key in {*fit_args, "*"} - {"preference-model"}:  # after the quick sizes: they win
        fit_args[key] = fit_args.get(key, []) + every
    dpo_kto = []
    if args.lr is not None:
        dpo_kto += ["--model.init_args.optimizer.init_args.lr", str(args.lr)]
    if args.beta is not None:
        dpo_kto += ["--model.init_args.beta", str(args.beta)]
    for family in ("dpo", "kto"):
        fit_args[family] = fit_args.get(family, []) + dpo_kto
    cfg.fit_args = {k: v for k, v in fit_args.items() if v}
    if args.eval_every is not None:
        cfg.eval_every = max(0, args.eval_every)
    if args.workers is not None:
        cfg.workers = max(1, args.workers)
    if args.methods:
        cfg.methods = tuple(m.strip() for m in args.methods.split(","))
    return cfg


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    require("matplotlib", "demo", PLOTS)  # at start, not after the runs
    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    if args.threads:
        torch.set_num_threads(max(1, args.threads))
    from align.demo.base import build_base
    from align.demo.run import run_demo

    cfg = demo_config(args)
    if args.base_only:
        print(f"align demo: base at {build_base(os.path.join(cfg.artifacts, 'base'), cfg.base)}")
        return 0
    summary = run_demo(cfg, command="align demo " + " ".join(argv))
    print(
        f"align demo: report written to {os.path.join(args.out, 'README.md')} "
        f"({summary['timings_s']['total']:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
