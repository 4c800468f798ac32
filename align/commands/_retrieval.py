"""Text-to-image retrieval (R@1) with a CLIP-based preference model at segment level (LongAlign,
Table 1).

Usage::

    align eval retrieval --reward denscore [--reward-source DIR] --data SHARDS [--limit 1000]
                         [--max-sentences 8] [--direction FILE] [--splitter official] [--out DIR]

``--data``: long-caption shards (``jpg`` + ``txt``) or pair shards (the preferred image, ``jpg_0``
on a tie, with the pair's caption). Unreadable samples and captions without segments are skipped and
counted. Writes ``retrieval.json`` and ``retrieval.md`` to ``--out`` (default: print only). How
it is measured: ``align.eval.retrieval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from align.commands import tool_parser
from align.eval.retrieval import load_retrieval_set, retrieval, to_markdown
from align.objectives.reward import DegenerateDirection, load_direction
from align.rewards import build_reward


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("align eval retrieval", __doc__, details=True)
    add = p.add_argument
    add("--reward", required=True, help="a CLIP-based reward: clip, pickscore, hps, denscore")
    add("--reward-source", help="the reward's local directory or hub id")
    add("--data", required=True, nargs="+", help="long-caption or pair shards")
    add("--limit", type=int, default=1000, help="use the first N usable samples (0: all)")
    add("--max-sentences", type=int, default=0, help="R@1 curve up to this many sentences (0: all)")
    add("--direction", help="a saved common direction (default: estimated over the set)")
    add("--splitter", default="official")
    add("--batch-size", type=int, default=32)
    add("--device", default="auto")
    add("--out", help="directory for retrieval.json and retrieval.md")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from align.eval.sampling import resolve_device  # imports diffusers (align.models.sampling)

    try:
        images, captions, skipped = load_retrieval_set(args.data, args.limit or None)
        if len(images) < 2:
            raise ValueError(
                f"retrieval needs at least two usable samples in {' '.join(args.data)}, got "
                f"{len(images)} (skipped: {skipped})"
            )
        reward = build_reward(args.reward, args.reward_source, device=resolve_device(args.device))
        if not hasattr(reward, "embed_segments"):
            raise ValueError(f"reward {args.reward!r} is not CLIP-based (no text/image embeddings)")
        direction = load_direction(args.direction) if args.direction else None
        result = retrieval(
            reward, images, captions, args.splitter, direction, args.max_sentences, args.batch_size
        )
    except (FileNotFoundError, ValueError, DegenerateDirection) as err:  # RewardSourceError too
        print(f"align eval retrieval: error: {err}", file=sys.stderr)
        return 2
    result.reward = reward.name
    result.skipped = {**skipped, **result.skipped}
    if args.direction:
        result.direction = args.direction
    text = to_markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "retrieval.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        (out / "retrieval.md").write_text(text + "\n")
        print(f"report: {out / 'retrieval.json'}, {out / 'retrieval.md'}")
    return 0
