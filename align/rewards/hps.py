"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on Human Preference Dataset
v2.

Score = ``cos(image_emb, text_emb)`` (the official ``img_score.py``: the diagonal of
``image_features @ text_features.T`` with open_clip's normalised features). The model is open_clip's
``ViT-H-14`` with the HPS checkpoint (``checkpoint["state_dict"]``) loaded strictly. Preprocessing
is HPS's ``preprocess_val`` (``light_augmentation=True``): ToTensor, resize the *longer* side to 224
(bicubic, on the tensor), pad to a centred square with 0, normalise with the OpenAI CLIP statistics.
Text: open_clip's tokenizer for the architecture (77 tokens).

``source``: the checkpoint file (``HPS_v2.1_compressed.pt``, or ``HPS_v2_compressed.pt`` with
``version="v2.0"``), a directory holding it, or the hub repository (default ``xswu/HPSv2``). A
directory may also hold ``open_clip_config.json`` (open_clip's ``{"model_cfg": ...}`` layout) to use
another architecture than ViT-H-14 (the tiny test models do).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from align.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipRewardModel,
    check_tensor_images,
    normalize,
    to_rgb,
)
from align.rewards.registry import register_reward
from align.rewards.sources import RewardSourceError, resolve_file

DEFAULT_REPO = "xswu/HPSv2"
FILENAMES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_ARCH = "ViT-H-14"
CONFIG_FILE = "open_clip_config.json"


def hps_tensor_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPS's ``ResizeMaxSize(size)`` and normalisation on (N, 3, H, W) in [0, 1], differentiable:
    the longer side resized to ``size`` (bicubic, antialiased) and zero-padded to a centred square;
    as in HPS, an image whose longer side is already ``size`` is neither resized nor padded."""
    images = check_tensor_images(images)
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        images = TF.resize(images, [new_h, new_w], InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        images = TF.pad(images, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2])
    return normalize(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def hps_preprocess(image, size: int = 224) -> torch.Tensor:
    """HPS's ``preprocess_val`` for one PIL image: ToTensor, then the tensor path."""
    return hps_tensor_preprocess(TF.to_tensor(to_rgb(image))[None], size)[0]


class HPSv2(ClipRewardModel):
    name = "hps"

    def __init__(self, model, tokenizer, image_size: int = 224):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size

    def preprocess_pil(self, images):
        return torch.stack([hps_preprocess(im, self.image_size) for im in images])

    def preprocess_tensor(self, images):
        return hps_tensor_preprocess(images, self.image_size)

    def image_features(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def text_features(self, prompts: Sequence[str]):
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))

    def score_embeddings(self, image_emb, text_emb):
        return (image_emb * text_emb).sum(-1)


def load_hps_state_dict(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RewardSourceError(f"reward 'hps': could not read checkpoint {path}: {err}") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RewardSourceError(f"reward 'hps': {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


@register_reward("hps")
def build_hps(
    source: str | None = None, version: str = "v2.1", arch: str | None = None, **_
) -> HPSv2:
    import open_clip

    if version not in FILENAMES:
        raise ValueError(
            f"reward 'hps': unknown version {version!r}; known: {', '.join(FILENAMES)}"
        )
    checkpoint = resolve_file("hps", source, FILENAMES[version], DEFAULT_REPO)
    config = Path(arch) if arch is not None else checkpoint.parent / CONFIG_FILE
    if config.is_file():
        model_cfg = json.loads(config.read_text())
        model_cfg = model_cfg.get("model_cfg", model_cfg)
        model = open_clip.CLIP(**model_cfg)
        tokenizer = open_clip.SimpleTokenizer(
            context_length=model_cfg["text_cfg"].get("context_length", 77)
        )
        arch = str(config)
    else:
        arch = arch or DEFAULT_ARCH
        model = open_clip.create_model(arch, pretrained=None)
        tokenizer = open_clip.get_tokenizer(arch)
    state = load_hps_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    unexpected = [k for k in unexpected if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise RewardSourceError(
            f"reward 'hps': {checkpoint} does not fit open_clip {arch} (missing {len(missing)} "
            f"keys, e.g. {missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]})"
        )
    size = model.visual.image_size
    return HPSv2(
        model, tokenizer, image_size=int(size[0] if isinstance(size, (tuple, list)) else size)
    )
