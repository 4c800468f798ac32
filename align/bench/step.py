"""One training step of an objective, built from the real module code path: the ``DPOModule`` /
``KTOModule`` that ``align fit`` builds, a synthetic batch in the data pipeline's format, and the
module's own ``training_step``. Nothing here re-implements an objective."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import warnings
from dataclasses import dataclass, replace

import torch
from torch.utils._device import DeviceContext

from align.extras import require

OBJECTIVES = {"dpo": "align.modules.dpo.DPOModule", "kto": "align.modules.kto.KTOModule"}
OPTIMIZERS = ("adamw", "adamw-fused", "adafactor", "adamw8bit")
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}  # bench name -> Lightning precision
# StepConfig's fields that are the module's arguments of the same name
MODULE_SWITCHES = tuple(
    "lora_rank gradient_checkpointing channels_last compile_unet compile_reference compile_mode"
    " reference_inference_mode frozen_dtype fp32_output".split()
)


@dataclass(frozen=True)
class StepConfig:
    """What one benchmarked step is: objective, model, batch and every performance switch.

    ``batch`` counts pairs for DPO (the denoiser, a UNet or a flow transformer, sees 2 x batch
    images) and images for KTO. ``resolution`` is in pixels; None means the preset's native size.
    """

    objective: str = "dpo"
    preset: str = "tiny"
    batch: int = 4
    resolution: int | None = None
    precision: str = "32"
    lora_rank: int = 0
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile_unet: bool = False
    compile_reference: bool = False
    compile_mode: str | None = None  # torch.compile's mode (None: its default)
    reference_inference_mode: bool = True
    # bf16 / fp16: the frozen reference, VAE and text encoders stored in it
    frozen_dtype: str | None = None
    # the denoisers' last layer in float32 (DiffusionModule.fp32_output; off: its cost measured)
    fp32_output: bool = True
    # VAE moments in the batch (a latent cache): the VAE encoder does not run
    cached_latents: bool = True
    # prompt embeddings in the batch (the same cache): the text encoders do not run
    cached_text: bool = True
    optimizer: str = "adamw"
    lr: float = 1e-5
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self):
        checks = {"objective": OBJECTIVES, "optimizer": OPTIMIZERS, "precision": PRECISIONS}
        for name, known in checks.items():
            if (value := getattr(self, name)) not in known:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")

    @property
    def images(self) -> int:
        """Images through the denoiser per step (policy; the reference sees the same again)."""
        return 2 * self.batch if self.objective == "dpo" else self.batch

    @property
    def sample_unit(self) -> str:
        return "pair" if self.objective == "dpo" else "image"

    def replace(self, **changes) -> "StepConfig":
        return replace(self, **changes)


def optimizer_factory(name: str, lr: float):
    """The optimizer callables the configs in ``configs/optim/`` name (weight decay 0.01),
    as a LightningCLI would inject them."""
    kw = {"lr": lr, "weight_decay": 0.01}
    if name in ("adamw", "adamw-fused"):
        fused = True if name == "adamw-fused" else None  # None: torch's default
        return functools.partial(torch.optim.AdamW, **kw, fused=fused)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        off = dict.fromkeys(("scale_parameter", "relative_step", "warmup_init"), False)
        return functools.partial(Adafactor, **kw, **off)
    if name == "adamw8bit":
        # imported when the optimizer is made: FLOP/memory estimates need no bitsandbytes
        def adamw8bit(params):
            bnb = require("bitsandbytes", "8bit", "the optimizer adamw8bit")
            return bnb.optim.AdamW8bit(params, **kw)

        return adamw8bit
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR):
    """The logger ``name`` at ``level`` inside the block."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


# diffusers' logger at ERROR: a model cast with ``to(dtype)`` (``frozen_dtype``, the bf16
# activation estimates) warns "modules that should be kept in float32: []" once per model
quiet_diffusers = functools.partial(quiet_logger, "diffusers")


class MetaDevice(DeviceContext):
    """``with torch.device("meta")``, except that a meta tensor moved to another device stays on
    the meta device: a scheduler built inside it moves its tables to the CPU (diffusers' Euler
    scheduler, SDXL's sampler: ``self.sigmas.to("cpu")``), which no meta tensor can do. Nothing
    is allocated either way."""

    def __init__(self):
        super().__init__("meta")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            if func in (torch.Tensor.cpu, torch.Tensor.cuda):
                return args[0]
            if func is torch.Tensor.to:

                def stay(x):  # a device stays meta; another tensor gives its dtype only
                    if isinstance(x, (str, torch.device)):
                        return self.device
                    return x.dtype if isinstance(x, torch.Tensor) else x

                args = (args[0], *map(stay, args[1:]))
                kwargs = {k: self.device if k == "device" else v for k, v in kwargs.items()}
        return super().__torch_function__(func, types, args, kwargs)


def build_module(cfg: StepConfig, device: torch.device | str = "cpu", meta: bool = False):
    """The objective's LightningModule with ``cfg``'s switches, on ``device`` (or the meta device).

    ``meta=True``: shapes only, nothing allocated, for FLOP counts and memory estimates of
    full-size presets on a laptop. Otherwise the weights are created on ``device`` directly: random
    initialisation of SDXL's 3.5 B parameters on the host, then a copy to the GPU, would cost more
    than the benchmark's steps. On the meta device every part is shapes only, the text encoders
    too (SD3.5 and FLUX.1: T5-XXL's 4.76 B parameters).
    """
    target = torch.device("meta") if meta else torch.device(device)
    module_path, _, name = OBJECTIVES[cfg.objective].rpartition(".")
    cls = getattr(importlib.import_module(module_path), name)  # imported outside the device context
    with MetaDevice() if meta else target, quiet_diffusers():
        switches = {key: getattr(cfg, key) for key in MODULE_SWITCHES}
        optimizer = optimizer_factory(cfg.optimizer, cfg.lr)
        module = cls(model=cfg.preset, **switches, optimizer=optimizer, seed=cfg.seed)
    return module.to(target).train()


def embedding_shapes(module) -> tuple[tuple[int, ...], int | None]:
    """The (length, width) of the prompt embeddings the module's own prompt encoder hands the
    denoiser, and the pooled vector's width (None without one): what a latent cache stores
    (SD1.5 77 x 768; SDXL 77 x 2048 + 1280; SD3 77 + 256 T5 tokens x 4096 + 2048; FLUX.1
    512 x 4096 + 768). Read from one empty caption through the encoder (nothing is computed on the
    meta device)."""
    with torch.no_grad():
        out = module.encode_prompts([""])
    return tuple(out.embeds.shape[1:]), None if out.pooled is None else int(out.pooled.shape[-1])


def make_batch(module, cfg: StepConfig, device: torch.device | str | None = None) -> dict:
    """A synthetic batch in the data pipelines' format (``align.data.pickapic`` /
    ``align.data.cached``): captions; cached VAE moments (``2 x latent_channels`` channels: 4 for
    SD1.5/SDXL, 16 for SD3/FLUX, whose module packs them itself) or pixels in [-1, 1]; cached
    prompt embeddings in the prompt encoder's shapes (``embedding_shapes``: one row per caption,
    + pooled for SDXL, SD3 and FLUX) or none. DPO rows are winners then losers."""
    device = torch.device(device) if device is not None else module.device
    gen = torch.Generator().manual_seed(cfg.seed)
    parts = module.components

    def tensor(*shape, sample=torch.randn) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(*shape, device=device)
        return sample(*shape, generator=gen).to(device)

    n, res = cfg.images, cfg.resolution or parts.resolution
    if res % parts.vae_scale_factor:
        raise ValueError(
            f"resolution {res} is not a multiple of the VAE factor {parts.vae_scale_factor}"
        )
    batch: dict = {"caption": [f"a photo of object {i}, studio light" for i in range(cfg.batch)]}
    if cfg.cached_latents:
        side = res // parts.vae_scale_factor
        batch["latent_moments"] = tensor(n, 2 * parts.vae.config.latent_channels, side, side)
    else:
        batch["pixel_values"] = tensor(n, 3, res, res, sample=torch.rand) * 2 - 1
    if cfg.cached_text:
        embeds, pooled = embedding_shapes(module)
        batch["prompt_embeds"] = tensor(cfg.batch, *embeds)
        if pooled is not None:
            batch["pooled_embeds"] = tensor(cfg.batch, pooled)
    if cfg.objective == "kto":
        # P(desirable) = 0.8 as in the paper's batches; at least one of each class when batch >= 2
        desirable = torch.tensor([(i % 5) != 4 for i in range(n)])
        if n >= 2 and bool(desirable.all()):
            desirable[-1] = False
        batch["desirable"] = desirable.to(device)
    return batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareStep:
    """The step a plain PyTorch loop runs: the module's ``training_step``, backward, the module's
    ``on_before_optimizer_step``, gradient clipping, ``optimizer.step``, ``zero_grad`` — the order
    and work of Lightning's automatic optimization, without the Trainer."""

    def __init__(self, module, cfg: StepConfig):
        self.module, self.cfg = module, cfg
        module.setup("fit")  # as the Trainer calls it (FLUX: the attention kernel it avoids)
        opt = module.configure_optimizers()
        self.optimizer = opt["optimizer"] if isinstance(opt, dict) else opt
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.device = module.device

    def __call__(self, batch: dict, index: int) -> torch.Tensor:
        # the autocast Lightning's bf16-mixed applies around training_step
        bf16 = self.cfg.precision == "bf16"
        # self.log() without a Trainer warns and does nothing
        with warnings.catch_warnings(action="ignore"):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = self.module.training_step(batch, index)
            loss.backward()
            self.module.on_before_optimizer_step(self.optimizer)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
