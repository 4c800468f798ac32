"""Training loss for LongAlign's segment-level preference model ("Denscore").

The official LongAlign code publishes no Denscore training code, so this objective is our choice,
made to change as little as possible from a known-good recipe:

* **Pair term = PickScore's objective** (Kirstain et al. 2023, without in-batch negatives). For a
  pair of images of one prompt with scores s_0, s_1 and human labels (label_0, label_1) in {(1, 0),
  (0, 1), (0.5, 0.5)}: logits = logit_scale * [s_0, s_1], loss = cross-entropy of softmax(logits)
  against the soft target [label_0, label_1]. A tie thus pushes the two scores together instead of
  being dropped. The only change from PickScore is the score itself: s is LongAlign's
  segment-aggregated score (:func:`align.objectives.reward.segment_score`, the mean over segments of
  the image-segment cosine), so the model learns to rank images by how well they match the *whole*
  long caption.
* **Optional segment term** (``segment_weight``, default 0, i.e. off): the same cross-entropy
  applied to each real segment's cosine separately, averaged over a pair's real segments, then over
  pairs. It asks every sentence, not only their average, to agree with the human choice; it is off
  by default because a human preference for one image need not hold sentence by sentence.

``logit_scale`` is the multiplier itself (CLIP's ``logit_scale.exp()``, 100 for a trained CLIP), not
its log. PickScore also weights examples by 1 / (pairs per prompt); here every pair weighs the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from align.objectives.common import ObjectiveOutput


@dataclass
class PreferenceOutput(ObjectiveOutput):
    """The loss and its diagnostics (all detached except ``loss``).

    ``accuracy`` counts pairs with a human preference (label_0 != label_1): correct when the higher
    score is the preferred image, half when the two scores are exactly equal (as DPO's implicit
    accuracy). Tied pairs have no right answer and are excluded. A batch of only ties reports 0.5
    (chance) with ``n_decided = 0``: aggregate accuracy across batches weighting by ``n_decided``
    for the exact figure.
    """

    loss: torch.Tensor
    pair_loss: torch.Tensor  # the PickScore cross-entropy on segment-aggregated scores
    # the per-segment term (unweighted); 0.0 when no segment scores were given
    segment_loss: torch.Tensor
    accuracy: torch.Tensor
    n_decided: torch.Tensor  # number of non-tied pairs behind ``accuracy``
    tie_frac: torch.Tensor  # fraction of pairs labelled a tie
    score_margin: torch.Tensor  # mean over non-tied pairs of s_preferred - s_other; 0.0 when none


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a soft target over the last dim (size 2)."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def preference_loss(
    scores_0: torch.Tensor,
    scores_1: torch.Tensor,
    label_0: torch.Tensor,
    label_1: torch.Tensor,
    logit_scale: torch.Tensor | float,
    segment_scores_0: torch.Tensor | None = None,
    segment_scores_1: torch.Tensor | None = None,
    segment_mask: torch.Tensor | None = None,
    segment_weight: float = 0.0,
) -> PreferenceOutput:
    """Denscore loss for B pairs: scores (B,), labels (B,) with label_0 + label_1 = 1.

    ``segment_scores_0/1`` (B, S): each real segment's cosine with image 0 / 1
    (:func:`align.objectives.reward.segment_cosines`); ``segment_mask`` (B, S) bool marks real
    segments (None: all real); both images of a pair share one caption, so one mask serves both.
    Pairs whose caption has no real segment are left out of the segment term. Given segment scores,
    the segment term is always computed and logged;
    it enters the loss only when ``segment_weight`` > 0.
    """
    if not (
        scores_0.ndim == 1 and scores_0.shape == scores_1.shape == label_0.shape == label_1.shape
    ):
        raise ValueError(
            f"scores_0 {tuple(scores_0.shape)}, scores_1 {tuple(scores_1.shape)}, label_0 "
            f"{tuple(label_0.shape)} and label_1 {tuple(label_1.shape)} must all be (B,)"
        )
    if scores_0.shape[0] == 0:
        raise ValueError("preference_loss needs at least one pair")
    dtype = torch.promote_types(scores_0.dtype, torch.float32)
    target = torch.stack([label_0, label_1], dim=-1).to(device=scores_0.device, dtype=dtype)
    if ((target < 0) | (target > 1)).any() or not torch.allclose(
        target.sum(-1), torch.ones_like(target[:, 0])
    ):
        raise ValueError("labels must lie in [0, 1] with label_0 + label_1 = 1 per pair")
    scale = torch.as_tensor(logit_scale, device=scores_0.device, dtype=dtype)

    logits = scale * torch.stack([scores_0, scores_1], dim=-1).to(dtype)
    pair_loss = _soft_ce(logits, target).mean()
    loss = pair_loss

    has_segments = segment_scores_0 is not None or segment_scores_1 is not None
    if segment_weight < 0:
        raise ValueError(f"segment_weight must be >= 0, got {segment_weight}")
    if segment_weight > 0 and not has_segments:
        raise ValueError("segment_weight > 0 needs segment_scores_0 and segment_scores_1")
    segment_loss = torch.zeros((), device=scores_0.device, dtype=dtype)
    if has_segments:
        if segment_scores_0 is None or segment_scores_1 is None:
            raise ValueError("give both segment_scores_0 and segment_scores_1, or neither")
        if (
            segment_scores_0.ndim != 2
            or segment_scores_0.shape != segment_scores_1.shape
            or segment_scores_0.shape[0] != scores_0.shape[0]
        ):
            raise ValueError(
                f"segment scores must both be (B={scores_0.shape[0]}, S), got "
                f"{tuple(segment_scores_0.shape)} and {tuple(segment_scores_1.shape)}"
            )
        mask = segment_mask
        if mask is None:
            mask = torch.ones(segment_scores_0.shape, dtype=torch.bool, device=scores_0.device)
        elif mask.dtype != torch.bool or mask.shape != segment_scores_0.shape:
            raise ValueError(
                f"segment_mask must be a bool tensor of shape {tuple(segment_scores_0.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask.to(scores_0.device)
        # zero padded rows *before* the softmax: a NaN there would otherwise come back as a NaN
        # gradient (B, S, 2)
        pair_scores = torch.stack([segment_scores_0, segment_scores_1], dim=-1).to(dtype)
        pair_scores = torch.where(mask.unsqueeze(-1), pair_scores, torch.zeros_like(pair_scores))
        seg_ce = _soft_ce(scale * pair_scores, target.unsqueeze(1).expand_as(pair_scores))  # (B, S)
        seg_ce = torch.where(mask, seg_ce, torch.zeros_like(seg_ce))
        n_seg = mask.sum(dim=1)
        per_pair = seg_ce.sum(dim=1) / n_seg.clamp(min=1)
        has_any = n_seg > 0
        segment_loss = per_pair.sum() / has_any.sum().clamp(min=1)
        if segment_weight > 0:
            loss = loss + segment_weight * segment_loss

    with torch.no_grad():
        s0, s1 = scores_0.detach().to(dtype), scores_1.detach().to(dtype)
        decided = target[:, 0] != target[:, 1]
        pref_0 = target[:, 0] > target[:, 1]
        margin = torch.where(pref_0, s0 - s1, s1 - s0)
        correct = (margin > 0).to(dtype) + 0.5 * (margin == 0).to(dtype)
        n_decided = decided.sum()
        denom = n_decided.clamp(min=1).to(dtype)
        accuracy = torch.where(
            n_decided > 0,
            torch.where(decided, correct, 0.0).sum() / denom,
            torch.full((), 0.5, dtype=dtype, device=s0.device),
        )
        score_margin = torch.where(decided, margin, 0.0).sum() / denom
        return PreferenceOutput(
            loss=loss,
            pair_loss=pair_loss.detach(),
            segment_loss=segment_loss.detach(),
            accuracy=accuracy,
            n_decided=n_decided,
            tie_frac=(~decided).to(dtype).mean(),
            score_margin=score_margin,
        )
