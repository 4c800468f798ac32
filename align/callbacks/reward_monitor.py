"""Watch for reward hacking: the training reward against gold rewards it is not trained on.

Every ``every_n_steps`` optimizer steps (and before the first) the policy renders held-out prompts
from fixed seeds (``images_per_prompt`` each, through ``align.models.sampling.generate``, as
``ValidationImages`` does) and the callback logs

* ``monitor/reward``: the training reward's mean (one registry reward or a weighted sum);
* ``monitor/gold`` and ``monitor/gold/<name>``: the gold rewards';
* ``monitor/diversity``: the mean pairwise distance of a prompt's images (pixels in [0, 1], RMS
  per pixel; or a CLIP-based reward's image embeddings with ``diversity: <reward name>``).

Hacking is marked at the first evaluation where gold fell at each of the last ``patience``
evaluations (by more than ``tolerance`` each time) while the training reward stands above its
value at the start (the policy gains what it is trained on; on a few held-out prompts that reward
is too noisy to rise at every evaluation, gold's fall is what must be consistent), or where
diversity fell below ``diversity_floor`` times its value at the start: logged
(``monitor/hacking`` = 1), warned with the step, and kept in ``<run dir>/reward_monitor.json``
with every evaluation. ``best_checkpoint`` keeps ``checkpoints/best-gold.ckpt`` at the best gold
so far; ``stop`` ends the run at the step hacking is marked. Rendering and scoring run on global
rank 0; the decisions are broadcast, so every rank saves and stops together.
"""

from __future__ import annotations

import json
import logging

import lightning as L
import numpy as np
import torch

from align.callbacks.run_dir import refuse_fsdp, run_dir
from align.data.prompt_files import read_prompts
from align.rewards.weighted import WeightedReward, parse_rewards

log = logging.getLogger(__name__)


def rising(values: list[float], patience: int, tolerance: float) -> bool:
    """Whether each of the last ``patience`` steps of ``values`` rose by more than ``tolerance``."""
    if len(values) <= patience:
        return False
    tail = values[-patience - 1 :]
    return all(b - a > tolerance for a, b in zip(tail, tail[1:]))


def pairwise_distance(features: torch.Tensor, group: int) -> float:
    """Mean distance between the rows of each consecutive ``group`` of ``features`` (N, D)."""
    groups = features.float().flatten(1).view(-1, group, features[0].numel())
    dist = torch.cdist(groups, groups)  # (P, group, group)
    off_diagonal = group * (group - 1)
    return float((dist.sum(dim=(1, 2)) / off_diagonal).mean())


class RewardMonitor(L.Callback):
    """Args:
    prompts: held-out prompts (a list, or a prompt file: .txt, .jsonl, .csv, .parquet).
    reward: the training reward, as the module's (``pickscore``, ``pickscore,hps:0.5``).
    gold: rewards the run is not trained on, the same syntax; each is logged, their weighted sum
        is ``monitor/gold``.
    sources: weights of any of those rewards by name (default: the published ones).
    every_n_steps / images_per_prompt / seed / steps / guidance_scale: when and how to render.
    diversity: ``pixels`` or the name of a CLIP-based reward whose image embeddings to compare.
    patience / tolerance / diversity_floor: the hacking rule (above).
    best_checkpoint / stop: keep the best checkpoint by gold; end the run when hacking is marked.
    """

    def __init__(
        self,
        prompts: str | list[str],
        reward: str,
        gold: str,
        sources: dict[str, str] | None = None,
        every_n_steps: int = 50,
        images_per_prompt: int = 2,
        seed: int = 0,
        steps: int = 20,
        guidance_scale: float = 7.5,
        diversity: str = "pixels",
        patience: int = 2,
        tolerance: float = 0.0,
        diversity_floor: float = 0.5,
        best_checkpoint: bool = True,
        stop: bool = False,
    ):
        if every_n_steps < 1 or images_per_prompt < 2 or patience < 1:
            raise ValueError(
                "every_n_steps >= 1, images_per_prompt >= 2 (diversity compares a prompt's "
                f"images) and patience >= 1; got {every_n_steps}, {images_per_prompt}, {patience}"
            )
        self.prompts = read_prompts(prompts) if isinstance(prompts, str) else list(prompts)
        if not self.prompts:
            raise ValueError(f"no held-out prompts in {prompts!r}")
        self.reward_spec, self.gold_spec, self.sources = reward, gold, sources or {}
        self.every_n_steps, self.images_per_prompt = every_n_steps, images_per_prompt
        self.seed = seed
        self.steps, self.guidance_scale, self.diversity = steps, guidance_scale, diversity
        self.patience, self.tolerance, self.diversity_floor = patience, tolerance, diversity_floor
        self.best_checkpoint, self.stop = best_checkpoint, stop
        self.history: list[dict] = []
        self.hacking_step: int | None = None
        self.hacking_reason: str | None = None
        self.best_gold = -float("inf")
        self._scorers: tuple | None = None

    # ---- when ------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage) -> None:
        refuse_fsdp(trainer, self)

    def on_train_start(self, trainer, pl_module) -> None:
        if not any(h["step"] == trainer.global_step for h in self.history):
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and all(h["step"] != step for h in self.history):
            self.evaluate(trainer, pl_module)

    # ---- what ------------------------------------------------------------------------------------
    def scorers(self, device) -> tuple:
        if self._scorers is None:

            def build(spec: str) -> WeightedReward:  # each reward gets the sources it names
                mine = {k: v for k, v in self.sources.items() if k in parse_rewards(spec)}
                return WeightedReward(spec, mine or None).to(device)

            self._scorers = (build(self.reward_spec), build(self.gold_spec))
        return self._scorers

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict:
        """One evaluation's numbers (rank 0)."""
        from align.models.sampling import policy_images

        k = self.images_per_prompt
        prompts = [p for p in self.prompts for _ in range(k)]
        seeds = [self.seed + j for _ in self.prompts for j in range(k)]
        context = trainer.precision_plugin.forward_context()
        images = policy_images(
            pl_module, prompts, seeds, self.steps, self.guidance_scale, context=context
        )
        reward, gold = self.scorers(pl_module.device)
        train_total, _ = reward(images, prompts)
        gold_total, gold_parts = gold(images, prompts)
        if self.diversity == "pixels":
            features = torch.from_numpy(np.stack([np.asarray(im) for im in images]) / 255.0)
            scale = features[0].numel() ** 0.5  # RMS distance per pixel
        else:
            key = WeightedReward.key(self.diversity)
            model = gold.models.get(key) or reward.models.get(key)
            if model is None or not hasattr(model, "embed_images"):
                raise ValueError(
                    f"diversity {self.diversity!r} must be 'pixels' or a CLIP-based reward of "
                    "the training or gold rewards"
                )
            features, scale = model.embed_images(images), 1.0
        return {
            "step": trainer.global_step,
            "reward": float(train_total.mean()),
            "gold": float(gold_total.mean()),
            **{f"gold/{name}": float(v.mean()) for name, v in gold_parts.items()},
            "diversity": pairwise_distance(features, k) / scale,
        }

    def judge(self, row: dict) -> str | None:
        """Why the latest evaluation marks hacking, or None."""
        golds = [-h["gold"] for h in self.history]
        gain = row["reward"] - self.history[0]["reward"]
        if gain > 0 and rising(golds, self.patience, self.tolerance):
            return (
                f"gold fell at each of {self.patience} evaluations while the training reward "
                f"stands {gain:.4g} above its start"
            )
        start = self.history[0]["diversity"]
        if start > 0 and row["diversity"] < self.diversity_floor * start:
            return f"diversity fell to {row['diversity']:.4g} from {start:.4g}"
        return None

    def evaluate(self, trainer, pl_module) -> None:
        decision = {"best": False, "hacking": None, "row": None}
        if trainer.is_global_zero:
            row = self.measure(trainer, pl_module)
            self.history.append(row)
            why = self.judge(row) if self.hacking_step is None else None
            decision = {"best": row["gold"] > self.best_gold, "hacking": why, "row": row}
        decision = trainer.strategy.broadcast(decision, src=0)
        row = decision["row"]
        if not trainer.is_global_zero:
            self.history.append(row)
        if decision["best"]:
            self.best_gold = row["gold"]
        metrics = {f"monitor/{k}": v for k, v in row.items() if k != "step"}
        if decision["hacking"] and self.hacking_step is None:
            self.hacking_step, self.hacking_reason = row["step"], decision["hacking"]
            log.warning("reward hacking at step %d: %s", row["step"], decision["hacking"])
            metrics["monitor/hacking"] = 1.0
            if self.stop:
                trainer.should_stop = True
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=row["step"])
        folder = run_dir(trainer)
        if decision["best"] and self.best_checkpoint and row["step"] > 0:
            trainer.save_checkpoint(folder / "checkpoints" / "best-gold.ckpt")
        if trainer.is_global_zero:
            record = {
                "hacking_step": self.hacking_step,
                "why": self.hacking_reason,
                "best_gold_step": max(self.history, key=lambda h: h["gold"])["step"],
                "history": self.history,
            }
            (folder / "reward_monitor.json").write_text(json.dumps(record, indent=2) + "\n")

    # ---- resume ----------------------------------------------------------------------------------
    STATE = ("history", "hacking_step", "hacking_reason", "best_gold")  # what a resume restores

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        initial = {"history": [], "best_gold": -float("inf")}  # a missing key: the start value
        for key in self.STATE:
            setattr(self, key, state.get(key, initial.get(key)))
        self.history = list(self.history)
