"""Text-to-image retrieval with a CLIP-based preference model, at segment level
(LongAlign, Table 1).

For N (image, long caption) pairs, each caption retrieves among all N images by its segment-level
score:

* ``full``: s(i, j) = <img_j, t_i>, t_i = the mean of caption i's normalised segment embeddings;
* ``relevant``: s(i, j) = <img_j, t_i - eta_i v>, the text-relevant part only (v: the common text
  direction of the N captions, or a saved one with ``--direction``).

R@1 = the fraction of captions whose own image scores strictly highest (a tie with another image
counts as a miss). The curve repeats the measurement with each caption cut to its first k segments,
k = 1..K: how much the later sentences help retrieval (v is re-estimated over each cut set unless
``--direction`` fixes it).

``align eval retrieval`` runs it (``align.commands._retrieval``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from align.data.images import decode_image
from align.data.pipeline import SkipSample, expand_shards
from align.objectives.reward import common_direction, decompose_text, segment_text_embedding
from align.rewards.segments import embed_prompt_segments


def similarity(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    direction: torch.Tensor | None = None,
    part: str = "full",
) -> torch.Tensor:
    """(N_text, N_image) retrieval scores: <img_j, t_i>
    (``full``) or <img_j, t_i - eta_i v> (``relevant``).

    ``image_emb`` is L2-normalised here; ``text_emb`` (segment-aggregated) is used as given."""
    img = F.normalize(image_emb.float(), dim=-1)
    text = text_emb.float()
    if part == "relevant":
        if direction is None:
            raise ValueError("the text-relevant part needs a direction")
        text, _, _ = decompose_text(text, direction.float().to(text.device))
    elif part != "full":
        raise ValueError(f"part must be 'full' or 'relevant', got {part!r}")
    return text @ img.T


def recall_at_1(scores: torch.Tensor) -> float:
    """Fraction of rows i whose diagonal score beats every other entry of the row strictly."""
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1] or scores.shape[0] == 0:
        raise ValueError(
            f"scores must be a non-empty square (N, N) matrix, got {tuple(scores.shape)}"
        )
    if scores.shape[0] == 1:
        return 1.0
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    best_other = scores.masked_fill(eye, float("-inf")).max(dim=1).values
    return float((scores.diagonal() > best_other).float().mean())


def aggregate(
    segment_emb: torch.Tensor, mask: torch.Tensor, keep: int | None = None
) -> torch.Tensor:
    """Segment-aggregated text embeddings (N, D) from (N, S, D) and (N, S),
    using the first ``keep`` segments."""
    if keep is not None:
        mask = mask & (torch.arange(mask.shape[1], device=mask.device)[None, :] < keep)
    return segment_text_embedding(segment_emb, mask)


@dataclass
class RetrievalResult:
    n: int
    r1_full: float
    r1_relevant: float
    direction: str  # "set" or the file it came from
    # {"sentences": k, "r1_full": ..., "r1_relevant": ..., "n_cut": ...}
    curve: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    reward: str = ""


def retrieval_from_embeddings(
    image_emb: torch.Tensor,
    segment_emb: torch.Tensor,
    mask: torch.Tensor,
    direction: torch.Tensor | None = None,
    max_sentences: int = 0,
) -> RetrievalResult:
    """R@1 (full and text-relevant) and the R@1-versus-sentences curve from precomputed embeddings.

    ``image_emb`` (N, D); ``segment_emb`` (N, S, D) normalised segment embeddings with ``mask`` (N,
    S). ``direction`` None: v estimated over the set (and over each cut set for the curve).
    ``max_sentences``: curve up to this k (0: up to the longest caption)."""
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every caption needs at least one segment")

    def measure(keep: int | None) -> tuple[float, float]:
        text = aggregate(segment_emb, mask, keep)
        v = direction if direction is not None else common_direction(text, across_ranks=False)
        return (
            recall_at_1(similarity(image_emb, text, v, "full")),
            recall_at_1(similarity(image_emb, text, v, "relevant")),
        )

    full, relevant = measure(None)
    counts = mask.sum(dim=1)
    k_max = int(counts.max()) if max_sentences <= 0 else min(max_sentences, int(counts.max()))
    curve = []
    for k in range(1, k_max + 1):
        r_full, r_rel = measure(k)
        n_cut = int((counts > k).sum())  # captions that lost segments at this k
        curve.append({"sentences": k, "r1_full": r_full, "r1_relevant": r_rel, "n_cut": n_cut})
    source = "given" if direction is not None else "set"
    return RetrievalResult(int(image_emb.shape[0]), full, relevant, source, curve)


def load_retrieval_set(data: str | list[str], limit: int | None = None):
    """(PIL images, captions, skip counts) from long-caption or pair shards, in shard order."""
    import webdataset as wds

    # align.data.preference and align.data.prompts import lightning and transformers (through
    # align.data.shard_module): `align eval retrieval --help` imports this module
    from align.data.preference import segment_count
    from align.data.prompts import caption_of

    images, captions, skipped = [], [], Counter()
    for url in expand_shards(data):
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
            try:
                caption = caption_of(sample)
                if "jpg" in sample:
                    image = decode_image(sample, "jpg")
                elif "jpg_0.jpg" in sample:
                    meta = json.loads(sample["json"])
                    second = float(meta.get("label_1", 0)) > float(meta.get("label_0", 0))
                    image = decode_image(sample, "jpg_1.jpg" if second else "jpg_0.jpg")
                else:
                    raise SkipSample("missing_jpg")
                if segment_count(caption) == 0:
                    raise SkipSample("no_segments")
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            except Exception:  # an unforeseen bad member: count it, never crash the evaluation
                skipped["decode_error"] += 1
                continue
            images.append(image)
            captions.append(caption)
            if limit is not None and len(images) >= limit:
                return images, captions, dict(skipped)
    return images, captions, dict(skipped)


@torch.no_grad()
def retrieval(
    reward,
    images,
    captions: list[str],
    splitter: str = "official",
    direction: torch.Tensor | None = None,
    max_sentences: int = 0,
    batch_size: int = 32,
) -> RetrievalResult:
    """Embed (batched) and measure; ``reward`` is any CLIP-based registry reward."""
    image_emb = torch.cat(
        [reward.embed_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    parts = [
        embed_prompt_segments(reward, captions[i : i + batch_size], splitter)
        for i in range(0, len(captions), batch_size)
    ]
    s_max = max(p.embeddings.shape[1] for p in parts)
    seg = torch.cat([F.pad(p.embeddings, (0, 0, 0, s_max - p.embeddings.shape[1])) for p in parts])
    mask = torch.cat([F.pad(p.mask, (0, s_max - p.mask.shape[1])) for p in parts])
    keep = mask.any(dim=1)
    result = retrieval_from_embeddings(
        image_emb[keep], seg[keep], mask[keep], direction, max_sentences
    )
    if not bool(keep.all()):
        result.skipped["no_segments"] = int((~keep).sum())
    return result


def to_markdown(result: RetrievalResult) -> str:
    lines = [
        f"## Text-to-image retrieval ({result.reward}, N = {result.n}, direction: "
        f"{result.direction})",
        "",
        "| score | R@1 |",
        "|---|---|",
        f"| full | {result.r1_full:.4f} |",
        f"| text-relevant part | {result.r1_relevant:.4f} |",
        "",
    ]
    if result.curve:
        lines += [
            "| sentences kept | R@1 full | R@1 relevant | captions cut |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c['sentences']} | {c['r1_full']:.4f} | {c['r1_relevant']:.4f} | {c['n_cut']} |"
            for c in result.curve
        ]
    if result.skipped:
        lines += [
            "",
            "skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())),
        ]
    return "\n".join(lines)
