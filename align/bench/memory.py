"""Memory, measured where a CPU can measure it and estimated where only a GPU could
(docs/benchmarks.md, "Memory estimates").

* ``SavedTensors``: the bytes autograd keeps for backward inside a context; CPU, CUDA or meta.
* ``static_memory``: weights, gradients and optimizer state, from exact parameter counts.
* ``activation_memory``: the saved-for-backward bytes of one real ``training_step`` on the meta
  device, in float32 (above what bf16 autocast keeps) and in bfloat16 (below it, since autocast
  keeps normalisation inputs in float32): the two bracket the bf16-mixed figure.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Iterable
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

from align.bench.report import new_record, software_versions
from align.bench.step import StepConfig, build_module, make_batch, quiet_diffusers


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: unique storage bytes (``bytes``, per storage in ``storages``) that autograd
    saves for backward while it is active.

    ``exclude``: tensors (parameters, buffers) whose storages are not activations. Nested hooks
    (e.g. non-reentrant gradient checkpointing) take precedence, so what a checkpointed region drops
    is, correctly, not counted.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {_storage_key(t) for t in exclude}
        self.storages: dict[int, int] = {}
        self.bytes = 0
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.storages:
            self.storages[key] = t.untyped_storage().nbytes()
            self.bytes += self.storages[key]
        return t

    def __enter__(self) -> "SavedTensors":
        super().__enter__()
        return self


def memory_efficient_attention():
    """Route ``F.scaled_dot_product_attention`` (what diffusers' AttnProcessor2_0 and
    JointAttnProcessor2_0 call, and its attention dispatcher's native backend for FLUX) to the
    flash-style kernel with a meta implementation, so meta-device estimates save what flash
    attention saves on a GPU."""
    original = F.scaled_dot_product_attention

    # kw: enable_gqa, which diffusers' attention dispatcher (FLUX) passes, False
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or dropout_p or any(kw.values()):
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(query, key, value, 0.0, is_causal, scale=scale)[0]

    return mock.patch.object(F, "scaled_dot_product_attention", sdpa)


def _cast_inputs(dtype: torch.dtype):
    """A forward pre-hook casting the floating-point tensors among the inputs to ``dtype``."""

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype) if x.is_floating_point() else x

    return lambda module, args, kwargs: tree_map_only(torch.Tensor, cast, (args, kwargs))


def record_checkpointed_blocks(denoiser: torch.nn.Module) -> set[str]:
    """A set that collects the class of every block the denoiser's gradient checkpointing wraps,
    as it wraps it: diffusers passes each block to its modules' ``_gradient_checkpointing_func``
    (a UNet's resnets and transformer blocks, SD3's joint blocks, FLUX's double- and
    single-stream blocks)."""
    names = set()

    def recording(checkpoint):
        def wrapped(block, *args, **kwargs):
            names.add(type(getattr(block, "__self__", block)).__name__)
            return checkpoint(block, *args, **kwargs)

        return wrapped

    for module in denoiser.modules():
        if getattr(module, "_gradient_checkpointing_func", None) is not None:
            module._gradient_checkpointing_func = recording(module._gradient_checkpointing_func)
    return names


@dataclass
class ActivationMemory:
    saved: int  # bytes kept for backward after the forward
    largest_block: int  # most bytes one checkpointed block saves when it is not checkpointed

    @property
    def peak(self) -> int:
        """With gradient checkpointing, backward recomputes one block at a time on top of what was
        saved."""
        return self.saved + self.largest_block


def activation_memory(cfg: StepConfig, dtype: torch.dtype = torch.float32) -> ActivationMemory:
    """Saved-for-backward bytes of one ``training_step`` of ``cfg`` (all of its switches), on the
    meta device in ``dtype``; with gradient checkpointing also the largest single block's
    activations, which its recompute holds during backward."""
    saved, _, blocks = _saved_bytes(cfg, dtype)
    largest = 0
    if cfg.gradient_checkpointing:
        _, largest, _ = _saved_bytes(cfg.replace(gradient_checkpointing=False), dtype, blocks)
    return ActivationMemory(saved=saved, largest_block=largest)


def _saved_bytes(
    cfg: StepConfig, dtype: torch.dtype, blocks: set[str] = frozenset()
) -> tuple[int, int, set[str]]:
    """(bytes saved for backward, the most that one block of a class in ``blocks`` saved, the
    block classes the denoiser's gradient checkpointing wrapped)."""
    # the text encoders run without grad: saved nothing
    cfg = cfg.replace(compile_unet=False, compile_reference=False, cached_text=False)
    module = build_module(cfg, meta=True)
    if dtype != torch.float32:
        with quiet_diffusers():
            for unet in (m for m in (module.unet, module.ref_unet) if m is not None):
                unet.to(dtype)
                unet.register_forward_pre_hook(_cast_inputs(dtype), with_kwargs=True)
    batch = make_batch(module, cfg)
    exclude = [*module.parameters(), *module.buffers()]
    saved_at, largest, checkpointed = {}, 0, record_checkpointed_blocks(module.unet)
    ignore = warnings.catch_warnings(action="ignore")
    with ignore, memory_efficient_attention(), SavedTensors(exclude) as saved:

        def before(block, args):
            saved_at[block] = saved.bytes

        def after(block, args, out):
            nonlocal largest
            largest = max(largest, saved.bytes - saved_at[block])

        for block in module.unet.modules():
            if type(block).__name__ in blocks:
                block.register_forward_pre_hook(before)
                block.register_forward_hook(after)
        module.training_step(batch, 0)
    return saved.bytes, largest, checkpointed


# ---- weights, gradients, optimizer state ---------------------------------------------------------


def _adafactor_state_numel(shape: torch.Size) -> int:
    """transformers' Adafactor (beta1=None, the official SDXL DPO setting): factored second moments
    over the last two dims (a row vector and a column vector) for tensors of 2+ dims,
    a full second moment otherwise."""
    if len(shape) >= 2:
        return int(torch.Size(shape[:-1]).numel() + torch.Size((*shape[:-2], shape[-1])).numel())
    return int(shape.numel())


def optimizer_state_bytes(params: list[torch.Tensor], optimizer: str) -> int:
    if optimizer in ("adamw", "adamw-fused"):
        return sum(8 * p.numel() for p in params)  # exp_avg + exp_avg_sq in float32
    if optimizer == "adamw8bit":
        # two 8-bit states for tensors of >= 4096 elements (bitsandbytes' min_8bit_size), float32
        # below; the block-wise quantization scales (one float32 per block) are left out
        return sum(2 * p.numel() if p.numel() >= 4096 else 8 * p.numel() for p in params)
    if optimizer == "adafactor":
        return sum(4 * _adafactor_state_numel(p.shape) for p in params)
    raise ValueError(f"unknown optimizer {optimizer!r}")


@dataclass
class StaticMemory:
    trainable_params: int
    policy_unet_params: int
    reference_unet_params: int  # 0 with a LoRA reference (adapters disabled on the policy UNet)
    frozen_encoder_params: int  # VAE + text encoders
    text_encoder_params: int  # of which the text encoders (SD3/FLUX: T5-XXL's 4.76 B among them)
    weights: int  # policy UNet in float32 (Lightning's bf16-mixed keeps float32 parameters)
    gradients: int  # float32, trainable parameters only
    optimizer_state: int
    # bf16-mixed: cached bf16 casts of the trainable weights during the step
    autocast_weight_copies: int
    reference_as_built: int  # the frozen parts as base.py builds them today (float32)
    reference_bf16: int  # the frozen parts cast to bfloat16
    # frozen_dtype bf16 also stores a LoRA policy's frozen base weights in bf16: 2 bytes saved each
    policy_base_bf16_saving: int = 0

    @property
    def train_state(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.autocast_weight_copies

    @property
    def total_as_built(self) -> int:
        return self.train_state + self.reference_as_built

    @property
    def total_bf16_frozen(self) -> int:
        return self.train_state + self.reference_bf16 - self.policy_base_bf16_saving


def static_memory(cfg: StepConfig) -> StaticMemory:
    """Analytic weight + gradient + optimizer-state bytes of ``cfg`` (one GPU, no sharding)."""
    module = build_module(cfg.replace(compile_unet=False, compile_reference=False), meta=True)

    def numel(params) -> int:
        return sum(p.numel() for p in params)

    trainable = [p for p in module.parameters() if p.requires_grad]
    n_train, n_policy = numel(trainable), numel(module.unet.parameters())
    n_ref = numel(module.ref_unet.parameters()) if module.ref_unet is not None else 0
    n_text = numel(module.prompt_encoder.parameters())
    n_enc = numel(module.vae.parameters()) + n_text
    return StaticMemory(
        trainable_params=n_train,
        policy_unet_params=n_policy,
        reference_unet_params=n_ref,
        frozen_encoder_params=n_enc,
        text_encoder_params=n_text,
        weights=4 * n_policy,
        gradients=4 * n_train,
        optimizer_state=optimizer_state_bytes(trainable, cfg.optimizer),
        autocast_weight_copies=2 * n_train if cfg.precision == "bf16" else 0,
        reference_as_built=4 * (n_ref + n_enc),
        reference_bf16=2 * (n_ref + n_enc),
        policy_base_bf16_saving=2 * (n_policy - n_train) if cfg.lora_rank else 0,
    )


def memory_record(cfg: StepConfig) -> dict:
    """A ``--memory-estimate`` record: static memory plus bracketed activation memory,
    all in GiB."""
    gib = 2.0**30
    static = static_memory(cfg)
    act_hi = activation_memory(cfg, torch.float32)
    act_lo = activation_memory(cfg, torch.bfloat16)

    def totals(static_bytes: int) -> list[float]:
        return [(static_bytes + act.peak) / gib for act in (act_lo, act_hi)]

    return {
        **new_record(cfg, "memory"),
        "estimate": True,
        **{key: n for key, n in asdict(static).items() if key.endswith("_params")},
        "weights_gib": static.weights / gib,
        "gradients_gib": static.gradients / gib,
        "optimizer_state_gib": static.optimizer_state / gib,
        "autocast_weight_copies_gib": static.autocast_weight_copies / gib,
        "frozen_fp32_gib": static.reference_as_built / gib,
        "frozen_bf16_gib": static.reference_bf16 / gib,
        "static_fp32_frozen_gib": static.total_as_built / gib,
        "static_bf16_frozen_gib": static.total_bf16_frozen / gib,
        "activations_fp32_gib": act_hi.saved / gib,
        "activations_bf16_gib": act_lo.saved / gib,
        "recompute_block_fp32_gib": act_hi.largest_block / gib,
        "recompute_block_bf16_gib": act_lo.largest_block / gib,
        "total_bf16_frozen_gib": totals(static.total_bf16_frozen),
        "total_fp32_frozen_gib": totals(static.total_as_built),
        "env": {"device": "meta (shapes only)", **software_versions()},
    }
