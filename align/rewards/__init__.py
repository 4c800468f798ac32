"""Reward / preference models behind one registry.

``build_reward(name, source=None, device="cpu")`` builds ``pickscore``, ``hps`` (HPSv2 / v2.1),
``clip`` (CLIP score), ``aesthetic`` (LAION aesthetic predictor v2) or ``imagereward`` from a local
path or hub id; each is a ``RewardModel`` (``score(images, prompts)``) and the CLIP-based ones are
``ClipRewardModel``s (``embed_images``, ``embed_texts``, ``embed_segments``). ``align.rewards.tiny``
writes tiny random models of every reward in the real on-disk layouts (tests, the embedded default).
"""

from align.rewards.base import ClipRewardModel, RewardModel, RewardSourceError
from align.rewards.registry import available_rewards, build_reward, canonical_name, register_reward

__all__ = [
    "RewardModel",
    "ClipRewardModel",
    "RewardSourceError",
    "available_rewards",
    "build_reward",
    "canonical_name",
    "register_reward",
]
