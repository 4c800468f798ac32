"""Write tiny random PickScore, HPS, CLIP, aesthetic and ImageReward models in their real layouts.

align data tiny-rewards artifacts/tiny-rewards      # what `make eval` scores with, offline
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from align.rewards.tiny import write_tiny_rewards

    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: align data tiny-rewards OUT_DIR", file=sys.stderr)
        return 2
    for name, path in write_tiny_rewards(argv[0]).items():
        print(f"{name:<12} {path}")
    return 0
