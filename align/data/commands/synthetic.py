"""Write a synthetic data set in a real shard schema
(pickapic pairs, kto singles, long captions)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

# kind -> "module:function"; each function takes (out_dir, samples, shards, resolution, seed) ->
# list of shards
WRITERS = {
    "pickapic": "align.data.synthetic:write_synthetic_pickapic",
    "kto": "align.data.synthetic:write_synthetic_kto",
    "longcaption": "align.data.synthetic_long:write_synthetic_longcaption",
    "longpairs": "align.data.preference:write_synthetic_long_pairs",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="align data synthetic", description=__doc__)
    add = parser.add_argument
    add("kind", choices=sorted(WRITERS), help="which schema to write")
    add("--out", required=True, type=Path, help="output folder")
    add("--samples", type=int, default=256, help="number of samples (pairs for pickapic)")
    add("--shards", type=int, default=4)
    add("--resolution", type=int, default=64, help="image side in pixels")
    add("--seed", type=int, default=0)
    add("--force", action="store_true", help="rewrite even if the shards exist")
    args = parser.parse_args(argv)
    if not args.force and args.out.is_dir() and len(list(args.out.glob("*.tar"))) >= args.shards:
        print(f"synthetic {args.kind} shards already in {args.out} (use --force to rewrite)")
        return 0
    module, function = WRITERS[args.kind].split(":")
    write = getattr(importlib.import_module(module), function)
    paths = write(args.out, args.samples, args.shards, args.resolution, args.seed)
    print(
        f"wrote {args.samples} synthetic {args.kind} samples into {len(paths)} shards "
        f"under {args.out}"
    )
    return 0
