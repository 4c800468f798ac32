"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

Score = ``logit_scale.exp() * cos(image_emb, text_emb)``, exactly as the official example computes
it (``model.logit_scale.exp() * text_embs @ image_embs.T``). Model: ``yuvalkirstain/PickScore_v1``
(transformers CLIPModel); processor: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (its CLIP image
processor on the PIL backend, and its tokenizer, truncating at 77 tokens). A local model directory
holding ``preprocessor_config.json`` is its own processor.
"""

from __future__ import annotations

from align.rewards.hf_clip import HFClip, HFClipReward
from align.rewards.registry import register_reward

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(HFClipReward):
    name = "pickscore"

    def score_embeddings(self, image_emb, text_emb):
        return self.logit_scale * (image_emb * text_emb).sum(-1)


@register_reward("pickscore")
def build_pickscore(source: str | None = None, processor: str | None = None, **_) -> PickScore:
    return PickScore(HFClip.load("pickscore", source, DEFAULT_MODEL, processor, DEFAULT_PROCESSOR))
