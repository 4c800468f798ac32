"""Prompt encoders: captions in, UNet conditioning out.

Every encoder maps a list of captions to ``PromptEmbeds``; modules, samplers and caches depend on
this one interface, so SD1.5, SDXL and the segment-level
(LongAlign) encoders are interchangeable without branches.

* SD1.5: CLIP last hidden state of the 77-token, <eot>-padded caption.
* SDXL: penultimate hidden states of both encoders concatenated (768 + 1280), pooled = the projected
  output of encoder 2 (``text_embeds``), as the official Diffusion-DPO SDXL code and diffusers'
  pipeline compute them.
"""

from __future__ import annotations

import torch
from torch import nn

from align.models.embeds import PromptEmbeds
from align.models.segment import SegmentTextEncoder


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def tokenize(tokenizer, captions: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids (B, max_length), padded and truncated as SD's pipelines do."""
    return tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=max_length or tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


class CLIPPromptEncoder(nn.Module):
    """SD1.5: the last hidden state of one CLIP text encoder."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    def forward(self, captions: list[str]) -> PromptEmbeds:
        ids = tokenize(self.tokenizer, captions).to(_device(self.text_encoder))
        return PromptEmbeds(self.text_encoder(ids)[0])


class SDXLPromptEncoder(nn.Module):
    """SDXL: penultimate hidden states of both encoders, concatenated;
    pooled from encoder 2's projection."""

    def __init__(self, tokenizers: list, text_encoders: list[nn.Module]):
        super().__init__()
        self.tokenizers = list(tokenizers)
        self.text_encoders = nn.ModuleList(text_encoders)

    def forward(self, captions: list[str]) -> PromptEmbeds:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenize(tokenizer, captions).to(_device(encoder))
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
        return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)


def build_prompt_encoder(components, kind: str = "clip", **kwargs) -> nn.Module:
    """The prompt encoder for ``components``: ``clip``
    (SD1.5 or SDXL by the model) or ``segment`` (LongAlign)."""
    if kind == "clip":
        if components.is_sdxl:
            return SDXLPromptEncoder(components.tokenizers, components.text_encoders)
        return CLIPPromptEncoder(components.tokenizers[0], components.text_encoders[0])
    if kind == "segment":
        if components.is_sdxl:
            raise ValueError(
                "the segment encoder follows LongAlign, which conditions SD1.5-style (one CLIP)"
            )
        return SegmentTextEncoder(components.tokenizers[0], components.text_encoders[0], **kwargs)
    raise ValueError(f"unknown prompt encoder {kind!r}; expected 'clip' or 'segment'")
