"""Write a tiny random Denscore preference model: the reward of the embedded LongAlign RFT default.

align data tiny-denscore data/synthetic/tiny-denscore
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from align.rewards.denscore import write_tiny_denscore

    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: align data tiny-denscore OUT_DIR", file=sys.stderr)
        return 2
    print(f"tiny denscore: {write_tiny_denscore(argv[0])}")
    return 0
