"""One registry reward or a weighted sum of them, scored per image without gradients.

``WeightedReward("pickscore,hps:0.5")`` builds PickScore (weight 1) and HPS (weight 0.5) and scores
images as the weighted sum, keeping each part. A name outside ``align.rewards`` is written
``module:name`` (``align.demo.soft_judge:shapes-judge``); a weight follows the last colon.
``sources`` maps a reward's name as written to its weights (local path or hub id; default: the
published ones). Used by GRPO, ``align data generate-pairs`` and the reward-hacking monitor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align.rewards.registry import build_reward, init_config, reward_dtype


def parse_rewards(spec: str) -> dict[str, float]:
    """``"pickscore,hps:0.5"`` -> {"pickscore": 1.0, "hps": 0.5}."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            name, value = item, 1.0
        if not name:
            raise ValueError(f"reward {item!r} has no name")
        weights[name] = weights.get(name, 0.0) + value
    if not weights:
        raise ValueError(f"no reward named in {spec!r}; e.g. 'pickscore' or 'pickscore,hps:0.5'")
    return weights


class WeightedReward(torch.nn.Module):
    """Frozen rewards and their weights; ``forward(images, prompts)`` -> (total (N,), parts)."""

    def __init__(
        self,
        rewards: str,
        sources: dict[str, str] | None = None,
        dtype: str = "float32",
        batch_size: int | None = None,
    ):
        super().__init__()
        self.config = init_config(self, locals())
        torch_dtype = reward_dtype(dtype)
        self.weights, sources = parse_rewards(rewards), sources or {}
        unknown = set(sources) - set(self.weights)
        if unknown:
            raise ValueError(f"sources for rewards not in {rewards!r}: {sorted(unknown)}")
        models = {
            self.key(n): build_reward(n, sources.get(n), dtype=torch_dtype) for n in self.weights
        }
        self.models = torch.nn.ModuleDict(models)
        self.batch_size = batch_size

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "_")  # ModuleDict keys cannot hold dots

    @torch.no_grad()
    def forward(
        self, images, prompts: Sequence[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {
            name: self.models[self.key(name)].score(images, prompts, self.batch_size)
            for name in self.weights
        }
        device = next(iter(parts.values())).device
        total = sum(w * parts[name].to(device) for name, w in self.weights.items())
        return total, parts
