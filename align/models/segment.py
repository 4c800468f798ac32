"""LongAlign's segment-level text encoding: long captions through a 77-token CLIP,
one segment at a time.

Semantics (official LongAlign ``tools.caption2embed``; DESIGN.md "LongAlign"):

1. split the caption into segments (``splitter``; default ``official``, see
   ``align.models.splitters``); a caption that yields no segment is encoded as the single segment
   "";
2. tokenize each segment alone, truncated to 77 tokens: ``<sot> tokens... <eot> <pad>...``;
3. encode every segment with CLIP (last hidden state, no attention mask, as SD and the official code
   do); all segments of all captions go through CLIP together (``segment_batch_size`` chunks them if
   set);
4. keep each segment's <sot> and content rows, drop its <eot> and padding rows,
   concatenate in order;
5. truncate, or right-pad to ``max_rows`` (240) with <pad*> = the mean over positions 17..76 of
   CLIP's encoding of the empty prompt "" padded to 77
   (computed without grad, cached in the ``pad_embed`` buffer).

No positional embedding is added across segments. Kept rows are found from the tokenizer's attention
mask, not from token ids (SD's tokenizer pads with the <eot> id): with n real tokens (mask == 1:
<sot>, content, <eot>), rows 0..n-2 are kept and row n-1 (checked to be <eot>) and the padding are
dropped. The official code masks ids equal to pad or eos instead; for SD1.5's tokenizer that selects
the same rows, but it would also drop content tokens whose id equals a "!"-style pad id. Segments
that would start past ``max_rows`` are not encoded at all (they would be truncated away). The CLIP
conditioning has ``max_rows`` rows; the optional T5 branch (``align.models.t5_adapter``) appends its
``max_length`` (240) rows after them.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from align.models.embeds import PromptEmbeds
from align.models.splitters import Splitter, resolve_splitter
from align.models.t5_adapter import T5Branch, build_t5_branch
from align.models.tokenizer import tokenize

# <pad*> = mean of the empty prompt's rows 17..76 (the official ``pad_embed[0, -60:]``)
PAD_START = 17


class SegmentTextEncoder(nn.Module):
    """Captions -> ``PromptEmbeds`` (B, max_rows [+ t5 rows], D), pooled None.

    ``splitter``: ``official`` (default), ``sentences``,
    ``packed`` or a callable ``str -> list[str]``.
    ``t5``: None, a ``T5Branch``, a T5 source (directory / hub id),
    or a dict of ``build_t5_branch`` arguments.
    ``freeze_text_encoder``: CLIP eval, requires_grad False and run without grad (LongAlign never
    trains it). The unconditional embedding (caption dropout, CFG) is ``encoder([""])``;
    ``uncond(n)`` repeats it n times.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: nn.Module,
        max_rows: int = 240,
        splitter: str | Splitter = "official",
        t5: T5Branch | str | os.PathLike | None = None,
        freeze_text_encoder: bool = True,
        segment_batch_size: int | None = None,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_rows = max_rows
        self.splitter = resolve_splitter(splitter, tokenizer)
        self.segment_length = tokenizer.model_max_length  # 77 for CLIP
        self.segment_batch_size = segment_batch_size
        self.freeze_text_encoder = freeze_text_encoder
        if freeze_text_encoder:
            text_encoder.requires_grad_(False).eval()
        hidden = text_encoder.config.hidden_size
        # build_t5_branch arguments (a config's ``t5: {source: ..., adapter: ...}``)
        if isinstance(t5, dict):
            t5 = build_t5_branch(**{"out_dim": hidden, **t5})
        elif t5 is not None and not isinstance(t5, nn.Module):
            t5 = build_t5_branch(t5, out_dim=hidden)
        if t5 is not None and t5.out_dim != hidden:
            raise ValueError(f"T5 adapter out_dim {t5.out_dim} != CLIP hidden size {hidden}")
        self.t5 = t5
        self.register_buffer("pad_embed", None, persistent=False)

    @property
    def num_rows(self) -> int:
        return self.max_rows + (self.t5.max_length if self.t5 is not None else 0)

    def trainable_prompt_parts(self) -> list[nn.Module]:
        """The parts a training module keeps trainable after freezing the encoder:
        the T5 adapter, if any."""
        return [self.t5.adapter] if self.t5 is not None else []

    def train(self, mode: bool = True) -> "SegmentTextEncoder":
        super().train(mode)
        if self.freeze_text_encoder:
            self.text_encoder.eval()
        return self

    def _clip(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_text_encoder):
            return self.text_encoder(ids)[0]

    def pad_row(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """<pad*> (D,): mean over positions 17..76 of the encoding of "" padded to 77; cached,
        never with grad."""
        device = like.device if like is not None else next(self.text_encoder.parameters()).device
        cached = self.pad_embed
        stale = cached is None or cached.device != device
        stale = stale or (like is not None and cached.dtype != like.dtype)
        if stale or (cached.is_inference() and not torch.is_inference_mode_enabled()):
            ids = tokenize(self.tokenizer, [""], self.segment_length)
            with torch.no_grad():
                hidden = self.text_encoder(ids.to(device))[0]
            dtype = like.dtype if like is not None else hidden.dtype
            self.pad_embed = hidden[0, PAD_START:].mean(dim=0).to(dtype)
        return self.pad_embed

    def segments(self, caption: str) -> list[str]:
        """The segments ``caption`` is encoded as (never empty: a caption without any is the segment
        "")."""
        if not isinstance(caption, str):
            raise TypeError(f"captions must be strings, got {type(caption).__name__}")
        return list(self.splitter(caption)) or [""]

    def encode_clip(self, captions: list[str]) -> torch.Tensor:
        """The CLIP rows (B, max_rows, D)."""
        texts, owner = [], []
        for i, caption in enumerate(captions):
            pieces = self.segments(caption)
            texts += pieces
            owner += [i] * len(pieces)
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.segment_length,
            return_tensors="pt",
        )
        ids, n_real = tokens.input_ids, tokens.attention_mask.sum(dim=1)
        eos = self.tokenizer.eos_token_id
        if eos is not None and not bool((ids.gather(1, (n_real - 1)[:, None]) == eos).all()):
            raise ValueError(
                "the last real token of a segment is not <eot>: the tokenizer is not CLIP-like"
            )
        # <sot> + content; no <eot>, no pads
        keep = torch.arange(ids.shape[1])[None, :] < (n_real - 1)[:, None]

        # Encode only segments that start before max_rows: the rest would be truncated away.
        used, needed = [0] * len(captions), []
        for s, (i, rows) in enumerate(zip(owner, keep.sum(dim=1).tolist())):
            if used[i] < self.max_rows:
                needed.append(s)
                used[i] += rows
        # causal attention: trailing pads never change earlier rows
        width = int(n_real[needed].max())
        ids, keep = ids[needed, :width], keep[needed, :width]
        row_owner = torch.tensor(owner)[needed][:, None].expand_as(keep)[keep]

        device = next(self.text_encoder.parameters()).device
        step = self.segment_batch_size or len(needed)
        hidden = torch.cat(
            [self._clip(ids[j : j + step].to(device)) for j in range(0, len(needed), step)]
        )
        rows = hidden[keep.to(device)]  # (N, D): segment by segment, position by position
        row_owner = row_owner.to(device)
        pad = self.pad_row(like=hidden)
        out = []
        for i in range(len(captions)):
            mine = rows[row_owner == i][: self.max_rows]
            out.append(torch.cat([mine, pad.expand(self.max_rows - mine.shape[0], -1)]))
        return torch.stack(out)

    def forward(self, captions: list[str] | str) -> PromptEmbeds:
        captions = [captions] if isinstance(captions, str) else list(captions)
        embeds = self.encode_clip(captions)
        if self.t5 is not None:
            embeds = torch.cat([embeds, self.t5(captions).to(embeds.device, embeds.dtype)], dim=1)
        return PromptEmbeds(embeds)

    def uncond(self, batch_size: int) -> PromptEmbeds:
        """The unconditional embedding (that of "") for ``batch_size`` samples."""
        return self([""]).repeat(batch_size)
