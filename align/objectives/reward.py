"""LongAlign's reward math (Liu et al., ICLR 2025): segment-level scores, the decomposition of a
preference score into text-relevant and text-irrelevant parts, and the reward fine-tuning
(RFT) loss.

Segment score. A long caption is split into segments (sentences), each encoded separately by the
preference model's text tower. The caption's embedding t is the mean of the L2-normalised segment
embeddings, and is *not* re-normalised: its norm (< 1 when segments disagree) is part of the
official score, which is <img, t> = the mean over segments of cos(image, segment).

Decomposition. Preference models reward images partly for things no caption asks for (style,
polish): in embedding space that shows up as a direction v shared by all text embeddings. With v the
normalised mean text embedding of the batch (averaged across ranks) and eta = <t, v>:

    relevant   = <img, t - eta v>        t - eta v is orthogonal to v: what this caption says
                                         beyond the common part
    irrelevant = eta <img, v>            the common, caption-independent part
    weighted   = relevant + w * irrelevant,   w = 0.3

so w = 1 recovers the original score and w < 1 stops the policy from over-optimising the common
direction. RFT loss = 0.5 * (1 - mean weighted score).

Pure tensor functions; the only collective is in :func:`common_direction` (a no-op without DDP).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from align.objectives.distributed import all_reduce_mean

_DIRECTION_KEY = "direction"


class DegenerateDirection(RuntimeError):
    """The batch cannot define a common direction (too few text embeddings, or their mean is ~0).

    Callers fall back to a saved direction (:func:`load_direction`) instead of training on a noisy
    one.
    """


class NonFiniteReward(ValueError):
    """A reward score is NaN or infinite: refuse to build a loss from it rather than train on
    garbage."""


def segment_text_embedding(
    segment_emb: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, S, D) segment embeddings -> (B, D): mean of the L2-normalised embeddings of the real
    segments.

    ``mask`` (B, S) bool marks real segments (None: all are real). Padded rows are ignored even if
    they hold NaN. The result is not re-normalised (see the module docstring). A row with no real
    segment has no text to score against and gives a zero vector, hence a score of 0,
    instead of NaN.
    """
    if segment_emb.ndim != 3:
        raise ValueError(f"segment_emb must have shape (B, S, D), got {tuple(segment_emb.shape)}")
    if mask is None:
        return F.normalize(segment_emb, dim=-1).mean(dim=1)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = real segment), got {mask.dtype}")
    if mask.shape != segment_emb.shape[:2]:
        raise ValueError(
            f"mask must have shape {tuple(segment_emb.shape[:2])}, got {tuple(mask.shape)}"
        )
    mask = mask.to(segment_emb.device)
    # zero padded rows *before* normalising: a NaN there would otherwise come back as a NaN gradient
    real = torch.where(mask.unsqueeze(-1), segment_emb, torch.zeros_like(segment_emb))
    summed = F.normalize(real, dim=-1).sum(dim=1)  # zero rows stay zero
    return summed / mask.sum(dim=1, keepdim=True).clamp(min=1).to(summed.dtype)


def _check_shapes(image_emb: torch.Tensor, segment_emb: torch.Tensor) -> None:
    b, d = image_emb.shape if image_emb.ndim == 2 else (None, None)
    if segment_emb.ndim != 3 or b is None or segment_emb.shape[::2] != (b, d):
        raise ValueError(
            f"image_emb (B, D) and segment_emb (B, S, D) do not match: "
            f"{tuple(image_emb.shape)} vs {tuple(segment_emb.shape)}"
        )


def segment_cosines(image_emb: torch.Tensor, segment_emb: torch.Tensor) -> torch.Tensor:
    """Cosine of each image (B, D) with each of its segments (B, S, D) -> (B, S). Padded segments
    included: mask them downstream."""
    _check_shapes(image_emb, segment_emb)
    img = F.normalize(image_emb, dim=-1)
    return torch.einsum("bd,bsd->bs", img, F.normalize(segment_emb, dim=-1))


def segment_score(
    image_emb: torch.Tensor, segment_emb: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Segment-level preference score (B,): <normalised image embedding,
    :func:`segment_text_embedding`>, i.e. the mean over real segments of the image-segment
    cosine."""
    _check_shapes(image_emb, segment_emb)
    text = segment_text_embedding(segment_emb, mask)
    return (F.normalize(image_emb, dim=-1) * text).sum(dim=-1)


def common_direction(
    text_emb: torch.Tensor, min_count: int = 2, across_ranks: bool = True
) -> torch.Tensor:
    """v: the normalised mean of the text embeddings (N, D) over the global batch (or, with
    ``across_ranks=False``, over this process's rows: a whole prompt set), detached, float32 (D,).

    Under DDP the mean covers every rank's rows, weighted by count (a collective: call it on every
    rank, even one holding no rows). The official code averages each rank's own mean
    (``gather(...).mean(0)``): the same v when ranks hold equal numbers of rows, as they do unless
    RFT drops prompts without segments; a rank left with none would put a NaN mean into that
    average, and here it simply adds nothing. Raises :class:`DegenerateDirection` when fewer than
    ``min_count`` rows exist globally (one caption's "common direction" is just that caption) or
    when the mean is numerically zero.
    Detached: v is a statistic of the batch that the reward is measured against,
    not something to train.
    """
    if text_emb.ndim != 2:
        raise ValueError(f"text_emb must have shape (N, D), got {tuple(text_emb.shape)}")
    mean, count = all_reduce_mean(text_emb, across_ranks=across_ranks)
    if count.item() < min_count:
        raise DegenerateDirection(
            f"{int(count.item())} text embeddings; a common direction needs at least {min_count}"
        )
    norm = mean.norm()
    if norm.item() < 1e-8:
        raise DegenerateDirection("the mean text embedding is ~0; its direction is undefined")
    return (mean / norm).to(text_emb.device)


def save_direction(v: torch.Tensor, path: str | Path) -> None:
    """Save a direction (D,) as safetensors (key ``direction``, float32, CPU)."""
    from safetensors.torch import save_file

    if v.ndim != 1:
        raise ValueError(f"a direction has shape (D,), got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError("refusing to save a non-finite direction")
    save_file(
        {_DIRECTION_KEY: v.detach().float().cpu().contiguous()},
        str(path),
        metadata={"kind": "longalign-common-direction"},
    )


def load_direction(path: str | Path, device: torch.device | str | None = None) -> torch.Tensor:
    """Load a direction saved by :func:`save_direction`; returned unit-norm, float32 (D,)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved common direction at {path}")
    tensors = load_file(str(path))
    if _DIRECTION_KEY not in tensors:
        raise KeyError(f"{path} holds no {_DIRECTION_KEY!r} tensor (found {sorted(tensors)})")
    v = tensors[_DIRECTION_KEY].float()
    if v.ndim != 1 or not torch.isfinite(v).all() or v.norm() < 1e-8:
        raise ValueError(f"{path}: the saved direction must be a finite, non-zero (D,) vector")
    v = v / v.norm()
    return v.to(device) if device is not None else v


@dataclass
class DecomposedScore:
    """Per-sample scores (B,) of :func:`decomposed_score`; ``weighted`` carries the gradient."""

    original: torch.Tensor  # <img, t>
    relevant: torch.Tensor  # <img, t - eta v>
    irrelevant: torch.Tensor  # eta <img, v>
    weighted: torch.Tensor  # relevant + w * irrelevant
    eta: torch.Tensor  # <t, v>

    def metrics(self) -> dict[str, torch.Tensor]:
        """Batch means, detached."""
        return {k: v.detach().float().mean() for k, v in self.__dict__.items()}


def decompose_text(
    text_emb: torch.Tensor, direction: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split text embeddings (B, D) along a direction (D,): returns
    (t - eta v, eta v, eta) with eta = <t, v>.

    ``direction`` is normalised here (a no-op for a unit vector) so eta v is the orthogonal
    projection.
    """
    if text_emb.ndim != 2 or direction.shape != text_emb.shape[1:]:
        raise ValueError(
            f"text_emb must be (B, D) and direction (D,), got {tuple(text_emb.shape)} "
            f"and {tuple(direction.shape)}"
        )
    v = F.normalize(direction.to(text_emb), dim=0)
    eta = text_emb @ v
    common = eta.unsqueeze(-1) * v
    return text_emb - common, common, eta


def decomposed_score(
    image_emb: torch.Tensor, text_emb: torch.Tensor, direction: torch.Tensor, w: float = 0.3
) -> DecomposedScore:
    """LongAlign's reweighted preference score S_w = <img, t - eta v> + w * eta <img, v>.

    ``image_emb`` (B, D) is L2-normalised here; ``text_emb`` (B, D) is used as given (the
    segment-aggregated :func:`segment_text_embedding`, not re-normalised); ``direction`` (D,) is v.
    Computed in at least float32. ``weighted`` is computed as original - (1 - w) * irrelevant,
    algebraically the same as relevant + w * irrelevant,
    so that w = 1 gives the original score bit for bit.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(
            f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} "
            "must both be (B, D)"
        )
    # at least float32: under bf16 autocast the scores' differences would drown in rounding
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    img = F.normalize(image_emb.to(dtype), dim=-1)
    text_emb = text_emb.to(dtype)
    text_relevant, _, eta = decompose_text(text_emb, direction)
    v = F.normalize(direction.to(img), dim=0)
    original = (img * text_emb).sum(dim=-1)
    relevant = (img * text_relevant).sum(dim=-1)
    irrelevant = eta * (img @ v)
    weighted = original - (1.0 - w) * irrelevant
    return DecomposedScore(
        original=original, relevant=relevant, irrelevant=irrelevant, weighted=weighted, eta=eta
    )


def rft_loss(weighted_scores: torch.Tensor) -> torch.Tensor:
    """Reward fine-tuning loss 0.5 * (1 - mean score) over a (B,) batch of scores.

    Raises :class:`NonFiniteReward` if any score is NaN or infinite: a NaN reward would silently
    turn every gradient into NaN (or, after clipping, into noise),
    so the step must fail loudly instead.
    """
    if weighted_scores.ndim != 1 or weighted_scores.shape[0] == 0:
        raise ValueError(
            f"weighted_scores must be a non-empty (B,) tensor, got {tuple(weighted_scores.shape)}"
        )
    finite = torch.isfinite(weighted_scores.detach())
    if not finite.all():
        raise NonFiniteReward(
            f"{int((~finite).sum())} of {weighted_scores.shape[0]} reward scores are NaN/inf"
        )
    return 0.5 * (1.0 - weighted_scores.mean())
