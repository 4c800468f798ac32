"""GRPO for epsilon- and v-prediction UNets (SD1.5, SDXL) and flow transformers (SD3, FLUX.1):
the policy learns from its own samples.

Per batch of B prompts (DDPO's stochastic DDIM or Flow-GRPO's SDE sampler, Flow-GRPO's group
advantages; ``align.objectives.grpo``, ``align.modules.sampling``):

1. sample G images per prompt with DDIM at ``eta`` > 0 (UNets) or the flow SDE at noise level
   ``eta`` (flow models) and guidance, keeping each step's latents and log-probability (no
   gradients);
2. score the decoded images with the injected reward (one registry reward or a weighted sum);
   advantages are normalised within each prompt's group; a group whose rewards are all equal, or
   that holds a non-finite reward, has none (counted: ``train/groups_without_advantage``,
   ``train/nonfinite_rewards``);
3. ``updates`` optimizer steps over the B * G samples, each on its share of them: for
   ``train_steps`` of the denoising steps (drawn per batch), recompute the step's log-probability
   under the current policy and minimise PPO's clipped surrogate (+ ``kl_beta`` times the KL to the
   reference). From the second update on the policy has moved: that is where the clip acts.

One training batch therefore makes ``updates`` optimizer steps (``trainer.max_steps`` counts them);
Lightning's ``gradient_clip_val`` does not apply (manual optimisation): use ``max_grad_norm``.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from align.modules.base import DiffusionModule
from align.modules.frozen import trainable_parameters
from align.modules.sampling import PolicySampling
from align.objectives.distributed import any_rank
from align.objectives.grpo import group_advantages, grpo_loss
from align.rewards.weighted import WeightedReward


def reward_metrics(rewards: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict:
    """Mean reward and mean of each part over the finite rewards (0 when none is)."""
    finite = torch.isfinite(rewards)
    metrics = {"reward": rewards[finite].mean() if finite.any() else rewards.new_zeros(())}
    return metrics | {f"reward/{k}": v[finite.to(v.device)].mean() for k, v in parts.items()}


class GRPOModule(PolicySampling, DiffusionModule):
    """GRPO with a reward injected by the config (``align.rewards.weighted.WeightedReward``).

    Args:
        reward: what the policy maximises (a registry reward or a weighted sum).
        group_size: images per prompt (G); advantages are normalised within each group.
        num_steps / eta / guidance_scale: the sampler (eta > 0: every step has a density). UNets:
            DDIM's eta (DDPO: 1.0); flow models: Flow-GRPO's SDE noise level (its default 0.7);
            FLUX.1's guidance is its embedding's (Flow-GRPO: 3.5), the others' CFG.
        train_steps: how many denoising steps each update trains on (DDPO's
            ``timestep_fraction``; default all), drawn at random per batch among the steps whose
            timestep lies in ``timestep_range`` (default every step; ``[500, 1000]``: the
            high-noise half, where layout and colour are decided, as MixGRPO trains early steps).
        updates: optimizer steps per sampled batch, each on 1 / ``updates`` of its samples.
        clip_range: PPO's clip on the probability ratio (DDPO: 1e-4).
        adv_clip: bound on |advantage| (DDPO: 5).
        kl_beta: weight of the KL to the reference (0: no reference is kept or run).
        max_grad_norm: gradient norm clipping per optimizer step (None: off).
        resolution: image side in pixels (None: the model's native resolution).
        Everything else: see ``DiffusionModule``.
    """

    frozen_parts = DiffusionModule.frozen_parts + ("reward",)

    def __init__(
        self,
        reward: WeightedReward,
        group_size: int = 4,
        num_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        train_steps: int | None = None,
        updates: int = 2,
        clip_range: float = 1e-4,
        adv_clip: float = 5.0,
        kl_beta: float = 0.0,
        max_grad_norm: float | None = 1.0,
        resolution: int | None = None,
        vae_checkpointing: bool = False,
        **kwargs,
    ):
        if group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 (advantages compare a group), got {group_size}"
            )
        if eta <= 0:
            raise ValueError(f"eta must be > 0 (eta 0 has no transition density), got {eta}")
        kwargs.setdefault("reference", "auto" if kl_beta else "none")
        super().__init__(**kwargs)
        self.guidance_scale = guidance_scale
        self.resolution = resolution or self.components.resolution
        self.setup_sampler(num_steps, eta)
        low, high = self.timestep_range
        # flow timesteps lie in (0, N]: a range up to N includes t = N
        top = self.components.is_flow and high >= self.scheduler.config.num_train_timesteps
        self.trainable_steps = [
            i
            for i, t in enumerate(self.timesteps.tolist())
            if low <= t < high or (top and t >= low)
        ]
        train_steps = len(self.trainable_steps) if train_steps is None else train_steps
        if not 1 <= train_steps <= len(self.trainable_steps):
            raise ValueError(
                f"train_steps must be in [1, {len(self.trainable_steps)}] (the sampler's steps "
                f"with a timestep in {list(self.timestep_range)}), got {train_steps}"
            )
        if updates < 1:
            raise ValueError(f"updates must be >= 1, got {updates}")
        self.automatic_optimization = False
        self.reward = reward.eval().requires_grad_(False)
        self.hparams["reward"] = reward.config  # checked on resume, rebuilt by align export
        self.group_size, self.num_steps = group_size, num_steps
        self.train_steps, self.updates = train_steps, updates
        self.clip_range, self.adv_clip, self.kl_beta = clip_range, adv_clip, kl_beta
        self.max_grad_norm = max_grad_norm
        self.vae_checkpointing = vae_checkpointing
        self._counts: Counter[str] = Counter()

    # ---- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str]) -> dict:
        """The stochastic sampler from the module's generator; every step's latents and
        log-probability:
        ``latents`` (S + 1, N, ...), ``log_probs`` (S, N), ``images`` (N, 3, H, W) in [0, 1]."""
        cond, time_ids = self.conditioning(prompts)
        x = self.initial_noise(len(prompts), self.generator).float()
        latents, log_probs = [x], []
        for i, t in enumerate(self.timesteps):
            pred = self.guided_prediction(x, t, cond, time_ids)
            x, log_prob, _ = self.transition(i, pred, x, generator=self.generator)
            latents.append(x)
            log_probs.append(log_prob)
        images = self.decode(x)
        return {
            "latents": torch.stack(latents),
            "log_probs": torch.stack(log_probs),
            "images": images,
            "cond": cond,
            "time_ids": time_ids,
        }

    def step_log_prob(self, rollout: dict, step: int, rows: torch.Tensor, reference: bool = False):
        """(log-probability (n,), transition mean) of ``rollout``'s step ``step`` for ``rows``
        under the policy, or the reference (no gradient)."""
        cond, time_ids = rollout["cond"], rollout["time_ids"]
        # [cond; uncond] rows with CFG
        both = torch.cat([rows, rows + cond.embeds.shape[0] // 2]) if self.uses_cfg else rows
        cond = type(cond)(cond.embeds[both], None if cond.pooled is None else cond.pooled[both])
        time_ids = None if time_ids is None else time_ids[both]
        x, prev = rollout["latents"][step, rows], rollout["latents"][step + 1, rows]
        t = self.timesteps[step]
        if not reference:
            pred = self.guided_prediction(x, t, cond, time_ids)
        else:  # reference 'none' with kl_beta: the policy, without gradient, stands in
            with torch.no_grad(), self.reference_denoiser(required=False) as unet:
                pred = self.guided_prediction(x, t, cond, time_ids, unet=unet)
        _, log_prob, mean = self.transition(step, pred, x, prev_sample=prev)
        return log_prob, mean

    # ---- rewards and advantages ------------------------------------------------------------------
    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group advantages; a group with a non-finite reward gets none (counted)."""
        groups = rewards.view(-1, self.group_size)
        finite = torch.isfinite(groups).all(dim=1, keepdim=True).expand_as(groups).reshape(-1)
        self.count("nonfinite_rewards", int((~torch.isfinite(rewards)).sum()))
        safe = torch.where(finite, rewards, torch.zeros_like(rewards))
        adv, valid = group_advantages(safe, self.group_size, clip=self.adv_clip)
        valid = valid & finite
        adv = torch.where(valid, adv, torch.zeros_like(adv))
        self.count("groups_without_advantage", int((~valid).sum()) // self.group_size)
        return adv, valid

    def count(self, name: str, n: int) -> None:
        self._counts[name] += n
        self.log(f"train/{name}", float(self._counts[name]), reduce_fx="max")

    # ---- steps -----------------------------------------------------------------------------------
    def expand(self, captions) -> list[str]:
        return [c for c in captions for _ in range(self.group_size)]

    def training_step(self, batch: dict, batch_idx: int):
        self.log_skipped(batch)
        prompts = self.expand(batch["caption"])
        start = self.clock()
        rollout = self.sample(prompts)
        rewards, parts = self.reward(rollout["images"], prompts)
        rewards = rewards.to(self.device).float()
        sampled = self.clock()
        adv, valid = self.advantages(rewards)
        n = len(prompts)
        metrics = {**reward_metrics(rewards, parts), "valid_fraction": valid.float().mean()}
        self.log_metrics("train", metrics, n)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        if not any_rank(bool(valid.any()), self.device):
            # nothing to learn from: the updates are counted (no gradients, nothing changes), so
            # a reward that never separates a group still ends at max_steps
            self.count("skipped_no_advantage", 1)
            for _ in range(self.updates):
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            return None
        order = torch.tensor(self.host_rng.sample(range(n), n), device=self.device)
        for chunk in order.chunk(self.updates):
            for step in self.host_rng.sample(self.trainable_steps, self.train_steps):
                log_prob, mean = self.step_log_prob(rollout, step, chunk)
                ref_mean = None
                if self.kl_beta:
                    ref_mean = self.step_log_prob(rollout, step, chunk, reference=True)[1]
                out = grpo_loss(
                    log_prob,
                    rollout["log_probs"][step, chunk],
                    adv[chunk],
                    self.clip_range,
                    mean=mean,
                    ref_mean=ref_mean,
                    std=self.transition_std(step),
                    kl_beta=self.kl_beta,
                )
                self.manual_backward(out.loss / self.train_steps)
            if self.max_grad_norm:
                self.clip_gradients(optimizer, self.max_grad_norm, "norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            self.log_metrics("train", {"loss": out.loss.detach(), **out.metrics()}, len(chunk))
        # images per second of each phase (sampling includes the reward; one host sync a batch)
        rates = {"sampling": n / (sampled - start), "training": n / (self.clock() - sampled)}
        self.log_metrics("train", {f"{k}_images_per_sec": v for k, v in rates.items()}, n)
        return None

    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def validation_step(self, batch: dict, batch_idx: int):
        prompts = self.expand(batch["caption"])
        rollout = self.sample(prompts)
        rewards, parts = self.reward(rollout["images"], prompts)
        finite = torch.isfinite(rewards)
        if finite.any():
            self.log_metrics("val", reward_metrics(rewards, parts), int(finite.sum()))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(trainable_parameters(self))
        if self.scheduler_factory is None:
            return optimizer
        return [optimizer], [self.scheduler_factory(optimizer)]
