"""Estimate a reward's common text direction over a prompt set and save it (LongAlign).

Example:
    align direction --reward denscore --source exports/denscore --prompts prompts.txt \
        --out v.safetensors

The direction is the normalised mean segment embedding of the prompts (``align.rewards.segments``);
RFT and the segment scorer load it (``direction_fallback``) for batches too small to estimate
their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

from align.commands import tool_parser


def main(argv: list[str] | None = None) -> int:
    from align.data.prompts import read_prompt_sources
    from align.eval.sampling import resolve_device
    from align.rewards import build_reward
    from align.objectives.reward import DegenerateDirection, save_direction
    from align.rewards.segments import estimate_direction

    p = tool_parser("align direction", __doc__)
    add = p.add_argument
    add(
        "--reward",
        required=True,
        help="reward name (a CLIP-based one: clip, pickscore, hps, denscore)",
    )
    add("--source", help="the reward's local directory or hub id")
    add("--prompts", required=True, nargs="+", help="txt / jsonl files or long-caption shards")
    add("--out", required=True, type=Path, help="where to write the direction (.safetensors)")
    add("--splitter", default="official")
    add("--limit", type=int, help="use at most this many prompts")
    add("--batch-size", type=int, default=64)
    add("--device", default="auto")
    args = p.parse_args(argv)
    try:
        prompts = read_prompt_sources(args.prompts, limit=args.limit)
        reward = build_reward(args.reward, args.source, device=resolve_device(args.device))
        v = estimate_direction(reward, prompts, args.splitter, args.batch_size, progress=True)
    except (FileNotFoundError, ValueError, DegenerateDirection) as err:  # RewardSourceError too
        print(f"align direction: error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_direction(v, args.out)
    print(f"saved the common direction of {len(prompts)} prompts ({args.reward}) to {args.out}")
    return 0
