"""The LAION aesthetic predictor v2 (``improved-aesthetic-predictor``,
``sac+logos+ava1-l14-linearMSE.pth``).

Score = ``MLP(normalize(CLIP-L/14 image embedding))``: the embedding of OpenAI's CLIP ViT-L/14
(``openai/clip-vit-large-patch14`` through transformers: the same weights and projection as
``clip.load``), L2-normalised, through the predictor's 5-layer linear MLP (no activations; dropout
is inactive in eval), as the original ``simple_inference.py`` does. Preprocessing is OpenAI CLIP's
``_transform(224)`` (PIL bicubic resize, center crop, OpenAI mean/std). The prompt is ignored.
``source``: the ``.pth`` file, a directory holding it, or a hub repository with it (no default: the
file is published in the GitHub repository christophschuhmann/improved-aesthetic-predictor);
``clip``: the CLIP backbone (local directory or hub id).
"""

from __future__ import annotations

import torch
from torch import nn

from align.rewards.base import OpenAIClipPreprocess
from align.rewards.hf_clip import HFClip, HFClipReward
from align.rewards.registry import register_reward
from align.rewards.sources import RewardSourceError, resolve_file

FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class AestheticMLP(nn.Module):
    """The predictor head, key-compatible with the released state dict (``layers.{0,2,4,6,7}``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticScore(OpenAIClipPreprocess, HFClipReward):  # OpenAI CLIP's preprocessing, not HF's
    name = "aesthetic"
    uses_text = False

    def __init__(self, clip: HFClip, head: AestheticMLP, image_size: int = 224):
        super().__init__(clip)
        self.head = head
        self.image_size = image_size

    def score_embeddings(self, image_emb, text_emb=None):
        return self.head(image_emb.to(self.head.layers[0].weight.dtype)).squeeze(-1).float()


def load_head(path) -> AestheticMLP:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if "layers.0.weight" not in state:
        raise RewardSourceError(
            f"reward 'aesthetic': {path} is not an aesthetic-predictor state dict "
            f"(no layers.0.weight; keys: {', '.join(list(state)[:5])} ...)"
        )
    head = AestheticMLP(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state)
    return head


@register_reward("aesthetic")
def build_aesthetic(source: str | None = None, clip: str | None = None, **_) -> AestheticScore:
    where = (
        "it is published in the GitHub repository christophschuhmann/improved-aesthetic-predictor"
    )
    head = load_head(resolve_file("aesthetic", source, FILENAME, None, where_to_get=where))
    backbone = HFClip.load("aesthetic", clip, DEFAULT_CLIP)
    dim = backbone.model.config.projection_dim
    if dim != head.input_size:
        raise ValueError(
            f"reward 'aesthetic': the head takes {head.input_size}-d embeddings but the CLIP "
            f"backbone gives {dim}-d ones (the predictor needs CLIP ViT-L/14)"
        )
    return AestheticScore(
        backbone, head, image_size=int(backbone.model.config.vision_config.image_size)
    )
