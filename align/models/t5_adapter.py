"""LongAlign's optional T5 branch: a frozen T5 encoder over the whole caption and a trainable GEGLU
adapter.

Official semantics (LongAlign ``tools.caption2embed`` and ``modules/adapters.py``, itself
LaVi-Bridge's adapter): the caption is tokenized by T5's tokenizer to exactly ``max_length`` = 240
tokens (padded / truncated), encoded by T5 *without* an attention mask (pads are attended to;
``use_attention_mask=True`` changes that), and projected by ``TextAdapter``: LayerNorm(1024) ->
GEGLU(1024 -> 4096) -> Dropout(0.1) -> Linear(4096 -> 896) -> LayerNorm(896) -> GEGLU(896 -> 3584)
-> Dropout(0.1) -> Linear(3584 -> 768). Its 240 rows go after the 240 CLIP rows. The parameter names
match LaVi-Bridge's checkpoint (``ff1.net.0.proj``, ``norm1``, ...), which the official code starts
from, so ``TextAdapter.from_pretrained(dir)`` loads that checkpoint as-is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class TextAdapter(ModelMixin, ConfigMixin):
    """T5 hidden states (…, in_dim) -> UNet conditioning rows (…, out_dim);
    paper size 1024 -> 896 -> 768."""

    @register_to_config
    def __init__(
        self,
        in_dim: int = 1024,
        int_dim: int = 896,
        out_dim: int = 768,
        mult: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm1 = nn.LayerNorm(in_dim)
        # diffusers' GEGLU feed-forward: LaVi-Bridge's keys (net.0.proj, net.2) and outputs
        self.ff1 = FeedForward(in_dim, int_dim, mult, dropout)
        self.norm2 = nn.LayerNorm(int_dim)
        self.ff2 = FeedForward(int_dim, out_dim, mult, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(self.norm2(self.ff1(self.norm1(x))))


class T5Branch(nn.Module):
    """Captions -> (B, max_length, adapter out_dim). T5 is frozen (eval, no grad, kept in eval by
    ``train()``); only the adapter trains."""

    def __init__(
        self,
        t5_tokenizer,
        t5_encoder: nn.Module,
        adapter: nn.Module,
        max_length: int = 240,
        use_attention_mask: bool = False,
    ):
        super().__init__()
        d_model = t5_encoder.config.d_model
        if getattr(adapter, "in_dim", d_model) != d_model:
            raise ValueError(f"adapter in_dim {adapter.in_dim} != T5 hidden size {d_model}")
        self.tokenizer = t5_tokenizer
        self.encoder = t5_encoder.requires_grad_(False).eval()
        self.adapter = adapter
        self.max_length = max_length
        self.use_attention_mask = use_attention_mask
        self.out_dim = adapter.out_dim

    def train(self, mode: bool = True) -> "T5Branch":
        super().train(mode)
        self.encoder.eval()  # T5 has dropout: a frozen encoder must stay deterministic
        return self

    def forward(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(captions),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.encoder.parameters()).device
        mask = tokens.attention_mask.to(device) if self.use_attention_mask else None
        with torch.no_grad():
            hidden = self.encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask)[0]
        param = next(self.adapter.parameters())
        return self.adapter(hidden.to(param.device, param.dtype))


def build_t5_branch(
    source: str | os.PathLike | None,
    adapter: str | os.PathLike | nn.Module | None = None,
    hidden_dim: int = 896,
    out_dim: int = 768,
    max_length: int = 240,
    use_attention_mask: bool = False,
    torch_dtype: torch.dtype | None = None,
) -> T5Branch | None:
    """The T5 branch from a local directory or hub id holding a T5 tokenizer and encoder (official:
    ``google-t5/t5-large``), or None for ``source=None``. ``adapter``: a directory / hub id of a
    saved ``TextAdapter`` (e.g. LaVi-Bridge's ``t5_unet/adapter``), a module, or None for a fresh
    one (T5 d_model -> ``hidden_dim`` -> ``out_dim``). Never runs remote code."""
    if source is None:
        return None
    from transformers import AutoTokenizer, T5EncoderModel

    kw = dict(torch_dtype=torch_dtype) if torch_dtype is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    encoder = T5EncoderModel.from_pretrained(str(source), **kw)
    if adapter is None:
        adapter = TextAdapter(in_dim=encoder.config.d_model, int_dim=hidden_dim, out_dim=out_dim)
    elif not isinstance(adapter, nn.Module):
        adapter = TextAdapter.from_pretrained(str(adapter))
    return T5Branch(
        tokenizer, encoder, adapter, max_length=max_length, use_attention_mask=use_attention_mask
    )


_TINY_CORPUS = [
    "A red cat sits on a blue mat next to a wooden table.",
    "The dog runs through the green park under a bright sky!",
    "A photo of 3.5 apples, e.g. green ones, in a glass bowl.",
    "Two people walk along the beach at sunset; waves roll in.",
    "An old castle stands on a hill, surrounded by tall trees and fog.",
]


def write_tiny_t5(out_dir: str | os.PathLike, d_model: int = 16, seed: int = 0) -> Path:
    """Write a tiny T5 encoder (random weights) and a tokenizer trained on a few sentences into
    ``out_dir``, in the ``from_pretrained`` layout,
    so tests exercise the real loading path offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(
        _TINY_CORPUS,
        trainers.UnigramTrainer(
            vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    fast.save_pretrained(str(out))
    config = T5Config(
        vocab_size=tok.get_vocab_size(),
        d_model=d_model,
        d_kv=4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        T5EncoderModel(config).save_pretrained(str(out))
    return out
