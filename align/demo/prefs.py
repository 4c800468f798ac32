"""On-policy preference data from the judge, in the real shard schemas.

The base model samples ``images_per_caption`` images for each training caption (fixed seeds); the
judge scores them. Pairs (Pick-a-Pic schema): every two images of a caption, or (``best_worst``) its
best and worst; the one satisfying more facts wins (``label_0`` 1 or 0), equal scores are kept as
ties (0.5, which the DPO data module drops as the official code does). KTO singles: an image is
desirable when it satisfies every fact of its caption. ``flipped`` writes the control: winners and
losers swapped, desirable and undesirable swapped. ``shuffled_seed`` writes the label-free
control: each decisive pair's winner drawn at random (same images, same ties), or the KTO labels
permuted across images (same class sizes), which measures what training on these images does
whatever the preference.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from align.data.synthetic import _write_shards
from align.demo.judge import judge_many

# a pair's json fields (Pick-a-Pic's) taken from its sample
PAIR_FIELDS = ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid", "score_0", "score_1")


def png_free_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes (quality 95, no chroma subsampling: colours survive at 32 px) of an
    (H, W, 3) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def build_records(captions: list[str], images: np.ndarray, per_caption: int) -> dict:
    """Judge ``images`` (caption-major: images[i * per_caption + j] is image j of caption i)."""
    texts = [c for c in captions for _ in range(per_caption)]
    scores = judge_many(images, texts)
    return {"captions": captions, "images": images, "scores": scores, "per_caption": per_caption}


def caption_pairs(scores, best_worst: bool = False) -> list[tuple[int, int]]:
    """The pairs of one caption's images (indices into ``scores``): every two, or with
    ``best_worst`` only its best and worst (the first of equal scores; none when all tie)."""
    if not best_worst:
        return list(itertools.combinations(range(len(scores)), 2))
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    return [(best, worst)] if scores[best] > scores[worst] else []


def pair_samples(
    rec: dict,
    flipped: bool = False,
    shuffled_seed: int | None = None,
    best_worst: bool = False,
) -> list[dict]:
    out = []
    rng = np.random.default_rng(shuffled_seed) if shuffled_seed is not None else None
    k = rec["per_caption"]
    for i, cap in enumerate(rec["captions"]):
        for a, b in caption_pairs(rec["scores"][i * k : (i + 1) * k], best_worst):
            ia, ib = i * k + a, i * k + b
            sa, sb = rec["scores"][ia], rec["scores"][ib]
            label_0 = 0.5 if sa == sb else float(sa > sb)
            if label_0 != 0.5 and (flipped or (rng is not None and rng.random() < 0.5)):
                label_0 = 1.0 - label_0
            out.append(
                {
                    "caption": cap,
                    "label_0": label_0,
                    "label_1": 1.0 - label_0,
                    "image_0": rec["images"][ia],
                    "image_1": rec["images"][ib],
                    "image_0_uid": f"shapes-{ia:07d}",
                    "image_1_uid": f"shapes-{ib:07d}",
                    "score_0": float(sa),
                    "score_1": float(sb),
                }
            )
    return out


def single_samples(
    rec: dict, flipped: bool = False, shuffled_seed: int | None = None
) -> list[dict]:
    """KTO singles; ``shuffled_seed``: the judge's labels permuted across images
    (same class sizes, random labels)."""
    labels = np.asarray(rec["scores"]) == 1.0
    if shuffled_seed is not None:
        labels = np.random.default_rng(shuffled_seed).permutation(labels)
    return [
        {
            "caption": rec["captions"][idx // rec["per_caption"]],
            "label": bool(label) != flipped,
            "image": rec["images"][idx],
            "image_uid": f"shapes-{idx:07d}",
            "score": float(rec["scores"][idx]),
        }
        for idx, label in enumerate(labels)
    ]


def _write_shuffled(out_dir, prefix: str, samples: list[dict], shards: int, seed: int, files):
    """``samples`` in a random order (``seed``) as ``<prefix>-*.tar`` shards; ``files(sample,
    index)`` gives a sample's entries (``index``: its place in ``samples``)."""
    order = np.random.default_rng(seed).permutation(len(samples))

    def make(i, rng):
        return {"__key__": f"{i:09d}", **files(samples[order[i]], int(order[i]))}

    return _write_shards(out_dir, prefix, len(samples), shards, make, seed)


def write_pairs(out_dir, samples: list[dict], shards: int = 4, seed: int = 0) -> list[Path]:
    def files(s: dict, index: int) -> dict:
        meta = {k: s[k] for k in PAIR_FIELDS}
        meta.update(model_0="shapes-base", model_1="shapes-base", ranking_id=index, user_id=0)
        return {
            "jpg_0.jpg": png_free_jpeg(s["image_0"]),
            "jpg_1.jpg": png_free_jpeg(s["image_1"]),
            "json": json.dumps(meta).encode(),
        }

    return _write_shuffled(out_dir, "pairs", samples, shards, seed, files)


def write_singles(out_dir, samples: list[dict], shards: int = 4, seed: int = 0) -> list[Path]:
    def files(s: dict, index: int) -> dict:
        meta = {k: s[k] for k in ("caption", "label", "image_uid", "score")}
        meta.update(wins=int(s["label"]), losses=int(not s["label"]))
        return {"jpg": png_free_jpeg(s["image"]), "json": json.dumps(meta).encode()}

    return _write_shuffled(out_dir, "singles", samples, shards, seed, files)


def summary(rec: dict, best_worst: bool = False) -> dict:
    pairs = pair_samples(rec, best_worst=best_worst)
    ties = sum(p["label_0"] == 0.5 for p in pairs)
    return {
        "captions": len(rec["captions"]),
        "images": int(len(rec["scores"])),
        "mean_score": float(np.mean(rec["scores"])),
        "desirable": int((rec["scores"] == 1.0).sum()),
        "pairs": len(pairs),
        "decisive_pairs": len(pairs) - ties,
        "ties": ties,
        "best_worst": best_worst,
    }
