"""Prompt encoders: captions in, UNet conditioning out.

Every encoder maps a list of captions to ``PromptEmbeds``; modules, samplers and caches depend on
this one interface, so SD1.5, SDXL and the segment-level
(LongAlign) encoders are interchangeable without branches.

* SD1.5: CLIP last hidden state of the 77-token, <eot>-padded caption.
* SDXL: penultimate hidden states of both encoders concatenated (768 + 1280), pooled = the projected
  output of encoder 2 (``text_embeds``), as the official Diffusion-DPO SDXL code and diffusers'
  pipeline compute them.
* SD3: both CLIPs' penultimate hidden states concatenated, zero-padded to T5's width, then T5's
  last hidden state appended along the sequence; pooled = both CLIPs' projections concatenated
  (``StableDiffusion3Pipeline.encode_prompt``).
* FLUX.1: T5's last hidden state; pooled = CLIP-L's pooled output (``FluxPipeline.encode_prompt``).
"""

from __future__ import annotations

import torch
from torch import nn

from align.models.embeds import PromptEmbeds
from align.models.segment import SegmentTextEncoder
from align.models.tokenizer import tokenize


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def penultimate_states(tokenizers, encoders, captions: list[str]):
    """The CLIP encoders' penultimate hidden states concatenated along the width, and each
    encoder's first output (a projected one's: the pooled vector)."""
    hidden, first = [], []
    for tokenizer, encoder in zip(tokenizers, encoders):
        out = encoder(tokenize(tokenizer, captions).to(_device(encoder)), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        first.append(out[0])
    return torch.cat(hidden, dim=-1), first


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
        hidden, first = penultimate_states(self.tokenizers, self.text_encoders, captions)
        return PromptEmbeds(hidden, first[-1])  # encoder 2's projected pooled output (text_embeds)


class T5PromptEncoder(nn.Module):
    """SD3 and FLUX.1: CLIP encoders for the pooled vector (and SD3's first rows) and T5 for the
    sequence, padded to ``max_sequence_length`` tokens (the pipelines' defaults: SD3 256, FLUX
    512)."""

    def __init__(self, family: str, tokenizers: list, text_encoders: list[nn.Module], **kwargs):
        super().__init__()
        unknown = set(kwargs) - {"max_sequence_length"}
        if unknown:
            raise ValueError(
                f"the {family} prompt encoder takes max_sequence_length, not {unknown}"
            )
        self.family, self.tokenizers = family, list(tokenizers)
        self.text_encoders = nn.ModuleList(text_encoders)
        self.max_sequence_length = kwargs.get(
            "max_sequence_length", 256 if family == "sd3" else 512
        )

    def forward(self, captions: list[str]) -> PromptEmbeds:
        *clips, t5 = self.text_encoders
        ids = tokenize(self.tokenizers[-1], captions, self.max_sequence_length).to(_device(t5))
        sequence = t5(ids)[0]
        if self.family == "flux":
            ids = tokenize(self.tokenizers[0], captions).to(_device(clips[0]))
            return PromptEmbeds(sequence, clips[0](ids).pooler_output)
        clip, pooled = penultimate_states(self.tokenizers, clips, captions)
        clip = nn.functional.pad(clip, (0, sequence.shape[-1] - clip.shape[-1]))
        return PromptEmbeds(torch.cat([clip, sequence], dim=-2), torch.cat(pooled, dim=-1))


def build_prompt_encoder(components, kind: str = "clip", **kwargs) -> nn.Module:
    """The prompt encoder for ``components``: ``clip`` (the model's own text encoding: SD1.5,
    SDXL, SD3 or FLUX.1) or ``segment`` (LongAlign, SD1.5 only)."""
    family = components.family
    tokenizers, encoders = components.tokenizers, components.text_encoders
    if kind == "clip":
        if family in ("sd3", "flux"):
            return T5PromptEncoder(family, tokenizers, encoders, **kwargs)
        if family == "sdxl":
            return SDXLPromptEncoder(tokenizers, encoders)
        return CLIPPromptEncoder(tokenizers[0], encoders[0])
    if kind == "segment":
        if family != "sd15":
            raise ValueError(
                f"the segment encoder follows LongAlign, which conditions SD1.5-style (one CLIP); "
                f"this model is {family}: use prompt_encoder: clip"
            )
        return SegmentTextEncoder(tokenizers[0], encoders[0], **kwargs)
    raise ValueError(f"unknown prompt encoder {kind!r}; expected 'clip' or 'segment'")
