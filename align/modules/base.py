"""The LightningModule every objective builds on.

It owns the trainable denoiser (the UNet of SD1.5/SDXL or the flow transformer of SD3/FLUX.1; full
or LoRA via peft), the frozen reference (a frozen copy, or with LoRA the same denoiser with adapters
disabled: one copy of memory instead of two), the frozen VAE and prompt encoder, the noise and
timestep sampling (shared within a group, e.g. the two images of a DPO pair), caption dropout, and
export in diffusers format. Objective subclasses implement ``objective_output`` (the shared
training and validation steps log and return its loss) in a few lines on top of ``prompt_embeds``,
``encode_latents``, ``sample_noise`` and ``unet_errors``; the model family only changes what
``unet_errors`` computes (epsilon / v for the UNets, the flow velocity for SD3/FLUX:
``align.models.flow``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy

from align.data.cached import model_fingerprint
from align.models import load_components
from align.models.embeds import PromptEmbeds
from align.models.flow import FlowMatching, transformer_forward
from align.models.prompts import build_prompt_encoder
from align.modules.frozen import (
    adapters_disabled,
    freeze,
    no_grad_mode,
    trainable_state_dict,
)
from align.modules.trainable import TrainableModule
from align.objectives.common import diffusion_target, per_sample_error

log = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# diffusers' SD3 / FLUX LoRA scripts' defaults (Flow-GRPO trains the same lists): joint attention of
# both streams, and for FLUX the feed-forwards too
FLOW_LORA_TARGETS = {
    "sd3": (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ),
}
FLOW_LORA_TARGETS["flux"] = FLOW_LORA_TARGETS["sd3"] + (
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
EXPORT_INFO = "align_export.json"  # written beside a LoRA export: the base model it was trained on


def check_timestep_range(timestep_range, num_train_timesteps: int) -> tuple[int, int]:
    """``(low, high)`` with 0 <= low < high <= num_train_timesteps; None means every timestep."""
    if timestep_range is None:
        return 0, num_train_timesteps
    low, high = (int(v) for v in timestep_range)
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(
            f"timestep_range must be [low, high) with 0 <= low < high <= {num_train_timesteps}, "
            f"got {list(timestep_range)}"
        )
    return low, high


class Float32Forward:
    """Mixed into a layer: it computes in float32 with autocast off, whatever its weights'
    dtype; the layer class gives ``float32_op(x, weight, bias)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        if x.device.type not in ("cuda", "cpu", "xpu", "mps"):  # the meta device has no autocast
            return self.float32_op(x.float(), self.weight.float(), bias)
        with torch.autocast(x.device.type, enabled=False):
            return self.float32_op(x.float(), self.weight.float(), bias)


class Float32Conv2d(Float32Forward, torch.nn.Conv2d):
    def float32_op(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


class Float32Linear(Float32Forward, torch.nn.Linear):
    def float32_op(self, x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)


def last_layer(denoiser: torch.nn.Module) -> torch.nn.Module | None:
    """The denoiser's output layer: a UNet's ``conv_out``, a transformer's ``proj_out``."""
    return getattr(denoiser, "conv_out", None) or getattr(denoiser, "proj_out", None)


def float32_output(denoiser: torch.nn.Module) -> None:
    """Run the denoiser's last layer in float32 (its weights and the state dict stay as they
    are)."""
    last = last_layer(denoiser)
    if type(last) is torch.nn.Conv2d:
        last.__class__ = Float32Conv2d
    elif type(last) is torch.nn.Linear:
        last.__class__ = Float32Linear


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: list[str] = DEFAULT_LORA_TARGETS,
    dropout: float = 0.0,
) -> None:
    """A trainable peft LoRA adapter (``default``) on ``unet``'s ``targets``
    (module-name suffixes); a target that names no module fails here, naming it."""
    from peft import LoraConfig

    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if ".attn." in n or "attn" in n})
        raise ValueError(
            f"lora_targets {missing} name no module of the {type(unet).__name__} (its attention "
            f"layers: {leaves[:12]})"
        )
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=list(targets),
        )
    )


class DiffusionModule(TrainableModule):
    """Base of the DPO, KTO, SFT and RFT modules.

    Args:
        model: a preset name (``tiny``, ``tiny-xl``, ``sd15-arch``, ``sdxl-arch``), a local
            diffusers directory, or a hub id; ``variant``
            (e.g. ``fp16``) and ``revision`` pass to ``from_pretrained``.
        vae: another VAE (a VAE directory or hub id, e.g. ``madebyollin/sdxl-vae-fp16-fix``),
            or None.
        prompt_encoder: ``clip`` (SD1.5 / SDXL as the model is) or ``segment`` (LongAlign).
        prompt_encoder_args: keyword arguments of that encoder (segment: ``max_rows``, ``splitter``,
            ``t5``, ...). The encoder is frozen except for what its ``trainable_prompt_parts()``
            returns (the T5 adapter).
        lora_rank: 0 trains the full UNet; > 0 trains a LoRA of that rank and uses the adapter-free
            UNet as the reference. ``lora_alpha`` (default: the rank), ``lora_targets`` (module-name
            suffixes; default the attention projections, for SD3/FLUX those of diffusers' LoRA
            scripts: ``FLOW_LORA_TARGETS``) and ``lora_dropout`` configure it; the export carries
            them (``load_lora_weights`` rebuilds it).
        reference: ``auto`` (a frozen copy for full fine-tuning, adapters-disabled for LoRA),
            ``copy`` or ``none`` (objectives without a reference, e.g. SFT).
        caption_dropout: probability of replacing a caption by the empty string.
        timestep_range: ``[low, high)``: DPO, KTO and SFT train on timesteps drawn uniformly from
            that range instead of from all of ``[0, num_train_timesteps)`` (the official objectives'
            choice, and the default; RFT follows its own DDIM trajectory). High-noise steps are
            where layout and colour are decided; at low noise a preference pair differs in pixel
            detail the policy can fit in either direction (measured in the shapes world:
            ``docs/demo/design.md``).
        gradient_checkpointing / channels_last / compile_unet:
            memory and speed switches for the policy UNet.
        compile_reference: also ``torch.compile`` the frozen reference UNet (a forward-only graph; a
            LoRA reference is the policy UNet itself, so it follows ``compile_unet``).
        compile_mode: ``torch.compile``'s ``mode`` for both (None: its default; ``reduce-overhead``
            adds CUDA graphs, ``max-autotune-no-cudagraphs`` benchmarks kernels at the first step);
            torch rejects an unknown mode when the module is built.
        reference_inference_mode: run reference forwards under ``torch.inference_mode``
            (no autograd state).
        frozen_dtype: ``bf16`` / ``fp16`` stores the frozen VAE, prompt encoder and reference UNet
            in that dtype (about 6.4 GiB less for SDXL DPO), and with LoRA the policy's frozen base
            weights too (the adapter and the last layer stay float32; bf16 autocast multiplies by
            the same bf16 weights it made from float32 ones, normalisation weights are rounded);
            inputs are cast to each part's dtype and outputs back to float32.
        fp32_output: run the UNets' final projection (``conv_out``) in float32 outside autocast, so
            per-sample errors come from an output not rounded to bf16/fp16 (at beta 5000 bf16
            rounding is visible noise in the DPO logit: ``docs/benchmarks.md``).
        time_ids: SDXL's size conditioning: ``official`` (constant, as the Diffusion-DPO code) or
            ``image`` (each image's original size and crop).
        flow: SD3/FLUX only: ``align.models.flow.FlowMatching``'s fields (``weighting_scheme``,
            ``logit_mean``, ``logit_std``, ``mode_scale``, ``precondition_outputs``; FLUX dev's
            training ``guidance``).
        optimizer / lr_scheduler: injected by LightningCLI
            (``class_path`` + ``init_args`` in the config).
    """

    needs_reference = True
    prog_bar_metrics = ("loss", "implicit_acc")
    frozen_parts = ("vae", "prompt_encoder", "ref_unet")  # subclasses add their frozen scorers

    def __init__(
        self,
        model: str = "tiny",
        vae: str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        prompt_encoder: str = "clip",
        prompt_encoder_args: dict | None = None,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
        lora_dropout: float = 0.0,
        reference: str = "auto",
        caption_dropout: float = 0.0,
        timestep_range: tuple[int, int] | None = None,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile_unet: bool = False,
        compile_reference: bool = False,
        compile_mode: str | None = None,
        reference_inference_mode: bool = True,
        frozen_dtype: str | None = None,
        fp32_output: bool = True,
        time_ids: str = "official",
        flow: dict | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ):
        super().__init__()
        # the base of every rank's random streams: seed_everything's seed
        # (the same in every process), else seed
        self.stream_seed = int(os.environ.get("PL_GLOBAL_SEED", seed))
        # injected modules are recorded by their config (RFTModule, GRPOModule), not pickled
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "objective", "reward"])
        if reference not in ("auto", "copy", "none"):
            raise ValueError(f"reference must be 'auto', 'copy' or 'none', got {reference!r}")
        if time_ids not in ("official", "image"):
            raise ValueError(f"time_ids must be 'official' or 'image', got {time_ids!r}")
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.components = load_components(
            model, seed=seed, vae=vae, variant=variant, revision=revision
        )
        parts = self.components
        if flow is not None and not parts.is_flow:
            raise ValueError(f"flow settings apply to SD3/FLUX models; {model!r} is {parts.family}")
        # the family's script default: logit-normal (SD3), uniform (FLUX)
        scheme = {"weighting_scheme": "none" if parts.family == "flux" else "logit_normal"}
        self.flow = FlowMatching(**{**scheme, **(flow or {})}) if parts.is_flow else None
        self.vae = freeze(parts.vae)
        self.prompt_encoder = freeze(
            build_prompt_encoder(parts, prompt_encoder, **(prompt_encoder_args or {}))
        )
        # e.g. LongAlign's T5 adapter: optimised and checkpointed
        for part in self.trainable_prompt_parts():
            part.requires_grad_(True)
        self.unet = parts.unet
        self.prepare_unet(self.unet)
        self.ref_unet = None
        use_lora = lora_rank > 0
        if self.needs_reference and reference != "none" and (reference == "copy" or not use_lora):
            self.ref_unet = freeze(copy.deepcopy(self.unet))
        self.use_lora_reference = self.needs_reference and reference == "auto" and use_lora
        if use_lora:
            self.unet.requires_grad_(False)
            default = FLOW_LORA_TARGETS.get(parts.family, DEFAULT_LORA_TARGETS)
            add_lora(self.unet, lora_rank, lora_alpha, lora_targets or default, lora_dropout)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        denoisers = [unet for unet in (self.unet, self.ref_unet) if unet is not None]
        # the reference too: cuDNN would otherwise convert its every conv input to NHWC
        if channels_last:
            for unet in denoisers:
                unet.to(memory_format=torch.channels_last)
        if frozen_dtype is not None:
            dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
            if frozen_dtype not in dtypes:
                raise ValueError(
                    f"frozen_dtype must be one of {sorted(dtypes)} or null, got {frozen_dtype!r}"
                )
            for module in self.frozen_modules():
                module.to(dtypes[frozen_dtype])
            for part in self.trainable_prompt_parts():  # a trainable adapter stays in float32
                part.float()
            if use_lora:  # the policy's frozen base too (FLUX.1: 44 GiB less); the adapter and
                # the last layer (fp32_output's float32 projection) stay float32
                last = last_layer(self.unet)
                keep = {id(p) for p in last.parameters()} if last is not None else set()
                for p in self.unet.parameters():
                    if not p.requires_grad and id(p) not in keep:
                        p.data = p.data.to(dtypes[frozen_dtype])
        if compile_unet:
            self.unet.compile(mode=compile_mode)
        if compile_reference and self.ref_unet is not None:
            self.ref_unet.compile(mode=compile_mode)
        self.scheduler = parts.noise_scheduler
        self.prediction_type = "flow" if parts.is_flow else self.scheduler.config.prediction_type
        self.timestep_range = check_timestep_range(
            timestep_range, self.scheduler.config.num_train_timesteps
        )
        self.caption_dropout = caption_dropout
        self._generator: torch.Generator | None = None
        self.host_rng = random.Random(self.stream_seed)
        if fp32_output:
            for unet in denoisers:
                float32_output(unet)

    def prepare_unet(self, unet: torch.nn.Module) -> None:
        """A subclass's change to the base UNet before the reference copy and the adapter (RFT: fuse
        the SFT LoRA)."""

    # ---- frozen parts stay frozen ----------------------------------------------------------------
    def frozen_modules(self) -> list[torch.nn.Module]:
        parts = (getattr(self, name, None) for name in self.frozen_parts)
        return [m for m in parts if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        for part in self.trainable_prompt_parts():
            part.train(mode)
        return self

    def trainable_prompt_parts(self) -> list[torch.nn.Module]:
        """The prompt encoder's trainable parts (its ``trainable_prompt_parts()``; none for CLIP
        encoders)."""
        parts = getattr(self.prompt_encoder, "trainable_prompt_parts", None)
        return list(parts()) if parts is not None else []

    def setup(self, stage: str) -> None:
        if self.components.family == "flux" and torch.backends.cuda.cudnn_sdp_enabled():
            # cuDNN's attention backward fails on FLUX.1 (illegal memory access, H200, torch
            # 2.11); SDPA then takes flash attention (docs/benchmarks.md, the H200 section)
            torch.backends.cuda.enable_cudnn_sdp(False)
            log.info("FLUX: cuDNN attention switched off for this process (flash attention)")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

    # ---- randomness: every rank and micro-batch its own streams ----------------------------------
    @property
    def generator(self) -> torch.Generator:
        """Noise, timesteps and posterior samples draw from this (on the module's device)."""
        # meta: bench FLOP counts
        device = torch.device("cpu") if self.device.type == "meta" else self.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device).manual_seed(self.stream_seed)
        return self._generator

    def seed_streams(self, stage: str, index: int) -> None:
        """Reseed the device generator and the host RNG (caption dropout) from (seed_everything's
        seed, stage, rank, index): each rank draws its own numbers, a run reproduces them at any
        resume, and validation batch ``i`` sees the same draws at every validation and under
        ``align validate``."""
        key = f"{self.stream_seed}/{stage}/{self.global_rank}/{index}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
        self.generator.manual_seed(seed)
        self.host_rng.seed(seed)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # micro-batches since the start
        self.seed_streams("train", self.trainer.fit_loop.total_batch_idx)

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.seed_streams(f"val{dataloader_idx}", batch_idx)

    # ---- inputs ----------------------------------------------------------------------------------
    def drop_captions(self, captions: list[str]) -> list[str]:
        if not self.training or self.caption_dropout <= 0:
            return list(captions)
        return ["" if self.host_rng.random() < self.caption_dropout else c for c in captions]

    def encode_prompts(self, captions: list[str]) -> PromptEmbeds:
        """Without grad, unless the encoder has trainable parts
        (then grad flows into those parts only)."""
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and bool(self.trainable_prompt_parts())
        ):
            return self.prompt_encoder(captions)

    def prompt_embeds(self, batch: dict) -> PromptEmbeds:
        """The batch's conditioning after caption dropout. A batch from a latent cache
        (``align.data.cached``) carries ``prompt_embeds`` (+ ``pooled_embeds``): no text encoder
        runs, and a dropped caption's row becomes the cached empty prompt (``uncond_embeds``;
        without it, this encoder's). Dropout draws the same random numbers on both paths, so a
        cached and an image batch get the same conditioning."""
        captions = self.drop_captions(batch["caption"])
        if "prompt_embeds" not in batch:
            return self.encode_prompts(captions)
        if self.hparams.prompt_encoder != "clip" or self.trainable_prompt_parts():
            raise ValueError(
                "cached prompt embeddings are CLIP's; "
                f"prompt_encoder={self.hparams.prompt_encoder!r} encodes captions itself: train on "
                "shards without cached embeddings"
            )
        if batch.get("cache_fingerprint") is not None:
            if getattr(self, "_model_fingerprint", None) is None:
                self._model_fingerprint = model_fingerprint(self.vae, self.components.text_encoders)
            if batch["cache_fingerprint"] != self._model_fingerprint:
                raise ValueError(
                    f"the batch was cached from model {batch.get('cache_model')!r} with another "
                    f"VAE / text encoder (fingerprint {batch['cache_fingerprint']}) than this "
                    "module's "
                    f"{self.hparams.model!r}, a {self.components.family} model "
                    f"({self._model_fingerprint}): re-cache with `align data cache-latents --model "
                    f"{self.hparams.model}`"
                )
        dtype = self.unet.dtype
        embeds = batch["prompt_embeds"].to(self.device, dtype)
        pooled = batch.get("pooled_embeds")
        pooled = None if pooled is None else pooled.to(self.device, dtype)
        dropped = [c == "" for c in captions]
        # decided on the host: no device sync, and the meta device can run this path
        if any(dropped):
            dropped = torch.tensor(dropped, device=self.device)
            empty = (
                PromptEmbeds(batch["uncond_embeds"], batch.get("uncond_pooled"))
                if "uncond_embeds" in batch
                else self.encode_prompts([""])
            )
            embeds = torch.where(dropped[:, None, None], empty.embeds.to(embeds), embeds)
            if pooled is not None:
                pooled = torch.where(dropped[:, None], empty.pooled.to(pooled), pooled)
        return PromptEmbeds(embeds, pooled)

    @torch.no_grad()
    def encode_latents(self, batch: dict) -> torch.Tensor:
        """Latents of the batch's images; cached VAE moments
        (``latent_moments``) skip the VAE entirely.

        Both paths sample the same DiagonalGaussianDistribution from the same moments, so training
        on a cache and on images consumes the random stream identically.
        """
        if "latent_moments" in batch:
            moments = batch["latent_moments"]
        else:
            pixels = batch["pixel_values"].to(dtype=self.vae.dtype)
            moments = self.vae.encode(pixels).latent_dist.parameters
        # contiguous: the VAE may return channels-last moments (CPU oneDNN), and noise drawn with
        # randn_like follows the memory layout, so the same seed would give the image and cached
        # paths different noise
        latents = DiagonalGaussianDistribution(moments.float()).sample(self.generator).contiguous()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0  # SD3 / FLUX VAEs
        return (latents - shift) * self.vae.config.scaling_factor

    def time_ids(self, batch: dict, n: int) -> torch.Tensor | None:
        """SDXL's added time ids: original (h, w), crop (top, left), target (h, w). ``official``
        (the Diffusion-DPO code): constant (res, res, 0, 0, res, res); ``image``:
        each image's size and crop."""
        if not self.components.is_sdxl:
            return None
        res = self.components.resolution
        per_image = self.hparams.get("time_ids", "official") == "image"
        original = batch.get("original_size") if per_image else None
        crop = batch.get("crop_top_left") if per_image else None
        original = torch.tensor([[res, res]] * n) if original is None else original
        crop = torch.zeros(n, 2, dtype=torch.long) if crop is None else crop
        target = torch.tensor([[res, res]] * n)
        return torch.cat([original, crop, target], dim=1).to(self.device, torch.float32)

    def sample_noise(
        self, latents: torch.Tensor, group: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps, shared across ``group`` consecutive blocks of the batch
        (pairs: group=2)."""
        n = latents.shape[0] // group
        gen = self.generator
        noise = torch.randn(
            latents[:n].shape, generator=gen, device=gen.device, dtype=latents.dtype
        )
        noise = noise.to(latents.device).repeat(group, *([1] * (latents.ndim - 1)))
        low, high = self.timestep_range
        if self.flow is not None:
            t = self.flow.sample_timesteps(self.scheduler, n, gen, low, high)
        else:
            t = torch.randint(low, high, (n,), generator=gen, device=gen.device)
        return noise, t.to(latents.device).repeat(group)

    # ---- denoising errors ------------------------------------------------------------------------
    def unet_forward(
        self,
        unet,
        noisy: torch.Tensor,
        t: torch.Tensor,
        cond: PromptEmbeds,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.flow is not None:
            family, guidance = self.components.family, self.flow.guidance
            return transformer_forward(family, unet, noisy, t, cond, guidance)
        # a frozen reference may be stored in bf16 (frozen_dtype) while the policy is float32
        dtype = unet.dtype
        pooled = None if cond.pooled is None else cond.pooled.to(dtype)
        added = (
            None if time_ids is None else {"text_embeds": pooled, "time_ids": time_ids.to(dtype)}
        )
        return unet(
            noisy.to(dtype), t, encoder_hidden_states=cond.embeds.to(dtype), added_cond_kwargs=added
        ).sample

    def unet_errors(
        self, latents, noise, t, cond: PromptEmbeds, time_ids=None, reference: bool = False
    ):
        """Per-sample denoising error (N,) of the policy,
        or of the reference with ``reference=True``."""
        noisy = self.noisy_latents(latents, noise, t)
        if not reference:
            pred = self.unet_forward(self.unet, noisy, t, cond, time_ids)
            return self.prediction_error(pred, latents, noise, noisy, t)
        with no_grad_mode(self.hparams.reference_inference_mode):
            with self.reference_denoiser() as unet:
                unet = self.unet if unet is None else unet
                pred = self.unet_forward(unet, noisy, t, cond, time_ids)
            err = self.prediction_error(pred, latents, noise, noisy, t)
        return err.clone()  # a normal tensor again, usable by autograd outside inference mode

    @contextlib.contextmanager
    def reference_denoiser(self, required: bool = True):
        """The reference: the frozen copy, or None for the policy's own denoiser with its LoRA
        adapters disabled (one copy in memory). Without either: a RuntimeError, or with
        ``required=False`` None, the policy as it is."""
        if self.use_lora_reference:
            with adapters_disabled(self.unet):
                yield None
        elif self.ref_unet is not None or not required:
            yield self.ref_unet
        else:
            raise RuntimeError(f"{type(self).__name__} has no reference model (reference='none')")

    def noisy_latents(self, latents, noise, t) -> torch.Tensor:
        if self.flow is not None:
            return self.flow.noisy(latents, noise, t, self.scheduler)
        return self.scheduler.add_noise(latents, noise, t)

    def prediction_target(self, pred, latents, noise, noisy, t):
        """(prediction, target, per-sample weights or None) that the family's loss compares: the
        flow's (``align.models.flow``), or the UNet's output against epsilon or v."""
        if self.flow is not None:
            args = (pred, latents, noise, noisy, t, self.scheduler)
            return *self.flow.prediction_and_target(*args), self.flow.weights(t, self.scheduler)
        return pred, diffusion_target(self.prediction_type, latents, noise, t, self.scheduler), None

    def prediction_error(self, pred, latents, noise, noisy, t) -> torch.Tensor:
        """Per-sample error (N,) of a prediction against the family's target."""
        pred, target, weights = self.prediction_target(pred, latents, noise, noisy, t)
        err = per_sample_error(pred, target)
        return err if weights is None else err * weights.to(err).detach()

    # ---- steps -----------------------------------------------------------------------------------
    def objective_output(self, batch: dict):
        """The objective's output on ``batch`` (``loss`` and ``metrics()``): the subclass's."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int):
        out = self.objective_output(batch)
        self.log_metrics("train", out.metrics(), batch_size=len(batch["caption"]))
        self.log_skipped(batch)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int):
        # the same draws at every validation (seed_streams)
        out = self.objective_output(batch)
        self.log_metrics("val", out.metrics(), batch_size=len(batch["caption"]))

    # ---- optimisation, export --------------------------------------------------------------------
    def _fsdp(self) -> bool:
        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def on_before_optimizer_step(self, optimizer) -> None:
        # local gradient shards: the total norm is logged by configure_gradient_clipping
        if not self._fsdp():
            super().on_before_optimizer_step(optimizer)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip where Lightning's own clipping would refuse or be wrong;
        otherwise Lightning's clipping.

        * FSDP (``configs/trainer/fsdp_sdxl.yaml``): each rank holds a shard of the gradients, so
          the norm must be taken over every rank's shard; Lightning's FSDP plugin refuses norm
          clipping (it has no handle on the root module) and ``torch.nn.utils.clip_grad_norm_``
          would clip each shard by its own norm. The root FSDP module's ``clip_grad_norm_`` does it
          right.
        * A fused optimizer (``configs/optim/adamw_fused.yaml``) under bf16-mixed: Lightning's
          mixed-precision plugin refuses because with fp16's gradient scaler a fused step unscales
          the gradients itself. bf16 has no scaler: the gradients are true gradients and are clipped
          here. With a scaler, Lightning's rule stands.
        """
        if not gradient_clip_val:
            return
        by_value = gradient_clip_algorithm == "value"
        if self._fsdp() and not by_value:  # returns the total norm over all shards, before clipping
            self.log("train/grad_norm", self.trainer.model.clip_grad_norm_(gradient_clip_val))
            return
        plugin = self.trainer.precision_plugin
        if getattr(plugin, "scaler", None) is None and getattr(
            optimizer, "_step_supports_amp_scaling", False
        ):
            from lightning.pytorch.plugins.precision import Precision

            # the base plugin's clipping, without the mixed-precision plugin's refusal
            Precision.clip_gradients(
                plugin, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm"
            )
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def export(self, out_dir: str | Path) -> Path:
        """Diffusers format: a full pipeline directory, or for LoRA the adapter file
        ``load_lora_weights`` reads."""
        out = Path(out_dir)
        if self.hparams.lora_rank > 0:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(self.unet)
            if not self.components.is_flow:  # the transformers' scripts save peft's own keys
                layers = convert_state_dict_to_diffusers(layers)
            out.mkdir(parents=True, exist_ok=True)
            # the adapter's config (alpha, targets, dropout) travels in the file's metadata, so that
            # load_lora_weights rebuilds the trained scale alpha / rank, not alpha = rank
            config = self.unet.peft_config["default"].to_dict()
            name = self.components.denoiser_name  # unet / transformer
            self.components.pipeline_class().save_lora_weights(
                str(out),
                **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": config},
                safe_serialization=True,
            )
            # what the adapter applies to: `align sample --checkpoint <this dir>` needs nothing else
            hp = self.hparams
            info = {"base_model": hp.model, "lora_rank": hp.lora_rank, "seed": hp.seed}
            (out / EXPORT_INFO).write_text(json.dumps(info, indent=2))
            return out
        unet = getattr(self.unet, "_orig_mod", self.unet)
        return self.components.save_pretrained(out, unet=unet)
