"""Write tiny random PickScore, HPS, CLIP, aesthetic and ImageReward models in their real layouts.

align data tiny-rewards artifacts/tiny-rewards      # what `make eval` scores with, offline
"""

from __future__ import annotations

from align.data.convert_helpers import out_dir_command


def main(argv: list[str]) -> int:
    from align.rewards.tiny import write_tiny_rewards

    return out_dir_command(argv, "tiny-rewards", write_tiny_rewards)
