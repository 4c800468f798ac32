"""Render a prompt set with fixed seeds: the image sets that ``align eval`` scores and pairs.

Image ``j`` of every prompt starts from the initial noise of seed ``seed + j``, drawn on the CPU in
float32 per image (so it is the same on any device, in any dtype, in any batch composition), then
cast to the model dtype. Ancestral schedulers also get a per-image CPU generator with that seed.
Already rendered images are kept: re-running the same command renders only what is missing (images
are written atomically, so an interrupted run never leaves a truncated PNG behind). The layout is in
``align.eval.layout``.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from align.eval.layout import (
    META_FILE,
    PROMPTS_FILE,
    ImageSetError,
    image_name,
    prompt_difference,
    read_prompts_file,
    write_prompts_file,
)
from align.data.prompt_files import PromptSetError
from align.models import load_components
from align.models.export_dtype import EXPORT_DTYPES
from align.models.sampling import denoiser_of, generate, resolve_encoder

# name -> (diffusers class, default steps)
SCHEDULERS = {
    "unipc": ("UniPCMultistepScheduler", 25),
    "ddim": ("DDIMScheduler", 50),
    "dpm++": ("DPMSolverMultistepScheduler", 25),
    "euler": ("EulerDiscreteScheduler", 50),
    "euler-a": ("EulerAncestralDiscreteScheduler", 50),
    "pndm": ("PNDMScheduler", 50),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", 28),  # SD3 / FLUX.1's own sampler
}
# the pipelines' own defaults
DEFAULT_GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5}
# settings that change the pixels: a resumed run must match them
RENDER_KEYS = tuple(
    "checkpoint scheduler steps guidance_scale height width negative_prompt dtype encoder".split()
)


def resolve_checkpoint(config: SampleConfig) -> tuple[str, str | None, str | None]:
    """(model to load, LoRA dir to apply or None, prompt encoder or None) for ``config.checkpoint``.

    A LoRA-only export (``pytorch_lora_weights.safetensors``, no ``model_index.json``) is applied to
    ``--base`` or to the base model its ``align_export.json`` names; an export with a
    ``prompt_encoder.json`` (LongAlign SFT) samples with that encoder unless ``--encoder`` says
    otherwise.
    """
    ckpt = Path(config.checkpoint).expanduser()
    has = lambda name: (ckpt / name).exists()  # False unless ckpt is a folder
    lora = has("pytorch_lora_weights.safetensors") and not has("model_index.json")
    encoder = config.encoder
    if encoder is None and has("prompt_encoder.json"):
        encoder = str(ckpt)
    if not lora:
        return config.checkpoint, None, encoder
    base = config.base
    if base is None and has("align_export.json"):
        base = json.loads((ckpt / "align_export.json").read_text()).get("base_model")
    if base is None:
        raise ValueError(
            f"{ckpt} is a LoRA export without align_export.json: give --base <the model it "
            "was trained on>"
        )
    return base, str(ckpt), encoder


@dataclass
class SampleConfig:
    checkpoint: str
    scheduler: str | None = None  # default: unipc (SD1.5, SDXL), flow-euler (SD3, FLUX.1)
    steps: int | None = None  # default: the scheduler's (UniPC 25, DDIM 50, flow Euler 28, ...)
    # default: the pipeline's (SD1.5 7.5, SDXL 5.0, SD3 7.0, FLUX.1 3.5: its guidance embedding)
    guidance_scale: float | None = None
    images_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 8
    height: int | None = None  # default: the model's native resolution
    width: int | None = None
    negative_prompt: str = ""
    device: str = "auto"  # cuda when available
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU
    progress: bool = True
    # clip | segment | an export dir with prompt_encoder.json; None: auto (see below)
    encoder: str | None = None
    base: str | None = None  # the base model of a LoRA-only export (default: its align_export.json)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.images_per_prompt))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    # fp32, bf16, fp16 and torch's own names (float32, bfloat16, float16)
    table = {**EXPORT_DTYPES, **{str(d).removeprefix("torch."): d for d in EXPORT_DTYPES.values()}}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
    return table[dtype]


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, C, h, w) float32 standard-normal latents, image i from
    ``torch.Generator('cpu').manual_seed(seeds[i])``."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return randn_tensor((len(seeds), *shape), generators, torch.device("cpu"), torch.float32)


def pipeline_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The initial latents in the layout the pipeline takes: FLUX.1's packed 2 x 2 patches."""
    if type(pipe).__name__ != "FluxPipeline":
        return latents
    return type(pipe)._pack_latents(latents, *latents.shape)


def image_ok(path: Path) -> bool:
    """Whether ``path`` is a complete, decodable image (a kept image on resume)."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def _save_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.stem + ".partial.png")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def scheduler_name(config: SampleConfig, components) -> str:
    """The sampler: the configured one, else the family's default; flow models sample only with
    the flow sampler (the others integrate a DDPM schedule)."""
    name = config.scheduler or ("flow-euler" if components.is_flow else "unipc")
    if components.is_flow != (name == "flow-euler"):
        raise ValueError(
            f"scheduler {name!r} does not sample a {components.family} model; "
            + ("use flow-euler" if components.is_flow else "flow-euler is for SD3 / FLUX.1")
        )
    return name


def render_settings(config: SampleConfig, components, dtype: torch.dtype) -> dict:
    scheduler = scheduler_name(config, components)
    steps = config.steps or SCHEDULERS[scheduler][1]
    guidance = config.guidance_scale
    if guidance is None:
        guidance = DEFAULT_GUIDANCE[components.family]
    return {
        "checkpoint": config.checkpoint,
        "scheduler": scheduler,
        "steps": int(steps),
        "guidance_scale": float(guidance),
        "height": int(config.height or components.resolution),
        "width": int(config.width or components.resolution),
        "negative_prompt": config.negative_prompt,
        "dtype": str(dtype).removeprefix("torch."),
        "model_type": components.family,
    }


def _check_resume(out: Path, prompts: list[str]) -> dict:
    """Refuse to resume into a directory rendered from other prompts; return its metadata
    (or {})."""
    if (out / PROMPTS_FILE).is_file():
        diff = prompt_difference(
            read_prompts_file(out), prompts, name_a=f"{out}", name_b="this prompt set"
        )
        if diff:
            raise ImageSetError(f"cannot resume into {out}: {diff}\nchoose another --out")
    meta_path = out / META_FILE
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def pending_images(out: Path, num_prompts: int, seeds: list[int]) -> list[tuple[int, int]]:
    """(prompt_index, seed) of every image not yet rendered (or unreadable) in ``out``."""
    return [
        (i, s) for i in range(num_prompts) for s in seeds if not image_ok(out / image_name(i, s))
    ]


def sample_images(
    prompts: list[str],
    out_dir: str | Path,
    config: SampleConfig,
    components=None,
    prompt_source: str | None = None,
) -> dict:
    """Render ``len(prompts) * images_per_prompt`` images into ``out_dir``;
    returns counts and the settings.

    ``components``: an ``SDComponents`` to render with (default:
    ``load_components(config.checkpoint)``).
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise PromptSetError("the prompt set is empty")
    if config.images_per_prompt < 1:
        raise ValueError("images_per_prompt must be at least 1")
    if config.scheduler is not None and config.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {config.scheduler!r}; known: {', '.join(SCHEDULERS)}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    previous = _check_resume(out, prompts)
    todo = pending_images(out, len(prompts), config.seeds)
    kept = len(prompts) * len(config.seeds) - len(todo)
    if not todo and previous:
        return {"rendered": 0, "kept": kept, "total": kept, "settings": previous}

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model, lora, encoder = resolve_checkpoint(config)
    if components is None:
        components = load_components(model, torch_dtype=dtype if device.type == "cuda" else None)
    settings = {
        **render_settings(config, components, dtype),
        "encoder": encoder,
        "lora_base": model if lora else None,
    }
    changed = [k for k in RENDER_KEYS if k in previous and previous[k] != settings[k]]
    if changed and kept:
        detail = ", ".join(f"{k}: {previous[k]!r} -> {settings[k]!r}" for k in changed)
        raise ImageSetError(
            f"{out} holds {kept} images rendered with other settings ({detail}); "
            "choose another --out or render with the same settings"
        )
    seeds_all = sorted(set(previous.get("seeds", [])) | set(config.seeds))
    meta = {
        **settings,
        "seeds": seeds_all,
        "num_prompts": len(prompts),
        "prompt_source": prompt_source,
        "versions": {
            **{m.__name__: m.__version__ for m in (torch, diffusers, transformers)},
            "python": platform.python_version(),
        },
    }
    write_prompts_file(out, prompts)
    (out / META_FILE).write_text(json.dumps(meta, indent=2))

    # the sampler, built from the model's own (training) scheduler config
    scheduler = getattr(diffusers, SCHEDULERS[settings["scheduler"]][0])
    pipe = components.to_pipeline(
        scheduler=scheduler.from_config(components.noise_scheduler.config)
    )
    denoiser = denoiser_of(pipe)
    pipe = pipe.to(device) if denoiser.dtype == dtype else pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    if encoder is not None:
        encoder = resolve_encoder(encoder, pipe).to(device)
    steps, guidance = settings["steps"], settings["guidance_scale"]
    height, width = settings["height"], settings["width"]
    negative, scale = config.negative_prompt, components.vae_scale_factor
    latent_shape = (components.vae.config.latent_channels, height // scale, width // scale)
    bar = tqdm(
        total=len(todo), desc=f"sampling {out.name}", unit="img", disable=not config.progress
    )
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start : start + config.batch_size]
        seeds = [s for _, s in batch]
        texts = [prompts[i] for i, _ in batch]
        noise = pipeline_latents(pipe, initial_latents(seeds, latent_shape)).to(device, dtype)
        with torch.inference_mode():  # generate: the prompts' embeddings, a CPU generator per seed
            images = generate(
                pipe, texts, encoder, steps, guidance, seeds, negative, height, width, latents=noise
            )
        for (i, s), image in zip(batch, images):
            _save_atomic(image, out / image_name(i, s))
        bar.update(len(batch))
    bar.close()
    return {"rendered": len(todo), "kept": kept, "total": kept + len(todo), "settings": meta}
