"""A real CLIP tokenizer, built offline.

Stable Diffusion's tokenizer is OpenAI's CLIP BPE (49408 ids, 49406 = <|startoftext|>, 49407 =
<|endoftext|>, 77 positions). open_clip_torch ships that exact vocabulary as
``bpe_simple_vocab_16e6.txt.gz``; we turn it into the ``vocab.json`` + ``merges.txt`` layout that
``transformers.CLIPTokenizer`` reads, then load it through the ordinary ``from_pretrained`` path.
Ids are identical to ``openai/clip-vit-large-patch14``'s tokenizer.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
MAX_LENGTH = 77


def write_clip_tokenizer_files(out_dir: str | os.PathLike, pad_token: str = EOT_TOKEN) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of SD's CLIP tokenizer into
    ``out_dir``.

    ``pad_token``: SD1.5 and SDXL's first tokenizer pad with <|endoftext|>;
    SDXL's second pads with "!".
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # open_clip's BPE file, first line (the version) and lines past CLIP's 49152 - 256 - 2 dropped
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = (
        units
        + [u + "</w>" for u in units]
        + ["".join(m.split()) for m in merges]
        + [SOT_TOKEN, EOT_TOKEN]
    )
    (out / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": SOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return out


def tokenize(tokenizer, captions: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids (B, max_length), padded and truncated as SD's pipelines do."""
    return tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=max_length or tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def _cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def build_clip_tokenizer(pad_token: str = EOT_TOKEN):
    """Load SD's CLIP tokenizer, writing its files to the align cache the first time
    (no network needed)."""
    from transformers import CLIPTokenizer

    name = "clip-tokenizer" if pad_token == EOT_TOKEN else "clip-tokenizer-pad-bang"
    path = _cache_root() / name
    if not (path / "merges.txt").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        write_clip_tokenizer_files(tmp, pad_token=pad_token)
        os.replace(tmp, path) if not path.exists() else None
    return CLIPTokenizer.from_pretrained(str(path))


def build_t5_tokenizer():
    """A character-level T5 tokenizer for the SD3/FLUX presets, built offline.

    The real T5 vocabulary (32,128 sentencepiece ids) cannot be downloaded here; the presets' T5
    encoders have random weights anyway, so any tokenizer of the same class serves. Every printable
    character is a piece (with and without the word-start marker), so no caption maps to <unk>.
    """
    import string

    from transformers import T5Tokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)
