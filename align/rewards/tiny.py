"""Tiny random reward models, written in the real on-disk layouts and loaded through the real
loaders.

Nothing can be downloaded here, so tests and the embedded default (``make eval``) score with these:
the same classes as the published models (transformers CLIPModel, open_clip CLIP, timm ViT +
BlipTextModel), the same file names and formats, 224-px inputs (so preprocessing is the real one), a
few hidden units. Their scores mean nothing; the code paths are the real ones.

    align data tiny-rewards OUT_DIR      # writes OUT_DIR/{pickscore,hps,clip,aesthetic,imagereward}

``build_reward(name, source=OUT_DIR/name)`` then loads each (``align eval --reward-root OUT_DIR``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from align.extras import require
from align.models.tokenizer import build_clip_tokenizer
from align.rewards.aesthetic import AestheticMLP
from align.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from align.rewards.image_reward import blip_text_config, blip_vit, load_blip_tokenizer
from align.rewards.sources import MANIFEST

TINY_NAMES = ("pickscore", "hps", "clip", "aesthetic", "imagereward")
PROJECTION_DIM = 16
WIDTH = 32

# the layout of openai/clip-vit-large-patch14's (and laion CLIP-ViT-H-14's) preprocessor_config.json
_CLIP_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "resample": 3,
    "size": 224,
}
TINY_OPEN_CLIP = {
    "embed_dim": PROJECTION_DIM,
    "vision_cfg": dict(image_size=224, layers=2, width=WIDTH, head_width=16, patch_size=32),
    "text_cfg": dict(context_length=77, vocab_size=49408, width=WIDTH, heads=2, layers=2),
}


def _write_manifest(folder: Path, options: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps({"options": options}, indent=2))


def write_tiny_hf_clip(out: str | Path, seed: int = 0) -> Path:
    """A tiny transformers CLIPModel (224-px vision tower) with SD's CLIP tokenizer and the CLIP
    processor config."""
    from transformers import CLIPConfig, CLIPModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tower = dict(
        hidden_size=WIDTH,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        hidden_act="quick_gelu",
    )
    text = dict(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407
    )
    config = CLIPConfig(
        text_config=dict(**text, pad_token_id=1, **tower),
        vision_config=dict(image_size=224, patch_size=32, **tower),
        projection_dim=PROJECTION_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(out, safe_serialization=True)
    build_clip_tokenizer().save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(_CLIP_PREPROCESSOR, indent=2))
    return out


def write_tiny_hps(out: str | Path, seed: int = 0) -> Path:
    """A tiny open_clip CLIP saved as HPS does (``{"state_dict": ...}`` in
    ``HPS_v2.1_compressed.pt``), with its architecture in ``open_clip_config.json``."""
    import open_clip

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_OPEN_CLIP)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, out / "HPS_v2.1_compressed.pt")
    preprocess = {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}
    config = {"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": preprocess}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return out


def _random_linear_head(input_size: int, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticMLP(input_size)
        # unit-scale activations, scores around 5 like the real predictor's
        for layer in head.layers:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                torch.nn.init.normal_(layer.bias, std=0.1)
        head.layers[-1].bias.data += 5.0
    return head


def write_tiny_aesthetic(out: str | Path, seed: int = 0) -> Path:
    """The predictor head as ``sac+logos+ava1-l14-linearMSE.pth``
    (a plain state dict) and a tiny CLIP beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        _random_linear_head(PROJECTION_DIM, seed).state_dict(),
        out / "sac+logos+ava1-l14-linearMSE.pth",
    )
    write_tiny_hf_clip(out / "clip", seed=seed + 1)
    _write_manifest(out, {"clip": "clip"})
    return out


def write_tiny_bert_tokenizer(out: str | Path) -> Path:
    """A WordPiece vocabulary in bert-base-uncased's layout (``vocab.txt``),
    a few hundred entries."""
    from transformers import BertTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    words = (
        "a an the of in on with and at to photo painting picture image portrait cat dog horse bird "
        "car house tree city street mountain river sea sky red blue green yellow black white small "
        "big old young man woman child astronaut riding sitting standing under over night "
        "day sunset forest"
    ).split()
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + chars
        + ["##" + c for c in string.ascii_lowercase]
        + words
    )
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer(str(out / "vocab.txt"), do_lower_case=True).save_pretrained(out)
    return out


def write_tiny_image_reward(out: str | Path, seed: int = 0) -> Path:
    """ImageReward's layout: ``ImageReward.pt`` (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
    ``blip.vision_proj``, ``blip.text_proj``, ``mlp.layers.*``) and ``med_config.json``; a tiny BERT
    tokenizer."""
    from transformers import BlipTextModel

    timm_vit = require("timm.models.vision_transformer", "rewards", "the tiny ImageReward's ViT")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_bert_tokenizer(out / "tokenizer")
    vocab_size = len(load_blip_tokenizer(str(out / "tokenizer")))
    med_config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": WIDTH,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": WIDTH,
        "add_cross_attention": True,
    }
    (out / "med_config.json").write_text(json.dumps(med_config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = blip_vit(timm_vit, img_size=224, patch_size=32, embed_dim=WIDTH, depth=2, num_heads=2)
        text = BlipTextModel(blip_text_config(med_config, WIDTH), add_pooling_layer=False)
        vision_proj, text_proj = torch.nn.Linear(WIDTH, 16), torch.nn.Linear(WIDTH, 16)
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    # med.py registers position_ids as a persistent buffer, so the released checkpoint carries it
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).expand(1, -1).clone()
    state.update({f"blip.vision_proj.{k}": v for k, v in vision_proj.state_dict().items()})
    state.update({f"blip.text_proj.{k}": v for k, v in text_proj.state_dict().items()})
    state.update(
        {f"mlp.{k}": v for k, v in _random_linear_head(WIDTH, seed + 1).state_dict().items()}
    )
    torch.save(state, out / "ImageReward.pt")
    _write_manifest(out, {"tokenizer": "tokenizer", "vit_num_heads": 2})
    return out


_WRITERS = {
    "pickscore": write_tiny_hf_clip,
    "clip": write_tiny_hf_clip,
    "hps": write_tiny_hps,
    "aesthetic": write_tiny_aesthetic,
    "imagereward": write_tiny_image_reward,
}
# clip 13: positive scores
_SEEDS = {"pickscore": 11, "clip": 13, "hps": 21, "aesthetic": 14, "imagereward": 15}


def write_tiny_rewards(root: str | Path, names=TINY_NAMES) -> dict[str, Path]:
    """Write every named tiny reward under ``root/<name>`` (skipping those already written)."""
    root = Path(root)
    out = {}
    for name in names:
        folder = root / name
        done = folder / ".complete"
        if not done.exists():
            _WRITERS[name](folder, seed=_SEEDS[name])
            done.write_text("ok\n")
        out[name] = folder
    return out
