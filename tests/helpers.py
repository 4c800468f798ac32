"""Fabricators of raw samples in the real shard schemas, shared by the tests
(importable: pythonpath=tests)."""

from __future__ import annotations

import io
import json


def jpeg(color=(200, 30, 30), size=(40, 32)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def pair_sample(
    key: str, caption="a red square", label_0=1.0, label_1=None, first=None, second=None, **extra
) -> dict:
    """A raw webdataset sample in the Pick-a-Pic pair schema."""
    meta = {
        "caption": caption,
        "label_0": label_0,
        "label_1": 1.0 - label_0 if label_1 is None else label_1,
        **extra,
    }
    return {
        "__key__": key,
        "jpg_0.jpg": first if first is not None else jpeg((200, 30, 30)),
        "jpg_1.jpg": second if second is not None else jpeg((30, 30, 200)),
        "json": json.dumps(meta).encode(),
    }


def write_tar(path, samples) -> str:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def single_sample(key: str, caption="a red square", label=True, image=None, **extra) -> dict:
    """A raw webdataset sample in the single-image (KTO) schema; ``label`` is written as given."""
    meta = {"caption": caption, "label": label, "image_uid": f"uid-{key}", **extra}
    return {
        "__key__": key,
        "jpg": image if image is not None else jpeg(),
        "json": json.dumps(meta).encode(),
    }


def perturb_lora(module, seed=0):
    """peft starts lora_B at zero (so lora_A gets no gradient):
    move every LoRA weight off its init."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def run_cache(*args) -> int:
    """``align data cache-latents`` in-process, one torch thread, no progress bar;
    the caller's thread count kept."""
    import torch

    from align.data.commands.cache_latents import main as cache_main

    threads = torch.get_num_threads()
    try:
        return cache_main([*map(str, args), "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def online_config_files(root, prompts) -> None:
    """What the GRPO and online tiny configs read relative to the working directory: the prompt
    set and the reward monitor's tiny CLIP (make train-grpo writes them in a checkout)."""
    from align.rewards.tiny import write_tiny_hf_clip

    (root / "configs/eval").mkdir(parents=True, exist_ok=True)
    (root / "configs/eval/prompts-tiny.txt").write_text("\n".join(prompts) + "\n")
    write_tiny_hf_clip(root / "artifacts/tiny-rewards/clip", seed=13)
