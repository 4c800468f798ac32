"""A transformers CLIPModel with its tokenizer and (PIL-backend) image processor: the backbone of
PickScore, CLIP score and the LAION aesthetic predictor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from align.rewards.base import ClipRewardModel, clip_preprocess_tensor
from align.rewards.sources import load_error, resolve_pretrained

PROCESSOR_CONFIG = "preprocessor_config.json"


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose pooler_output is
    projected (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def crop_size(processor) -> int:
    crop = processor.crop_size
    return int(crop["height"] if isinstance(crop, dict) else getattr(crop, "height", crop))


def _shortest_edge(processor) -> int:
    size = processor.size
    if isinstance(size, dict):
        return int(size.get("shortest_edge") or size.get("height"))
    return int(getattr(size, "shortest_edge", None) or getattr(size, "height"))


class HFClip(nn.Module):
    """CLIPModel + tokenizer + image processor loaded with ``from_pretrained``
    (local directory or hub id)."""

    max_length = 77  # CLIP's text context

    def __init__(self, model, tokenizer, processor):
        super().__init__()
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    @classmethod
    def load(
        cls,
        reward: str,
        source: str | None,
        default: str,
        processor: str | None = None,
        default_processor: str | None = None,
        vision_only: bool = False,
    ) -> "HFClip":
        """``processor`` defaults to a local ``source`` holding ``preprocessor_config.json``, then
        to ``default_processor``, then to the model itself."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        where = resolve_pretrained(reward, source, default)
        own = source is not None and (Path(source).expanduser() / PROCESSOR_CONFIG).is_file()
        processor = processor or (source if own else default_processor) or where
        proc_where = resolve_pretrained(reward, processor, default, needs=PROCESSOR_CONFIG)
        try:
            model = CLIPModel.from_pretrained(where)
        except Exception as err:
            raise load_error(reward, where, err) from err
        try:
            # the PIL backend: the resampling the published scores were computed with
            image_processor = AutoImageProcessor.from_pretrained(proc_where, backend="pil")
            tokenizer = None if vision_only else AutoTokenizer.from_pretrained(proc_where)
        except Exception as err:
            raise load_error(reward, proc_where, err) from err
        return cls(model, tokenizer, image_processor)

    def preprocess_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        p = self.processor
        resize = _shortest_edge(p) if p.do_resize else None
        crop = crop_size(p) if p.do_center_crop else None
        return clip_preprocess_tensor(images, resize, crop, p.image_mean, p.image_std)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this CLIP backbone was loaded without a tokenizer")
        return self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = {k: v.to(self.model.device) for k, v in self.tokenize(prompts).items()}
        return _features(self.model.get_text_features(**tokens))


class HFClipReward(ClipRewardModel):
    """A reward over a transformers CLIPModel (PickScore, CLIP score, Denscore, the aesthetic
    predictor): preprocessing and the two towers come from ``HFClip``; a subclass only says how two
    embeddings make a score."""

    def __init__(self, clip: HFClip):
        super().__init__()
        self.clip = clip

    def preprocess_pil(self, images):
        return self.clip.preprocess_pil(images)

    def preprocess_tensor(self, images):
        return self.clip.preprocess_tensor(images)

    def image_features(self, pixel_values):
        return self.clip.image_features(pixel_values)

    def text_features(self, prompts: Sequence[str]):
        return self.clip.text_features(prompts)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned temperature, exp(logit_scale)."""
        return self.clip.model.logit_scale.exp().float()
