"""Write a tiny random Denscore preference model: the reward of the embedded LongAlign RFT default.

align data tiny-denscore data/synthetic/tiny-denscore
"""

from __future__ import annotations

from align.data.convert_helpers import out_dir_command


def main(argv: list[str]) -> int:
    from align.rewards.denscore import write_tiny_denscore

    return out_dir_command(argv, "tiny-denscore", write_tiny_denscore)
