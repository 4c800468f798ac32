"""One way to get Stable Diffusion components: a local diffusers directory, a hub id,
or a named preset.

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

from align.models.presets import PRESETS, get_preset
from align.models.tokenizer import EOT_TOKEN, build_clip_tokenizer

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not a local path: a Hugging Face Hub repository id."""
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        return False
    return bool(_HUB_ID.match(source))


class ModelSourceError(ValueError):
    """The model source names nothing loadable; raised before any compute."""


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion (1.5 or XL) model,
    as the modules and pipelines consume them."""

    unet: nn.Module
    vae: nn.Module
    noise_scheduler: object  # a DDPMScheduler: the training-time forward process
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    source: str = ""
    # the base's own sampler (PNDM for SD1.5, Euler for SDXL): exports ship it
    inference_scheduler: object = None
    revision: str | None = None
    extras: tuple[str, ...] = ()  # the base's safety_checker / feature_extractor: exports keep them

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def to_pipeline(self, unet: nn.Module | None = None, scheduler=None):
        """A diffusers StableDiffusion(XL)Pipeline over these components
        (``unet`` overrides the policy)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        kwargs = dict(
            vae=self.vae,
            unet=unet if unet is not None else self.unet,
            scheduler=scheduler or self.noise_scheduler,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
        )
        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                text_encoder_2=self.text_encoders[1], tokenizer_2=self.tokenizers[1], **kwargs
            )
        return StableDiffusionPipeline(
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs
        )

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
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = get_preset(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**preset.unet)
        vae = AutoencoderKL(**preset.vae)
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
            cls = CLIPTextModelWithProjection if (preset.is_sdxl and i == 1) else CLIPTextModel
            text_encoders.append(cls(config))
            tokenizers.append(
                build_clip_tokenizer(pad_token="!" if (preset.is_sdxl and i == 1) else EOT_TOKEN)
            )
    noise = DDPMScheduler(**preset.scheduler)
    # the SD1.5 / SDXL bases' samplers, as their scheduler configs set them
    sampler = (
        EulerDiscreteScheduler.from_config(noise.config)
        if preset.is_sdxl
        else PNDMScheduler.from_config(noise.config, skip_prk_steps=True, set_alpha_to_one=False)
    )
    return SDComponents(
        unet=unet,
        vae=vae,
        noise_scheduler=noise,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        source=f"preset:{name}",
        inference_scheduler=sampler,
    )


def load_pretrained(
    source: str,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
) -> SDComponents:
    """Load every component from a local diffusers directory or a hub id (SD1.5- or SDXL-layout);
    ``variant`` (e.g. ``fp16``) and ``revision`` pass through to ``from_pretrained``."""
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    where = _where(source, "model")
    try:
        index = DiffusionPipeline.load_config(where, revision=revision)
    # offline, gated, misspelt: say which model and why, before any compute
    except Exception as err:
        raise ModelSourceError(
            f"could not read model_index.json of model {source!r}: {err}{_offline_hint(source)}"
        ) from err
    weights = dict(
        revision=revision,
        variant=variant,
        **({"torch_dtype": torch_dtype} if torch_dtype is not None else {}),
    )
    try:
        text_encoders = [CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **weights)]
        tokenizers = [
            CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", revision=revision)
        ]
        if "text_encoder_2" in index:
            text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    where, subfolder="text_encoder_2", **weights
                )
            )
            tokenizers.append(
                CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2", revision=revision)
            )
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", **weights)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", **weights)
    except (OSError, ValueError) as err:
        what = f" variant {variant!r}" if variant else ""
        raise ModelSourceError(
            f"could not load the weights{what} of model {source!r}: {err}"
        ) from err
    # the base's own sampler class (model_index) from its scheduler config;
    # training's DDPM from the same
    sampler_cls = getattr(
        diffusers, (index.get("scheduler") or [None, "DDPMScheduler"])[1], DDPMScheduler
    )
    # the file, as is
    config = DDPMScheduler.load_config(where, subfolder="scheduler", revision=revision)
    extras = tuple(
        k
        for k in ("safety_checker", "feature_extractor")
        if (index.get(k) or [None, None])[1] is not None
    )
    sampler = sampler_cls.from_config(config)
    return SDComponents(
        unet=unet,
        vae=vae,
        noise_scheduler=DDPMScheduler.from_config(config),
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        source=source,
        inference_scheduler=sampler,
        revision=revision,
        extras=extras if len(extras) == 2 else (),
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
    id, or a pipeline's ``vae`` subfolder. Its latent channels must be the UNet's."""
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
    if vae.config.latent_channels != unet.config.in_channels:
        raise ModelSourceError(
            f"vae {source!r} has {vae.config.latent_channels} latent channels, the UNet "
            f"takes {unet.config.in_channels}: not a VAE of this model family"
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
    """Components from a preset name (``tiny``, ``tiny-xl``, ``sd15-arch``, ``sdxl-arch``), a local
    diffusers directory or a hub id. Presets win over directories of the same name only when no such
    directory exists. ``vae`` replaces the model's VAE (``load_vae``)."""
    if source in PRESETS and not Path(source).is_dir():
        parts = build_preset(source, seed=seed)
    else:
        parts = load_pretrained(source, torch_dtype=torch_dtype, variant=variant, revision=revision)
    if vae is not None:
        parts.vae = load_vae(vae, parts.unet, torch_dtype=torch_dtype)
    return parts
