"""Write a tiny random T5 encoder and tokenizer: an offline stand-in for LongAlign's T5 branch.

align data tiny-t5 data/synthetic/tiny-t5
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from align.models.t5_adapter import write_tiny_t5

    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: align data tiny-t5 OUT_DIR", file=sys.stderr)
        return 2
    print(f"tiny t5: {write_tiny_t5(argv[0])}")
    return 0
