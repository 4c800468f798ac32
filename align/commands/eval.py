"""Score image sets with reward models: means, win rates vs a baseline (bootstrap CIs), FID;
writes a report.

``--images`` / ``--baseline`` are image sets written by ``align sample`` from the same prompt set
and seeds; images pair on (prompt, seed) (``--pairing median``: the median-scoring image per prompt,
the Diffusion-KTO protocol). Writes ``report.md``, ``report.csv``, ``report.json``,
``scores.csv``, ``grid.png`` (baseline and run images side by side, captioned with their scores) and
``win_rates.png`` (the win rates with their intervals; needs ``align[eval]``, ``--no-plot`` skips
it) to ``--out`` (default ``<images>/eval``) and prints the table. ``--fid-reference`` takes real
images (a folder, ``.tar`` shards or an ``.npz`` of statistics), never a set being scored.
"""

from __future__ import annotations

import argparse
import sys

from align.commands import tool_parser, options_of


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("align eval", __doc__)
    add = p.add_argument
    add("--images", required=True, help="image set to evaluate (from align sample)")
    add("--baseline", help="image set to compare against (same prompts and seeds)")
    add(
        "--rewards",
        default="pickscore,hps,clip,aesthetic,imagereward",
        help="comma-separated reward names ('' for none)",
    )
    add(
        "--reward-source",
        type=_key_value,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="where a reward's weights are (local path or hub id); repeatable",
    )
    add("--reward-root", help="directory whose <name>/ subfolders are reward sources")
    add("--pairing", choices=["seed", "median"], default="seed")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples (of prompts)")
    add("--confidence", type=float, default=0.95)
    add("--bootstrap-seed", type=int, default=0)
    add(
        "--fid-reference",
        help="real images: a directory, .tar shards (or a directory of them) or an .npz of "
        "statistics; not --images or --baseline",
    )
    add(
        "--fid-features",
        default="inception",
        help="inception[:weights.pth] or clip:<CLIP dir/hub id>",
    )
    add("--out", help="report directory (default: <images>/eval)")
    add("--batch-size", type=int, default=16)
    add("--device", default="auto")
    add("--no-progress", action="store_true")
    add("--no-plot", action="store_true", help="skip win_rates.png (it needs matplotlib)")
    return p


def main(argv: list[str]) -> int:
    if argv and argv[0] == "retrieval":  # align eval retrieval --reward <model> --data <shards>
        from align.commands._retrieval import main as retrieval_main

        return retrieval_main(argv[1:])
    args = build_parser().parse_args(argv)
    from align.eval.evaluate import EvalConfig, evaluate
    from align.eval.figures import write_figures
    from align.eval.report import to_markdown, write_report
    from align.extras import MissingExtra, require

    config = EvalConfig(
        **{
            **options_of(EvalConfig, args),  # those named alike; the others:
            "rewards": [r for r in args.rewards.split(",") if r.strip()],
            "reward_sources": dict(args.reward_source),
            "n_boot": args.bootstrap,
            "seed": args.bootstrap_seed,
            "progress": not args.no_progress,
        }
    )
    plot = bool(args.baseline) and not args.no_plot
    try:
        if plot:  # before any scoring: a missing package must not cost the user a scoring pass
            require("matplotlib", "eval", "the win-rate plot (--no-plot skips it)")
        from transformers.utils import logging as hf_logging

        # per-model "Loading weights" bars; ours show the scoring progress
        hf_logging.disable_progress_bar()
        report, rows, out = evaluate(config)
    except (ValueError, FileNotFoundError, MissingExtra) as err:  # ImageSetError, FIDError, ...
        print(f"align eval: error: {err}", file=sys.stderr)
        return 2
    figures = write_figures(report, rows, out, plot=plot)
    report["figures"] = {name: path.name for name, path in figures.items()}
    paths = {**write_report(report, out, rows), **figures}
    print(to_markdown(report))
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0
