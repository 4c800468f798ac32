"""Sampling with any prompt encoder, long prompts included, through a stock diffusers pipeline.

diffusers' StableDiffusionPipeline tokenizes prompts itself and cuts them at CLIP's 77 tokens; it
only takes longer conditioning as ``prompt_embeds``. ``generate`` encodes prompts *and* the negative
prompt with the same encoder (so conditional and unconditional embeddings have the same number of
rows, as classifier-free guidance needs) and passes them as ``prompt_embeds`` /
``negative_prompt_embeds``.

Export layout of a model trained with a non-default prompt encoder (``save_prompt_encoder``), next
to the diffusers export (a pipeline directory, or the LoRA file
``pytorch_lora_weights.safetensors``)::

    <export>/prompt_encoder.json   {"kind": "segment",
                                    "args": {"max_rows": 240, "splitter": "official",
                                             "t5": {"source": ..., "max_length": 240,
                                                    "use_attention_mask": false,
                                                    "adapter": "text_adapter"} | null}}
    <export>/text_adapter/         the trained T5 adapter (TextAdapter.save_pretrained: config.json
                                   + diffusion_pytorch_model.safetensors); only with the T5 branch

The T5 encoder itself is frozen and not exported: ``t5.source`` names where it was loaded from (a
hub id such as ``google-t5/t5-large`` or a local directory). Use::

    # or from_pretrained(<export>) after full FT
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(export)  # LoRA runs
    images = generate(pipe, prompts, encoder=export, steps=25, guidance=7.5, seed=0)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from align.models.loader import model_family
from align.models.prompts import build_prompt_encoder

log = logging.getLogger(__name__)

SPEC_FILE = "prompt_encoder.json"
ADAPTER_DIR = "text_adapter"


def denoiser_of(pipeline) -> nn.Module:
    """A pipeline's UNet (SD1.5, SDXL) or transformer (SD3, FLUX.1)."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else pipeline.transformer


def _parts(pipeline) -> SimpleNamespace:
    """What ``build_prompt_encoder`` needs, from a pipeline or an ``SDComponents``."""
    if hasattr(pipeline, "text_encoders"):  # SDComponents
        return pipeline
    names = ("", "_2", "_3")
    present = [n for n in names if getattr(pipeline, f"text_encoder{n}", None) is not None]
    return SimpleNamespace(
        text_encoders=[getattr(pipeline, f"text_encoder{n}") for n in present],
        tokenizers=[getattr(pipeline, f"tokenizer{n}") for n in present],
        family=model_family({"_class_name": type(pipeline).__name__}, type(pipeline).__name__),
    )


def save_prompt_encoder(
    encoder: nn.Module, out_dir: str | os.PathLike, kind: str, args: dict | None = None
) -> Path:
    """Write ``prompt_encoder.json`` (and the T5 adapter, if any) into ``out_dir``;
    returns the spec file.

    ``kind`` / ``args``: how the encoder was built (``build_prompt_encoder``); the spec records what
    a sampler needs to rebuild it: ``max_rows``, the splitter's name and the T5 branch's source and
    settings.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = dict(args or {})
    spec: dict = {"kind": kind, "args": {}}
    if kind == "segment":
        splitter = args.get("splitter", "official")
        if not isinstance(splitter, str):
            log.warning(
                "the segment encoder's splitter is a callable: the export records the "
                "default splitter"
            )
            splitter = "official"
        t5 = getattr(encoder, "t5", None)
        t5_spec = None
        if t5 is not None:
            t5.adapter.save_pretrained(str(out / ADAPTER_DIR), safe_serialization=True)
            t5_spec = {
                "source": str(t5.encoder.config._name_or_path),
                "max_length": t5.max_length,
                "use_attention_mask": t5.use_attention_mask,
                "adapter": ADAPTER_DIR,
            }
        spec["args"] = {"max_rows": encoder.max_rows, "splitter": splitter, "t5": t5_spec}
    path = out / SPEC_FILE
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def read_prompt_encoder_spec(export_dir: str | os.PathLike) -> tuple[str, dict] | None:
    """(kind, args) of ``<export>/prompt_encoder.json`` (the T5 adapter's path made absolute),
    or None without one."""
    export = Path(export_dir)
    if not (export / SPEC_FILE).is_file():
        return None
    spec = json.loads((export / SPEC_FILE).read_text())
    args = dict(spec.get("args") or {})
    if args.get("t5"):
        args["t5"] = {**args["t5"], "adapter": str(export / args["t5"]["adapter"])}
    return spec["kind"], args


def load_prompt_encoder(export_dir: str | os.PathLike, pipeline) -> nn.Module:
    """The prompt encoder an export was trained with, on ``pipeline``'s text encoder (and device).

    The T5 adapter is read from ``<export>/text_adapter``; the frozen T5 from the recorded source.
    """
    export = Path(export_dir)
    spec = read_prompt_encoder_spec(export)
    if spec is None:
        raise FileNotFoundError(
            f"{export / SPEC_FILE} not found: {export} was not exported with a prompt encoder spec"
        )
    parts = _parts(pipeline)
    encoder = build_prompt_encoder(parts, spec[0], **spec[1])
    return encoder.to(next(parts.text_encoders[0].parameters()).device).eval()


def resolve_encoder(encoder, pipeline) -> nn.Module | None:
    """None (the pipeline's own text handling), ``clip``/``segment``, an export directory,
    or a module."""
    if encoder is None or callable(encoder):  # a module or another callable
        return encoder
    if encoder in ("clip", "segment"):
        return build_prompt_encoder(_parts(pipeline), encoder)
    return load_prompt_encoder(encoder, pipeline)


def text_arguments(
    encoder, prompts: list[str], negative_prompt: str = "", device=None, dtype=None
) -> dict:
    """The text part of a diffusers pipeline call: the prompts for the pipeline to encode
    (``encoder`` None; an empty negative prompt left to the pipeline, which zeroes it for SDXL), or
    cond and uncond embeddings both from ``encoder`` (long prompts)."""
    if encoder is None:
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        return {"prompt": list(prompts), "negative_prompt": negative}
    with torch.no_grad():
        cond, uncond = encoder(list(prompts)), encoder([negative_prompt] * len(prompts))
    kwargs = {
        "prompt_embeds": cond.embeds.to(device, dtype),
        "negative_prompt_embeds": uncond.embeds.to(device, dtype),
    }
    if cond.pooled is not None:  # SDXL, SD3, FLUX.1
        kwargs["pooled_prompt_embeds"] = cond.pooled.to(device, dtype)
        kwargs["negative_pooled_prompt_embeds"] = uncond.pooled.to(device, dtype)
    return kwargs


def generate(
    pipeline,
    prompts: str | list[str],
    encoder=None,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int | list[int] = 0,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    **pipeline_kwargs,
):
    """Images for ``prompts`` (a list, as ``output_type`` gives them) from a diffusers pipeline.

    Args:
        pipeline: a StableDiffusion(XL)Pipeline, or ``SDComponents``
            (made into one with a copy of its scheduler).
        encoder: see ``resolve_encoder``; None lets the pipeline encode (CLIP, cut at 77 tokens).
        seed: image i starts from the noise of ``torch.Generator('cpu').manual_seed(seed)`` (or
            ``seed[i]``): the same on every device, and the same for every prompt when one seed is
            given.
    """
    if hasattr(pipeline, "to_pipeline"):  # SDComponents: sample with a copy of its sampler
        pipeline = pipeline.to_pipeline(scheduler=pipeline.sampler())  # what an export samples with
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    param = next(denoiser_of(pipeline).parameters())
    text = text_arguments(
        resolve_encoder(encoder, pipeline), prompts, negative_prompt, param.device, param.dtype
    )
    return pipeline(
        **text,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        height=height,
        width=width,
        output_type=output_type,
        **pipeline_kwargs,
    ).images


@torch.no_grad()
def policy_images(
    module,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    context=None,
    unet=None,
    scheduler=None,
    **kwargs,
):
    """PIL images of a training module's current weights (or ``unet``) and prompt encoder, in eval
    mode (adapter dropout off) and in ``context`` (the trainer's precision); its RNG streams are
    untouched (each image's noise comes from its own seed). ``scheduler``: default, what an export
    samples with."""
    was_training = module.training
    module.eval()
    try:
        unet = unet if unet is not None else getattr(module.unet, "_orig_mod", module.unet)
        scheduler = scheduler or module.components.sampler()
        pipe = module.components.to_pipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with context if context is not None else contextlib.nullcontext():
            encoder = module.prompt_encoder
            return generate(pipe, prompts, encoder, steps, guidance, seeds, **kwargs)
    finally:
        module.train(was_training)
