"""Render a prompt set with fixed seeds into an image set that `align eval` scores (resumable).

Writes ``<out>/<prompt_index:05d>_<seed>.png`` (image j of every prompt from ``--seed`` + j),
``<out>/prompts.jsonl`` and ``<out>/meta.json``. Defaults: UniPC 25 steps (DDIM: 50), guidance 7.5
(SD1.5) / 5.0 (SDXL), bf16 on GPU. Re-running renders only the missing images.
"""

from __future__ import annotations

import argparse
import sys

from align.commands import tool_parser, options_of
from align.eval.sampling import SCHEDULERS


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("align sample", __doc__)
    add = p.add_argument
    add(
        "--checkpoint",
        required=True,
        help="diffusers export directory, hub id, or preset (tiny, ...)",
    )
    add(
        "--prompts",
        "--prompt-file",
        required=True,
        help="prompt set: .txt, .jsonl, .csv/.tsv (Prompt), .parquet (caption)",
    )
    add(
        "--encoder",
        help="prompt encoder: clip (77 tokens), segment (LongAlign, long prompts) or an export "
        "dir with prompt_encoder.json (default: the checkpoint's own if it has one, else "
        "the pipeline's)",
    )
    add("--base", help="base model of a LoRA-only export (default: its align_export.json)")
    add("--out", required=True, help="output directory (resumed if it exists)")
    add("--images-per-prompt", "-n", type=int, default=1)
    add(
        "--seed", type=int, default=0, help="seed of image 0 of every prompt; image j uses seed + j"
    )
    add(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        help="default: unipc (SD1.5, SDXL), flow-euler (SD3, FLUX.1)",
    )
    add("--steps", type=int, help="default: 25 for unipc/dpm++, 50 for ddim and others")
    add("--guidance-scale", type=float, help="default: 7.5 for SD1.5, 5.0 for SDXL")
    add("--batch-size", type=int, default=8)
    add("--height", type=int)
    add("--width", type=int)
    add("--negative-prompt", default="")
    add("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    add("--device", default="auto")
    add("--prompt-column", help="column / field holding the prompt")
    add(
        "--dedupe",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop repeated prompts (default: on for parquet, off otherwise)",
    )
    add("--limit", type=int, help="use only the first N prompts")
    add("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from align.data.prompt_files import read_prompts
    from align.eval.sampling import SampleConfig, sample_images

    try:
        prompts = read_prompts(
            args.prompts, column=args.prompt_column, dedupe=args.dedupe, limit=args.limit
        )
        config = SampleConfig(**options_of(SampleConfig, args), progress=not args.no_progress)
        result = sample_images(prompts, args.out, config, prompt_source=str(args.prompts))
    except ValueError as err:  # PromptSetError, ImageSetError, ModelSourceError among them
        print(f"align sample: error: {err}", file=sys.stderr)
        return 2
    s = result["settings"]
    print(
        f"{args.out}: {result['rendered']} rendered, {result['kept']} kept, {result['total']} "
        f"images ({len(prompts)} prompts x {args.images_per_prompt}; {s['scheduler']} {s['steps']} "
        f"steps, guidance {s['guidance_scale']}, {s['height']}x{s['width']}, {s['dtype']})"
    )
    return 0
