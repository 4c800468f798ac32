"""What reward fine-tuning maximises: one protocol,
two objectives a config injects into ``RFTModule``.

Per batch the module calls ``objective.prepare(prompts)`` (every rank: it may hold a collective),
samples images for the prepared prompts, then ``objective(images, prepared, grad)`` -> (loss,
metrics). A batch an objective cannot use names the counter to raise in ``prepared.skip``; the
module skips it on every rank.

- ``SegmentPreference``: LongAlign's decomposed, reweighted segment-level score of a CLIP-based
  reward, S_w = <img, t - eta v> + w * eta <img, v>, v the batch's common text direction across
  ranks (``direction: batch``) or a saved one; loss = 0.5 * (1 - mean S_w)
  (official ``unet_reward.py``).
- ``DirectReward``: any registry reward maximised as is (DRaFT / AlignProp): loss = 1 - mean score,
  the score expected in [0, 1] (e.g. the shapes world's judge relaxation,
  ``align.demo.soft_judge``).

Both build their reward from the registry (a name, or ``module:name`` for one registered outside
``align.rewards``), frozen, in ``dtype``; it moves with the module and never enters checkpoints.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from align.objectives.reward import DegenerateDirection, load_direction, rft_loss
from align.rewards.registry import build_reward, init_config, reward_dtype
from align.rewards.segments import batch_direction, embed_prompt_segments, score_segments

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A batch's prompts as the objective will score them."""

    prompts: list[str]
    skip: str | None = None  # the counter to raise when the batch cannot be used
    counts: dict[str, int] = field(default_factory=dict)  # events to count (dropped prompts, ...)
    context: Any = None  # what ``forward`` needs besides the images


class RewardObjective(torch.nn.Module):
    """A frozen registry reward and how RFT turns its scores into a loss."""

    def __init__(self, args: dict):
        """``args``: the subclass ``__init__``'s ``locals()``, its arguments named once."""
        super().__init__()
        self.config = init_config(self, args)
        reward, source, options = args["reward"], args["source"], args["options"]
        dtype = reward_dtype(args["dtype"])
        self.reward = build_reward(reward, source, dtype=dtype, **(options or {}))
        self.settings = {"reward": reward, "reward_source": source}
        self.random_crop = args["random_crop"]

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        """A random ``random_crop``-pixel square (official: 504 of 512) or the images as given."""
        size = self.random_crop
        if not size or min(images.shape[-2:]) <= size:
            return images
        h, w = images.shape[-2:]
        top, left = random.randrange(h - size + 1), random.randrange(w - size + 1)
        return images[..., top : top + size, left : left + size]

    def prepare(self, prompts: list[str]) -> Prepared:
        return Prepared(prompts, skip=None if prompts else "skipped_empty_batch")


class DirectReward(RewardObjective):
    """loss = 1 - mean reward of the decoded images (DRaFT / AlignProp); logs ``reward_mean``."""

    def __init__(
        self,
        reward: str,
        source: str | None = None,
        options: dict | None = None,
        dtype: str = "float32",
        random_crop: int | None = None,
    ):
        super().__init__(locals())

    def forward(self, images: torch.Tensor, prepared: Prepared, grad: bool):
        scores = self.reward.score(self.crop(images), prepared.prompts, grad=grad)
        return 1 - scores.mean(), {"reward_mean": scores.detach().mean()}


class SegmentPreference(RewardObjective):
    """LongAlign's S_w of a CLIP-based reward (``denscore``, ``pickscore``, ``hps``, ``clip``).

    Args:
        reward / source / options / dtype: the registry reward, where its weights are, its factory
            options, ``float32`` or ``bfloat16``.
        w: the weight of the text-irrelevant part (0.3; 1 recovers the original score).
        direction: ``batch`` (v per batch, averaged across ranks) or a saved direction file
            (fixed v).
        direction_fallback: a saved direction for a batch that cannot define one (None: skip it).
        splitter: how prompts are split into segments (``official``).
        random_crop: crop decoded images to this side before scoring (official: 504 of 512).
    """

    def __init__(
        self,
        reward: str = "denscore",
        source: str | None = None,
        options: dict | None = None,
        dtype: str = "float32",
        w: float = 0.3,
        direction: str = "batch",
        direction_fallback: str | None = None,
        splitter: str = "official",
        random_crop: int | None = None,
    ):
        fixed = None if direction == "batch" else load_direction(direction)  # a missing file: now
        fallback = None if direction_fallback is None else load_direction(direction_fallback)
        super().__init__(locals())
        if not all(hasattr(self.reward, a) for a in ("embed_images", "embed_segments")):
            raise TypeError(
                f"reward {reward!r} has no image/text embeddings: LongAlign's "
                "decomposition needs a CLIP-based reward; use DirectReward"
            )
        self.w, self.splitter = w, splitter
        self.settings["w"] = w
        self.register_buffer("fixed_direction", fixed, persistent=False)
        self.register_buffer("fallback_direction", fallback, persistent=False)

    def prepare(self, prompts: list[str]) -> Prepared:
        """Prompts without segments are dropped (counted); v comes from the batch (a collective:
        called on every rank, whatever it holds), the fixed direction, or the fallback."""
        with torch.no_grad():
            texts = embed_prompt_segments(self.reward, prompts, self.splitter)
        keep = texts.has_text.tolist()
        counts = {}
        if not all(keep):
            dropped = [p for p, ok in zip(prompts, keep) if not ok]
            log.warning("dropping %d prompt(s) without segments: %r", len(dropped), dropped[:3])
            counts["skipped_no_segments"] = len(dropped)
            prompts = [p for p, ok in zip(prompts, keep) if ok]
            texts = texts.select(texts.has_text)
        if self.fixed_direction is not None:
            v, source = self.fixed_direction, "fixed"
        else:
            try:
                v, source = batch_direction(texts.text, fallback=self.fallback_direction)
            except DegenerateDirection as err:
                log.warning("skipping the batch: %s, and no direction_fallback is set", err)
                v, source = None, "degenerate"
        if source == "saved":
            counts["direction_fallback"] = 1
        skip = "skipped_empty_batch" if not prompts else "skipped_degenerate" if v is None else None
        return Prepared(prompts, skip, counts, (texts, v, source))

    def scores(self, images: torch.Tensor, prepared: Prepared, grad: bool):
        texts, v, _ = prepared.context
        image_emb = self.reward.embed_images(self.crop(images), grad=grad)
        return score_segments(self.reward, None, texts, v, w=self.w, grad=grad, image_emb=image_emb)

    def forward(self, images: torch.Tensor, prepared: Prepared, grad: bool):
        """(0.5 * (1 - mean S_w), the decomposition's metrics); NaN when a score is not finite."""
        out = self.scores(images, prepared, grad)
        weighted = out.decomposed.weighted
        finite = bool(torch.isfinite(weighted.detach()).all())
        loss = rft_loss(weighted) if finite else torch.full((), float("nan"))
        metrics = {f"reward_{k}": v for k, v in out.decomposed.metrics().items()}
        metrics["direction_from_saved"] = torch.tensor(float(prepared.context[2] == "saved"))
        return loss, metrics
