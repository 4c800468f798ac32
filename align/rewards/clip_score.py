"""CLIP score (Hessel et al. 2021, as torchmetrics computes it):
``max(100 * cos(image_emb, text_emb), 0)``.

Model and processor: ``openai/clip-vit-large-patch14`` by default (transformers CLIPModel,
PIL-backend image processor, 77-token truncation), or any local CLIP directory in that layout.
"""

from __future__ import annotations


from align.rewards.hf_clip import HFClip, HFClipReward
from align.rewards.registry import register_reward

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


class ClipScore(HFClipReward):
    name = "clip"
    scale = 100.0

    def score_embeddings(self, image_emb, text_emb):
        return (self.scale * (image_emb * text_emb).sum(-1)).clamp(min=0)


@register_reward("clip")
def build_clip_score(source: str | None = None, processor: str | None = None, **_) -> ClipScore:
    return ClipScore(HFClip.load("clip", source, DEFAULT_MODEL, processor=processor))
