"""LongAlign's segment-level scoring for every CLIP-based reward (CLIP, PickScore, HPSv2,
Denscore, ...), built on the embeddings every ``ClipRewardModel`` exposes and the pure functions of
``align.objectives.reward``: nothing here depends on the model behind the reward.

A prompt with no segment holding a letter or a digit ("", "  ", "...") has no text to score
against: callers drop it (reward fine-tuning) or report it (evaluation) rather than score it. Save
a direction estimated over a prompt set with
``align direction --reward denscore --source DIR --prompts PROMPTS --out direction.safetensors``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from align.models.splitters import resolve_splitter
from align.models.tokenizer import build_clip_tokenizer
from align.objectives.reward import (
    DecomposedScore,
    DegenerateDirection,
    common_direction,
    decomposed_score,
    load_direction,
    segment_cosines,
    segment_text_embedding,
)

log = logging.getLogger(__name__)

_CONTENT = re.compile(r"\w")  # a segment says something when it holds a letter or a digit


def resolve_reward_splitter(reward, splitter: str | Callable[[str], list[str]] = "official"):
    """A splitter by name or callable; ``packed`` counts tokens with the reward's own tokenizer when
    it has one."""
    tokenizer = getattr(getattr(reward, "clip", None), "tokenizer", None)
    if splitter == "packed" and tokenizer is None:
        tokenizer = build_clip_tokenizer()
    return resolve_splitter(splitter, tokenizer)


def has_segments(prompt: str, split: Callable[[str], list[str]]) -> bool:
    """Whether ``prompt`` yields at least one segment holding a letter or a digit."""
    return isinstance(prompt, str) and any(_CONTENT.search(piece) for piece in split(prompt))


def split_prompts(prompts: Sequence[str], split: Callable[[str], list[str]]) -> list[list[str]]:
    """Each prompt's segments as the splitter gives them (the official pieces are kept as they are,
    so scores match the official code), or ``[]`` for a prompt with no segment holding a letter or a
    digit."""
    out = []
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
        pieces = list(split(prompt))
        out.append(pieces if any(_CONTENT.search(p) for p in pieces) else [])
    return out


@dataclass
class SegmentTexts:
    """Segment embeddings of a batch of prompts (all float32, on the reward's device)."""

    segments: list[list[str]]
    embeddings: torch.Tensor  # (B, S, D) L2-normalised, zero rows where mask is False
    mask: torch.Tensor  # (B, S) bool, real segments
    # (B, D) mean of the real segments' normalised embeddings (not re-normalised)
    text: torch.Tensor
    has_text: torch.Tensor  # (B,) bool, prompts with at least one segment

    def select(self, keep: torch.Tensor) -> "SegmentTexts":
        """The rows where ``keep`` (B,) is True."""
        idx = keep.nonzero().flatten().tolist()
        rows = (self.embeddings[keep], self.mask[keep], self.text[keep], self.has_text[keep])
        return SegmentTexts([self.segments[i] for i in idx], *rows)


def _text_dim(reward) -> int:
    cached = getattr(reward, "_segment_text_dim", None)
    if cached is None:
        cached = int(reward.embed_texts(["a"]).shape[-1])
        reward._segment_text_dim = cached
    return cached


def embed_prompt_segments(
    reward, prompts: Sequence[str], splitter: str | Callable = "official", grad: bool = False
) -> SegmentTexts:
    """Split ``prompts`` and embed all their segments with ``reward``'s text tower in one batched
    call.

    ``reward`` is any ``ClipRewardModel``. Prompts without segments get an empty mask row and t = 0.
    """
    split = resolve_reward_splitter(reward, splitter)
    segments = split_prompts(list(prompts), split)
    b, device = len(segments), reward.device
    # nothing to embed (also an empty batch): keep the shapes, no model call needed
    if not any(segments):
        d = _text_dim(reward)
        emb = torch.zeros(b, 1, d, device=device)
        mask = torch.zeros(b, 1, dtype=torch.bool, device=device)
    else:
        per_prompt = iter(segments)
        emb, mask = reward.embed_segments(
            list(prompts), split=lambda _caption: next(per_prompt), grad=grad
        )
    has_text = mask.any(dim=1)
    with torch.set_grad_enabled(grad):
        text = segment_text_embedding(emb, mask)
    return SegmentTexts(segments, emb, mask, text, has_text)


def batch_direction(
    text: torch.Tensor, fallback: torch.Tensor | None = None, min_count: int = 2
) -> tuple[torch.Tensor, str]:
    """(v, source): the common direction of the global batch's text embeddings (N, D) (a collective
    under DDP: every rank calls it, one holding no rows too), ``source = "batch"``; when the batch
    cannot define one (fewer than ``min_count`` prompts globally, or a zero mean), ``fallback`` with
    ``source = "saved"``. Without a fallback the ``DegenerateDirection`` propagates:
    the caller must skip, not guess."""
    try:
        return common_direction(text, min_count=min_count), "batch"
    except DegenerateDirection as err:
        if fallback is None:
            raise
        log.warning("common text direction: %s; using the saved direction", err)
        return F.normalize(fallback.float(), dim=0).to(text.device), "saved"


@torch.no_grad()
def estimate_direction(
    reward,
    prompts: Sequence[str],
    splitter: str | Callable = "official",
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """v over a whole prompt set (this process only): the normalised mean of the prompts'
    segment-aggregated text embeddings. Prompts without segments are left out. Raises
    ``DegenerateDirection`` for fewer than two."""
    from tqdm.auto import tqdm

    prompts = list(prompts)
    rows = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="direction", disable=not progress):
        texts = embed_prompt_segments(reward, prompts[start : start + batch_size], splitter)
        rows.append(texts.text[texts.has_text])
    return common_direction(torch.cat(rows) if rows else torch.zeros(0, 1), across_ranks=False)


@dataclass
class SegmentScores:
    """Segment-level scores of B images against their prompts."""

    texts: SegmentTexts
    cosines: torch.Tensor  # (B, S) image-segment cosines (zero where mask is False)
    decomposed: DecomposedScore  # original, relevant, irrelevant, weighted, eta (B,)


def score_segments(
    reward,
    images,
    prompts: Sequence[str] | SegmentTexts,
    direction: torch.Tensor | str = "batch",
    w: float = 0.3,
    splitter: str | Callable = "official",
    grad: bool = False,
    fallback: torch.Tensor | None = None,
    image_emb: torch.Tensor | None = None,
) -> SegmentScores:
    """Segment-level scores of ``images`` (PIL list or (N, 3, H, W) tensor in [0, 1]) for
    ``prompts``.

    ``direction``: a (D,) tensor, or ``"batch"`` (v of this batch's prompts across ranks;
    ``fallback`` when degenerate, see :func:`batch_direction`). ``grad=True`` keeps the graph from
    the scores to tensor images. ``image_emb`` (B, D), if given, replaces the image tower call (e.g.
    embeddings computed elsewhere). Prompts without segments score 0 in every part (their t is 0);
    see ``texts.has_text``.
    """
    texts = prompts
    if not isinstance(texts, SegmentTexts):
        texts = embed_prompt_segments(reward, prompts, splitter)
    if isinstance(direction, str):
        if direction != "batch":
            raise ValueError(f"direction must be a (D,) tensor or 'batch', got {direction!r}")
        v, _ = batch_direction(texts.text[texts.has_text], fallback=fallback)
    else:
        v = direction
    if image_emb is None:
        image_emb = reward.embed_images(images, grad=grad)
    with torch.set_grad_enabled(grad):
        image_emb = F.normalize(image_emb.float(), dim=-1)
        cos = segment_cosines(image_emb, texts.embeddings.to(image_emb.device))
        cos = cos.masked_fill(~texts.mask.to(cos.device), 0.0)
        dec = decomposed_score(
            image_emb, texts.text.to(image_emb.device), v.to(image_emb.device), w=w
        )
    return SegmentScores(texts, cos, dec)


class SegmentScorer:
    """A CLIP-based reward scored LongAlign's way: segment level,
    decomposed along a common direction.

    ``direction``: a (D,) tensor, a saved direction file, or None (then :meth:`fit_direction` on the
    prompt set before scoring, or scores are decomposed along each scoring batch's own direction,
    with a warning). ``columns`` names the outputs of :meth:`score_columns`: ``{part: column}`` with
    parts ``original``, ``relevant``, ``irrelevant``, ``weighted``; default ``<name>-seg-o``,
    ``<name>-seg``, ``<name>-seg-w``.
    """

    def __init__(
        self,
        reward,
        direction: torch.Tensor | str | Path | None = None,
        w: float = 0.3,
        splitter: str | Callable = "official",
        columns: dict[str, str] | None = None,
    ):
        if not all(hasattr(reward, a) for a in ("embed_images", "embed_texts", "embed_segments")):
            raise TypeError(
                f"{type(reward).__name__} is not a CLIP-based reward (no image/text embeddings)"
            )
        self.reward, self.w, self.splitter = reward, w, splitter
        if isinstance(direction, (str, Path)):
            direction = load_direction(direction)
        self.direction = direction
        name = getattr(reward, "name", "reward")
        suffixes = {"original": "-seg-o", "relevant": "-seg", "weighted": "-seg-w"}
        self.columns = columns or {part: name + suffix for part, suffix in suffixes.items()}
        self._warned = False

    def fit_direction(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Estimate v over the whole prompt set (so that every image is decomposed along the same
        v)."""
        self.direction = estimate_direction(self.reward, prompts, self.splitter, batch_size)
        return self.direction

    def score(self, images, prompts: Sequence[str], grad: bool = False) -> SegmentScores:
        direction = self.direction
        if direction is None:
            if not self._warned:
                log.warning(
                    "%s: no common direction given or fitted: decomposing along each batch's own",
                    getattr(self.reward, "name", "reward"),
                )
                self._warned = True
            direction = "batch"
        return score_segments(
            self.reward, images, prompts, direction, self.w, self.splitter, grad=grad
        )

    @torch.no_grad()
    def score_columns(
        self, images, prompts: Sequence[str], batch_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``{column: scores (N,)}`` for the parts named in ``columns``; prompts without segments
        give NaN (no score, rather than a misleading 0)."""
        n = len(images)
        batch_size = batch_size or getattr(self.reward, "default_batch_size", 32)
        parts: dict[str, list[torch.Tensor]] = {p: [] for p in self.columns}
        for start in range(0, n, batch_size):
            out = self.score(
                images[start : start + batch_size], list(prompts[start : start + batch_size])
            )
            for part in self.columns:
                value = getattr(out.decomposed, part).float()
                parts[part].append(
                    value.masked_fill(~out.texts.has_text.to(value.device), torch.nan)
                )
        return {
            col: torch.cat(parts[part]) if parts[part] else torch.zeros(0)
            for part, col in self.columns.items()
        }
