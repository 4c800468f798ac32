"""ImageReward (Xu et al. 2023), loaded from its checkpoint without the ``image-reward`` package.

The PyPI package (1.5) imports helpers that transformers 5 removed (``apply_chunking_to_forward``,
``find_pruneable_heads_and_indices`` from ``transformers.modeling_utils``) and needs fairscale, so
we rebuild its model from maintained parts whose parameter names are those of the checkpoint:

* ``blip.visual_encoder``: BLIP's ViT (ViT-L/16, 224 px, LayerNorm eps 1e-6, exact GELU) -> timm's
  ``VisionTransformer`` (same module layout: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``); its output is every
  token after the final norm (``forward_features``).
* ``blip.text_encoder``: BLIP's ``med.py`` BertModel with cross-attention in every layer ->
  transformers' ``BlipTextModel``, a port of that file (same names:
  ``embeddings.{word,position}_embeddings``,
  ``encoder.layer.N.{attention,crossattention,intermediate,output}``), configured from
  ``med_config.json`` with ``encoder_hidden_size`` = the ViT width, run bidirectionally
  (``is_decoder=False``) as the original's default multimodal mode is.
* ``mlp``: the 5-layer linear head.

Score (``ImageReward.score``): tokens = BERT ``bert-base-uncased`` tokenizer with ``[DEC]`` /
``[ENC]`` added, ``padding="max_length", truncation=True, max_length=35``; image = OpenAI CLIP's
``_transform(224)``; features = ``text_encoder(ids, mask, encoder_hidden_states=ViT(image))[:, 0]``;
reward = ``(mlp(features) - mean) / std`` with mean 0.16717362830052426 and std 1.0333394966054072.

``source``: a directory holding ``ImageReward.pt`` and ``med_config.json``, the ``.pt`` file itself
(then ``med_config`` must be found beside it or passed), or the hub repository (default
``THUDM/ImageReward``). ``tokenizer``: a BERT tokenizer directory or hub id (default
``bert-base-uncased``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from align.extras import require
from align.rewards.aesthetic import AestheticMLP
from align.rewards.base import OpenAIClipPreprocess, RewardModel
from align.rewards.registry import register_reward
from align.rewards.sources import RewardSourceError, load_error, resolve_file

DEFAULT_REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
VIT_PURPOSE = "the reward model ImageReward (its ViT)"


def blip_vit(timm_vit, **shape) -> nn.Module:
    """timm's VisionTransformer laid out as BLIP's ViT: ``shape`` (img_size, patch_size, embed_dim,
    depth, num_heads, mlp_ratio), LayerNorm eps 1e-6, exact GELU, every token out."""
    return timm_vit.VisionTransformer(
        **shape,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
        class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
    )


def build_blip_vit(state: dict[str, torch.Tensor], num_heads: int | None = None) -> nn.Module:
    """A timm VisionTransformer shaped like the BLIP ViT whose weights are ``state``
    (prefix stripped)."""
    timm_vit = require("timm.models.vision_transformer", "rewards", VIT_PURPOSE)
    proj = state["patch_embed.proj.weight"]
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    return blip_vit(
        timm_vit,
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or max(1, embed_dim // 64),
        mlp_ratio=mlp_ratio,
    )


def blip_text_config(med_config: dict, vision_width: int):
    """``med_config.json`` (a BERT config plus ``encoder_width``/``add_cross_attention``) as a
    BlipTextConfig."""
    from transformers import BlipTextConfig

    keys = (
        "vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size hidden_act "
        "hidden_dropout_prob attention_probs_dropout_prob max_position_embeddings layer_norm_eps "
        "pad_token_id initializer_range"
    ).split()
    kwargs = {k: med_config[k] for k in keys if k in med_config}
    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("ImageReward's text encoder uses absolute position embeddings only")
    # [DEC] is the first token BLIP adds to the BERT vocabulary: its bos
    # (30522 of 30524 in the release)
    bos = kwargs.get("vocab_size", 30524) - 2
    return BlipTextConfig(
        **kwargs, encoder_hidden_size=vision_width, is_decoder=True, bos_token_id=bos
    )


def load_blip_tokenizer(source: str):
    """BLIP's ``init_tokenizer``: the BERT tokenizer with ``[DEC]`` as bos and ``[ENC]`` added."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise load_error("imagereward", source, err) from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    return tokenizer


class ImageReward(OpenAIClipPreprocess, RewardModel):
    name = "imagereward"

    def __init__(
        self,
        visual_encoder: nn.Module,
        text_encoder: nn.Module,
        mlp: nn.Module,
        tokenizer,
        image_size: int = 224,
        mean: float = REWARD_MEAN,
        std: float = REWARD_STD,
    ):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.mlp = mlp
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean, self.std = mean, std

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )

    def features(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The [CLS] state of the text encoder cross-attending to the image: the head's input."""
        tokens = self.tokenize(prompts)
        out = self.text_encoder(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            encoder_hidden_states=self.visual_encoder.forward_features(pixel_values),
        )
        return out.last_hidden_state[:, 0, :]

    def forward(self, pixel_values, prompts):
        features = self.features(pixel_values, prompts)
        rewards = self.mlp(features.to(self.mlp.layers[0].weight.dtype)).squeeze(-1).float()
        return (rewards - self.mean) / self.std


def split_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts = {}
    prefixes = {"visual": "blip.visual_encoder.", "text": "blip.text_encoder.", "mlp": "mlp."}
    for part, prefix in prefixes.items():
        parts[part] = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not parts[part]:
            raise RewardSourceError(
                f"reward 'imagereward': the checkpoint has no {prefix}* weights"
            )
    return parts


def _load_strict(
    reward_part: str, module: nn.Module, state: dict, ignore: tuple[str, ...] = ()
) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith(ignore)]
    if missing or unexpected:
        raise RewardSourceError(
            f"reward 'imagereward': {reward_part} weights do not fit (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )


@register_reward("imagereward")
def build_image_reward(
    source: str | None = None,
    med_config: str | None = None,
    tokenizer: str | None = None,
    vit_num_heads: int | None = None,
    **_,
) -> ImageReward:
    from transformers import BlipTextModel

    require("timm.models.vision_transformer", "rewards", VIT_PURPOSE)  # before any download
    checkpoint = resolve_file("imagereward", source, CHECKPOINT, DEFAULT_REPO)
    config_path = checkpoint.parent / MED_CONFIG if med_config is None else Path(med_config)
    if med_config is None and not config_path.is_file():
        config_path = resolve_file("imagereward", source, MED_CONFIG, DEFAULT_REPO)
    if config_path == checkpoint:  # the .pt given alone, no med_config.json beside it
        config_path = checkpoint.parent / MED_CONFIG
    if not config_path.is_file():
        raise RewardSourceError(
            f"reward 'imagereward': no {MED_CONFIG} (looked for {config_path}; pass med_config)"
        )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    parts = split_checkpoint(state)

    visual = build_blip_vit(parts["visual"], num_heads=vit_num_heads)
    _load_strict("visual encoder", visual, parts["visual"])
    text = BlipTextModel(
        blip_text_config(json.loads(config_path.read_text()), visual.embed_dim),
        add_pooling_layer=False,
    )
    _load_strict("text encoder", text, parts["text"], ignore=("position_ids",))
    head = AestheticMLP(int(parts["mlp"]["layers.0.weight"].shape[1]))
    _load_strict("mlp", head, parts["mlp"])
    tokenizer = load_blip_tokenizer(tokenizer or DEFAULT_TOKENIZER)
    return ImageReward(visual, text, head, tokenizer, image_size=visual.patch_embed.img_size[0])
