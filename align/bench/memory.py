"""Memory, measured where a CPU can measure it and estimated where only a GPU could.

* ``SavedTensors``: the bytes autograd keeps for backward inside a context (unique storages,
  parameters and buffers excluded), via ``torch.autograd.graph.saved_tensors_hooks``. Works on CPU,
  CUDA and meta tensors; this is how the tests show that gradient checkpointing lowers activation
  memory.
* ``static_memory``: analytic bytes of weights, gradients and optimizer state of a training set-up,
  from the module built on the meta device (exact parameter shapes, nothing allocated). An estimate:
  it leaves out activations, allocator fragmentation, CUDA context and workspace.
* ``activation_memory``: the saved-for-backward bytes of one real ``training_step`` on the meta
  device (plus, with gradient checkpointing, the largest block's activations, which its recompute
  holds in backward), with attention routed to a memory-efficient kernel (it saves q, k, v, out and
  the log-sum-exp, as flash attention does, not the seq x seq probabilities of the math path).
  Computed twice: in float32 (every saved tensor 4 bytes: above what bf16 autocast keeps) and in
  bfloat16 (every saved tensor 2 bytes: below it, since autocast keeps normalisation inputs in
  float32), which brackets the bf16-mixed figure.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from align.bench.runner import _native_resolution, software_versions
from align.bench.step import StepConfig, build_module, make_batch


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensors:
    """Context manager: unique storage bytes that autograd saves for backward while it is active.

    ``exclude``: tensors (parameters, buffers) whose storages are not activations and are not
    counted. Nested hooks (e.g. non-reentrant gradient checkpointing) take precedence, so what a
    checkpointed region drops is, correctly, not counted.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {_storage_key(t) for t in exclude}
        self.storages: dict[int, int] = {}
        self.total = 0
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.storages:
            self.storages[key] = t.untyped_storage().nbytes()
            self.total += self.storages[key]
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return self.total


@contextlib.contextmanager
def memory_efficient_attention():
    """Route ``F.scaled_dot_product_attention`` (what diffusers' AttnProcessor2_0 calls) to the
    flash-style kernel with a meta implementation, so meta-device estimates save what flash
    attention saves on a GPU."""
    original = F.scaled_dot_product_attention

    def sdpa(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs
    ):
        if attn_mask is not None or dropout_p or kwargs:
            return original(
                query,
                key,
                value,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                **kwargs,
            )
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, scale=scale
        )[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _cast_inputs(dtype: torch.dtype):
    def hook(module, args, kwargs):
        cast = lambda x: (  # noqa: E731
            x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        )
        kwargs = {
            k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v))
            for k, v in kwargs.items()
        }
        return tuple(cast(a) for a in args), kwargs

    return hook


# what diffusers' gradient checkpointing wraps
CHECKPOINTED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")


@dataclass
class ActivationMemory:
    saved: int  # bytes kept for backward after the forward
    largest_block: int  # most bytes one checkpointable block saves when it is not checkpointed

    @property
    def peak(self) -> int:
        """With gradient checkpointing, backward recomputes one block at a time on top of what was
        saved."""
        return self.saved + self.largest_block


def activation_memory(cfg: StepConfig, dtype: torch.dtype = torch.float32) -> ActivationMemory:
    """Saved-for-backward bytes of one ``training_step`` of ``cfg`` (all of its switches, e.g.
    gradient checkpointing and LoRA), computed on the meta device in ``dtype``; with gradient
    checkpointing also the largest single block's activations,
    which its recompute holds during backward."""
    saved, _ = _saved_bytes(cfg, dtype)
    largest = (
        _saved_bytes(cfg.replace(gradient_checkpointing=False), dtype)[1]
        if cfg.gradient_checkpointing
        else 0
    )
    return ActivationMemory(saved=saved, largest_block=largest)


def _saved_bytes(cfg: StepConfig, dtype: torch.dtype) -> tuple[int, int]:
    # the text encoders run without grad: saved nothing
    cfg = cfg.replace(compile_unet=False, compile_reference=False, cached_text=False)
    module = build_module(cfg, meta=True)
    if dtype != torch.float32:
        diffusers_log = logging.getLogger("diffusers")
        # "modules to keep in float32: []"
        level, diffusers_log.level = diffusers_log.level, logging.ERROR
        for unet in {id(m): m for m in (module.unet, module.ref_unet) if m is not None}.values():
            unet.to(dtype)
            unet.register_forward_pre_hook(_cast_inputs(dtype), with_kwargs=True)
        diffusers_log.setLevel(level)
    batch = make_batch(module, cfg)
    exclude = [*module.parameters(), *module.buffers()]
    largest = 0
    with warnings.catch_warnings(), memory_efficient_attention(), SavedTensors(exclude) as saved:
        warnings.simplefilter("ignore")

        def before(block, args):
            block._bench_saved_at = saved.total

        def after(block, args, out):
            nonlocal largest
            largest = max(largest, saved.total - block._bench_saved_at)

        for block in module.unet.modules():
            if type(block).__name__ in CHECKPOINTED_BLOCKS:
                block.register_forward_pre_hook(before)
                block.register_forward_hook(after)
        module.training_step(batch, 0)
    return saved.bytes, largest


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
    weights: int  # policy UNet in float32 (Lightning's bf16-mixed keeps float32 parameters)
    gradients: int  # float32, trainable parameters only
    optimizer_state: int
    # bf16-mixed: cached bf16 casts of the trainable weights during the step
    autocast_weight_copies: int
    reference_as_built: int  # the frozen parts as base.py builds them today (float32)
    reference_bf16: int  # the frozen parts cast to bfloat16

    @property
    def total_as_built(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer_state
            + self.autocast_weight_copies
            + self.reference_as_built
        )

    @property
    def total_bf16_frozen(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer_state
            + self.autocast_weight_copies
            + self.reference_bf16
        )


def static_memory(cfg: StepConfig) -> StaticMemory:
    """Analytic weight + gradient + optimizer-state bytes of ``cfg`` (one GPU, no sharding)."""
    module = build_module(cfg.replace(compile_unet=False, compile_reference=False), meta=True)
    trainable = [p for p in module.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_policy = sum(p.numel() for p in module.unet.parameters())
    n_ref = (
        sum(p.numel() for p in module.ref_unet.parameters()) if module.ref_unet is not None else 0
    )
    n_enc = sum(p.numel() for m in (module.vae, module.prompt_encoder) for p in m.parameters())
    bf16 = cfg.precision == "bf16"
    return StaticMemory(
        trainable_params=n_train,
        policy_unet_params=n_policy,
        reference_unet_params=n_ref,
        frozen_encoder_params=n_enc,
        weights=4 * n_policy,
        gradients=4 * n_train,
        optimizer_state=optimizer_state_bytes(trainable, cfg.optimizer),
        autocast_weight_copies=2 * n_train if bf16 else 0,
        reference_as_built=4 * (n_ref + n_enc),
        reference_bf16=2 * (n_ref + n_enc),
    )


def memory_record(cfg: StepConfig) -> dict:
    """A ``--memory-estimate`` record: static memory plus bracketed activation memory,
    all in GiB."""
    from datetime import datetime, timezone

    gib = 2.0**30
    static = static_memory(cfg)
    act_hi = activation_memory(cfg, torch.float32)
    act_lo = activation_memory(cfg, torch.bfloat16)
    peak = lambda static_bytes, act: (static_bytes + act.peak) / gib  # noqa: E731
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "memory",
        **cfg.to_dict(),
        "resolution": cfg.resolution or _native_resolution(cfg.preset),
        "sample_unit": cfg.sample_unit,
        "estimate": True,
        "trainable_params": static.trainable_params,
        "policy_unet_params": static.policy_unet_params,
        "reference_unet_params": static.reference_unet_params,
        "frozen_encoder_params": static.frozen_encoder_params,
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
        "total_bf16_frozen_gib": [
            peak(static.total_bf16_frozen, act_lo),
            peak(static.total_bf16_frozen, act_hi),
        ],
        "total_fp32_frozen_gib": [
            peak(static.total_as_built, act_lo),
            peak(static.total_as_built, act_hi),
        ],
        "env": {"device": "meta (shapes only)", **software_versions()},
    }
