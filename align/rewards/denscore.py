"""Denscore (LongAlign): a CLIP preference model scored at segment level, and decomposed.

``score()`` is Denscore-O, the segment-aggregated cosine as the official ``dense_score`` computes
it; ``score_columns`` adds its decomposition along a common direction v (the export's
``direction.safetensors`` or any saved one). An export (``PreferenceModelModule.export``,
:func:`write_denscore_export`) is a transformers ``CLIPModel`` directory with its tokenizer,
``preprocessor_config.json``, an optional ``direction.safetensors`` and ``align_reward.json``. The
published model is ``luping-liu/Denscore``; ``align data tiny-denscore OUT_DIR`` writes a tiny
random one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from align.objectives.reward import load_direction, save_direction
from align.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from align.rewards.hf_clip import HFClip, HFClipReward
from align.rewards.registry import register_reward
from align.rewards.segments import SegmentScorer, embed_prompt_segments, estimate_direction
from align.rewards.sources import MANIFEST
from align.rewards.tiny import write_tiny_hf_clip

DEFAULT_MODEL = "luping-liu/Denscore"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DIRECTION_FILE = "direction.safetensors"
COLUMNS = {"original": "denscore-o", "relevant": "denscore", "weighted": "denscore-w"}


class Denscore(HFClipReward):
    """Segment-level CLIP preference score; see the module doc. ``score()`` is Denscore-O
    (a cosine)."""

    name = "denscore"

    def __init__(
        self,
        clip: HFClip,
        direction: torch.Tensor | None = None,
        w: float = 0.3,
        splitter: str = "official",
    ):
        super().__init__(clip)
        self.w, self.splitter = w, splitter
        self.register_buffer(
            "direction",
            None if direction is None else F.normalize(direction.float(), dim=0),
            persistent=False,
        )

    def score_embeddings(self, image_emb, text_emb):
        return (image_emb * text_emb).sum(-1)

    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image_emb = F.normalize(self.image_features(pixel_values).float(), dim=-1)
        with torch.no_grad():
            texts = embed_prompt_segments(self, list(prompts), self.splitter)
        return self.score_embeddings(image_emb, texts.text.to(image_emb.device))

    def scorer(self) -> SegmentScorer:
        return SegmentScorer(
            self, direction=self.direction, w=self.w, splitter=self.splitter, columns=COLUMNS
        )

    def score_columns(
        self, images, prompts: Sequence[str], batch_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Denscore-O (``denscore-o``), the text-relevant part (``denscore``) and S_w
        (``denscore-w``) per image.

        Decomposed along the saved direction; without one,
        call :meth:`fit_direction` on the prompt set first."""
        return self.scorer().score_columns(images, list(prompts), batch_size)

    def fit_direction(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Estimate the common direction over ``prompts`` and keep it
        (when the export carries none)."""
        v = estimate_direction(self, list(prompts), self.splitter, batch_size)
        self.direction = v.to(self.device)
        return v


def write_denscore_export(
    model,
    tokenizer,
    out: str | Path,
    image_size: int = 224,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    direction: torch.Tensor | None = None,
    splitter: str = "official",
) -> Path:
    """Write a Denscore directory: CLIPModel + tokenizer + CLIP image processor config
    (+ direction, manifest)."""
    from transformers import CLIPImageProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(image_mean or OPENAI_CLIP_MEAN),
        image_std=list(image_std or OPENAI_CLIP_STD),
    ).save_pretrained(out)
    options: dict = {"splitter": splitter}
    if direction is not None:
        save_direction(direction, out / DIRECTION_FILE)
        options["direction"] = DIRECTION_FILE
    (out / MANIFEST).write_text(json.dumps({"options": options}, indent=2) + "\n")
    return out


@register_reward("denscore")
def build_denscore(
    source: str | None = None,
    processor: str | None = None,
    direction: str | None = None,
    w: float = 0.3,
    splitter: str = "official",
    **_,
) -> Denscore:
    """Denscore from an export directory (its own processor and direction) or a hub id (default: the
    published model with the CLIP-H processor, no direction). ``direction``: a saved direction file
    (overrides the export's)."""
    clip = HFClip.load("denscore", source, DEFAULT_MODEL, processor, DEFAULT_PROCESSOR)
    v = load_direction(direction) if direction else None
    return Denscore(clip, direction=v, w=float(w), splitter=splitter)


TINY_CAPTIONS = (
    "A red circle on a white background. It sits in the top left corner.",
    "A large blue square in the center. The background is grey. Nothing else appears.",
    "Two green triangles. One is above the other. Both have sharp edges.",
    "A photo of a cat on a mat. The mat is yellow. A window is behind it.",
    "An astronaut riding a horse at sunset. The sky is orange. Mountains rise in the distance.",
    "A small purple house by a river. Trees surround it. The water is calm.",
)


def write_tiny_denscore(out: str | Path, seed: int = 17) -> Path:
    """A tiny random Denscore (the tiny CLIP of ``align.rewards.tiny``) in the export layout, with a
    direction estimated over a few fixed captions. Written once:
    a complete directory is left as is."""
    from transformers import CLIPModel, CLIPTokenizer

    out = Path(out)
    if (out / ".complete").exists():
        return out
    write_tiny_hf_clip(out, seed=seed)
    model, tokenizer = CLIPModel.from_pretrained(out), CLIPTokenizer.from_pretrained(out)
    reward = build_denscore(str(out))
    direction = estimate_direction(reward, TINY_CAPTIONS)
    write_denscore_export(model, tokenizer, out, direction=direction)
    (out / ".complete").write_text("ok\n")
    return out
