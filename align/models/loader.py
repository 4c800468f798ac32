"""One way to get a model's components (SD1.5, SDXL, SD3/SD3.5, FLUX.1): a local diffusers
directory, a hub id, or a named preset.

Real weights and presets go through the same ``SDComponents`` so that nothing downstream branches on
where a model came from. Loading never runs remote code and reads safetensors
(diffusers/transformers default).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from align.models.presets import FLOW_FAMILIES, PRESETS, get_preset
from align.models.tokenizer import EOT_TOKEN, build_clip_tokenizer, build_t5_tokenizer

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not a local path: a Hugging Face Hub repository id."""
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        return False
    return bool(_HUB_ID.match(source))


class ModelSourceError(ValueError):
    """The model source names nothing loadable; raised before any compute."""


_PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
_FAMILY_NAMES = "SD1.5, SDXL, SD3/SD3.5, FLUX.1"


@dataclass
class SDComponents:
    """The parts of a diffusion model (SD1.5, SDXL, SD3/SD3.5 or FLUX.1), as the modules and
    pipelines consume them.

    ``unet`` is the denoiser: the UNet of SD1.5/SDXL, the MMDiT or FLUX transformer of the flow
    families. ``text_encoders`` / ``tokenizers`` in the pipeline's order (SD3: CLIP-L, CLIP-G, T5;
    FLUX: CLIP-L, T5).
    """

    unet: nn.Module
    vae: nn.Module
    # the training-time forward process: DDPMScheduler (UNets) or FlowMatchEulerDiscreteScheduler
    noise_scheduler: object
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    source: str = ""
    # the base's own sampler (PNDM for SD1.5, Euler for SDXL, flow Euler): exports ship it
    inference_scheduler: object = None
    revision: str | None = None
    extras: tuple[str, ...] = ()  # the base's safety_checker / feature_extractor: exports keep them
    family: str = "sd15"  # one of presets.FAMILIES
    native_resolution: int | None = None  # presets say; else from the denoiser's config

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def is_flow(self) -> bool:
        return self.family in FLOW_FAMILIES

    @property
    def denoiser_name(self) -> str:
        """The pipeline's name for the denoiser (its folder, its LoRA keys' prefix)."""
        return "transformer" if self.is_flow else "unet"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        if self.native_resolution:
            return self.native_resolution
        # FLUX's transformer has no sample size: its pipeline's default is 128 latent pixels
        return (getattr(self.unet.config, "sample_size", None) or 128) * self.vae_scale_factor

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, _PIPELINES[self.family])

    def to_pipeline(self, unet: nn.Module | None = None, scheduler=None):
        """A diffusers pipeline of the model's family over these components (``unet`` overrides
        the denoiser)."""
        denoiser = unet if unet is not None else self.unet
        kwargs = dict(vae=self.vae, scheduler=scheduler or self.noise_scheduler)
        for n, encoder, tokenizer in zip(("", "_2", "_3"), self.text_encoders, self.tokenizers):
            kwargs[f"text_encoder{n}"], kwargs[f"tokenizer{n}"] = encoder, tokenizer
        kwargs[self.denoiser_name] = denoiser
        if self.family == "sd15":
            kwargs.update(
                safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        return self.pipeline_class()(**kwargs)

    def sampler(self):
        """A fresh copy of the base's own sampler on the training schedule (betas and prediction
        type come from the noise scheduler, which may have been changed); the noise scheduler
        without one."""
        own = self.inference_scheduler or self.noise_scheduler
        return type(own).from_config({**own.config, **self.noise_scheduler.config})

    def save_pretrained(self, out_dir: str | os.PathLike, unet: nn.Module | None = None) -> Path:
        """Write a diffusers-format pipeline directory that ``from_pretrained`` loads as-is and
        samples with the base's own scheduler; the base's safety checker and feature extractor are
        kept."""
        pipe = self.to_pipeline(unet=unet, scheduler=self.sampler())
        if self.extras:
            from diffusers.pipelines.stable_diffusion.safety_checker import (
                StableDiffusionSafetyChecker,
            )
            from transformers import CLIPImageProcessor

            where = _where(self.source, "model")
            pipe.register_modules(
                safety_checker=StableDiffusionSafetyChecker.from_pretrained(
                    where, subfolder="safety_checker", revision=self.revision
                ),
                feature_extractor=CLIPImageProcessor.from_pretrained(
                    where, subfolder="feature_extractor", revision=self.revision
                ),
            )
            pipe.register_to_config(requires_safety_checker=True)
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
        return Path(out_dir)


def point_posterior(vae: nn.Module) -> None:
    """Make a random VAE's posterior nearly a point, as a trained VAE's is: its log-variance
    channels output -20 (std 5e-5). A random posterior has std ~1 against image latents of std
    ~0.2, so every encoded image would be mostly the VAE's own noise and nothing could be learnt
    from it."""
    weight, bias = vae.quant_conv.weight, vae.quant_conv.bias
    half = weight.shape[0] // 2  # rows [mean; logvar]
    with torch.no_grad():
        weight[half:].zero_()
        bias[half:].fill_(-20.0)


def build_preset(name: str, seed: int = 0) -> SDComponents:
    """Build a preset with random weights; ``seed`` makes them identical on every rank and every
    run."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = get_preset(name)
    family = preset.family
    denoiser_cls = {
        "sd3": diffusers.SD3Transformer2DModel,
        "flux": diffusers.FluxTransformer2DModel,
    }.get(family, diffusers.UNet2DConditionModel)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser = denoiser_cls(**preset.denoiser)
        vae = diffusers.AutoencoderKL(**preset.vae)
        if name.startswith("tiny"):
            point_posterior(vae)
        text_encoders, tokenizers = [], []
        for i, cfg in enumerate(preset.text_encoders):
            config = CLIPTextConfig(
                vocab_size=49408,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=1,
                **cfg,
            )
            # SDXL's second and both of SD3's CLIPs hand over their projection (pooled output)
            projected = family == "sd3" or (family == "sdxl" and i == 1)
            cls = CLIPTextModelWithProjection if projected else CLIPTextModel
            text_encoders.append(cls(config))
            pad = "!" if family in ("sdxl", "sd3") and i == 1 else EOT_TOKEN
            tokenizers.append(build_clip_tokenizer(pad_token=pad))
        if preset.t5 is not None:
            from transformers import T5Config, T5EncoderModel

            tokenizers.append(build_t5_tokenizer())
            t5 = {"vocab_size": len(tokenizers[-1]), **preset.t5}
            text_encoders.append(T5EncoderModel(T5Config(**t5, pad_token_id=0, eos_token_id=1)))
    if family in FLOW_FAMILIES:
        noise = diffusers.FlowMatchEulerDiscreteScheduler(**preset.scheduler)
        sampler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(noise.config)
    else:
        noise = diffusers.DDPMScheduler(**preset.scheduler)
        # the SD1.5 / SDXL bases' samplers, as their scheduler configs set them
        sampler = (
            diffusers.EulerDiscreteScheduler.from_config(noise.config)
            if family == "sdxl"
            else diffusers.PNDMScheduler.from_config(
                noise.config, skip_prk_steps=True, set_alpha_to_one=False
            )
        )
    for module in (denoiser, vae, *text_encoders):  # as from_pretrained hands them over
        module.eval()
    return SDComponents(
        unet=denoiser,
        vae=vae,
        noise_scheduler=noise,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        source=f"preset:{name}",
        inference_scheduler=sampler,
        family=family,
        native_resolution=preset.resolution,
    )


def model_family(index: dict, source: str) -> str:
    """The family of a pipeline from its ``model_index.json``: its ``_class_name`` starts as the
    family's pipeline class does (the longest first: StableDiffusionXL before StableDiffusion)."""
    name = str(index.get("_class_name", ""))
    for family, pipeline in sorted(_PIPELINES.items(), key=lambda item: -len(item[1])):
        if name.startswith(pipeline.removesuffix("Pipeline")):
            return family
    raise ModelSourceError(
        f"model {source!r} is a {name or 'pipeline of unknown class'}; align trains the "
        f"{_FAMILY_NAMES} families (StableDiffusion[XL|3]Pipeline or FluxPipeline layouts)"
    )


def _load_part(where: str, name: str, index: dict, weights: dict):
    """One component as model_index.json names it (library, class); tokenizers through
    AutoTokenizer, which reads whichever tokenizer files the folder holds."""
    import importlib

    library, cls_name = index[name]
    if name.startswith("tokenizer"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(where, subfolder=name, revision=weights["revision"])
    cls = getattr(importlib.import_module(library), cls_name)
    return cls.from_pretrained(where, subfolder=name, **weights)


def load_pretrained(
    source: str,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
) -> SDComponents:
    """Load every component from a local diffusers directory or a hub id (an SD1.5, SDXL, SD3 or
    FLUX.1 layout); ``variant`` (e.g. ``fp16``) and ``revision`` pass through to
    ``from_pretrained``."""
    import diffusers
    from diffusers import DDPMScheduler, DiffusionPipeline

    where = _where(source, "model")
    try:
        index = DiffusionPipeline.load_config(where, revision=revision)
    # offline, gated, misspelt: say which model and why, before any compute
    except Exception as err:
        raise ModelSourceError(
            f"could not read model_index.json of model {source!r}: {err}{_offline_hint(source)}"
        ) from err
    family = model_family(index, source)
    weights = dict(
        revision=revision,
        variant=variant,
        **({"torch_dtype": torch_dtype} if torch_dtype is not None else {}),
    )
    encoders = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if index.get(n)]
    denoiser_name = "transformer" if family in FLOW_FAMILIES else "unet"
    try:
        text_encoders = [_load_part(where, n, index, weights) for n in encoders]
        tokenizers = [
            _load_part(where, n.replace("text_encoder", "tokenizer"), index, weights)
            for n in encoders
        ]
        denoiser = _load_part(where, denoiser_name, index, weights)
        vae = _load_part(where, "vae", index, weights)
    except (OSError, ValueError, KeyError, TypeError) as err:
        what = f" variant {variant!r}" if variant else ""
        raise ModelSourceError(
            f"could not load the weights{what} of model {source!r}: {err}"
        ) from err
    # the base's own sampler class (model_index) from its scheduler config
    default = "FlowMatchEulerDiscreteScheduler" if family in FLOW_FAMILIES else "DDPMScheduler"
    sampler_cls = getattr(diffusers, (index.get("scheduler") or [None, default])[1])
    config = DDPMScheduler.load_config(where, subfolder="scheduler", revision=revision)
    # training's forward process from the same file: DDPM for the UNets, the flow itself else
    noise_cls = sampler_cls if family in FLOW_FAMILIES else DDPMScheduler
    extras = tuple(
        k
        for k in ("safety_checker", "feature_extractor")
        if (index.get(k) or [None, None])[1] is not None
    )
    return SDComponents(
        unet=denoiser,
        vae=vae,
        noise_scheduler=noise_cls.from_config(config),
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        source=source,
        inference_scheduler=sampler_cls.from_config(config),
        revision=revision,
        extras=extras if len(extras) == 2 and family == "sd15" else (),
        family=family,
    )


def _where(source: str, what: str) -> str:
    local = Path(source).expanduser()
    if not local.is_dir() and not is_hub_id(source):
        known = f"; known presets: {', '.join(sorted(PRESETS))}" if what == "model" else ""
        raise ModelSourceError(
            f"{what} {source!r}: no such directory, and not a hub id (org/name){known}"
        )
    return str(local) if local.is_dir() else source


def _offline_hint(source: str) -> str:
    if Path(source).expanduser().is_dir():
        return ""
    return (
        f"; a hub id is read from the Hugging Face cache or fetched from the Hub: without network, "
        f"download it where there is one (`hf download {source}`) and pass its local directory"
    )


def load_vae(source: str, unet: nn.Module, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """Another VAE for the model (e.g. ``madebyollin/sdxl-vae-fp16-fix``): a VAE directory or hub
    id, or a pipeline's ``vae`` subfolder. Its latent channels must be the denoiser's."""
    from diffusers import AutoencoderKL

    where = _where(source, "vae")
    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    errors = []
    for sub in (None, "vae"):
        try:
            vae = AutoencoderKL.from_pretrained(where, **({"subfolder": sub} if sub else {}), **kw)
            break
        except (OSError, ValueError) as err:
            errors.append(err)
    else:
        raise ModelSourceError(
            f"could not load vae {source!r}: {errors[-1]}{_offline_hint(source)}"
        )
    # FLUX packs 2 x 2 latent pixels into one token: 4 channels per latent channel
    takes = unet.config.in_channels // (4 if type(unet).__name__.startswith("Flux") else 1)
    if vae.config.latent_channels != takes:
        raise ModelSourceError(
            f"vae {source!r} has {vae.config.latent_channels} latent channels, the denoiser "
            f"takes {takes}: not a VAE of this model family"
        )
    return vae


def load_components(
    source: str,
    seed: int = 0,
    torch_dtype: torch.dtype | None = None,
    vae: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
) -> SDComponents:
    """Components from a preset name (``align.models.PRESETS``), a local diffusers directory or a
    hub id. Presets win over directories of the same name only when no such
    directory exists. ``vae`` replaces the model's VAE (``load_vae``)."""
    if source in PRESETS and not Path(source).is_dir():
        parts = build_preset(source, seed=seed)
    else:
        parts = load_pretrained(source, torch_dtype=torch_dtype, variant=variant, revision=revision)
    if vae is not None:
        parts.vae = load_vae(vae, parts.unet, torch_dtype=torch_dtype)
    return parts
