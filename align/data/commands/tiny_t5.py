"""Write a tiny random T5 encoder and tokenizer: an offline stand-in for LongAlign's T5 branch.

align data tiny-t5 data/synthetic/tiny-t5
"""

from __future__ import annotations

from align.data.convert_helpers import out_dir_command


def main(argv: list[str]) -> int:
    from align.models.t5_adapter import write_tiny_t5

    return out_dir_command(argv, "tiny-t5", write_tiny_t5)
