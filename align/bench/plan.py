"""What a training config will do, before it runs: ``align plan`` (see ``align.commands.plan``).

Arithmetic on a resolved config (``model``, ``data``, ``trainer`` as LightningCLI resolves them):
the batch, the steps, passes over the data, the learning rate along the schedule, and, from the
meta-device estimates of ``align.bench.memory`` / ``align.bench.flops``, memory per GPU and time on
a named GPU.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.bench.memory import memory_record
from align.bench.step import StepConfig
from align.data.batching import accumulation_for
from align.data.epochs import epoch_batches, no_shard_downloads
from align.models.presets import FLOW_FAMILIES, PRESETS

OVERHEAD_GIB = 1.0  # CUDA context and allocator reserve, on top of the estimate
# DPO/KTO: policy forward F + backward 2F + reference forward F = 4F; checkpointing recomputes F
CHECKPOINT_RECOMPUTE = 1.25


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what torch.cuda reports as total
    bf16_tflops: float  # dense peak, spec sheet
    tf32_tflops: float


GPUS = {
    "h100": Gpu("NVIDIA H100 80GB SXM", 79.6, 989.4, 494.7),
    "h200": Gpu("NVIDIA H200 141GB SXM", 139.8, 989.4, 494.7),
    "a100": Gpu("NVIDIA A100 80GB SXM", 79.2, 312.0, 156.0),
    "l40s": Gpu("NVIDIA L40S 48GB", 44.4, 362.1, 181.0),
}
UNITS = {"DPOModule": "pair", "PreferenceModelModule": "pair", "RFTModule": "prompt"}
OBJECTIVES = {"DPOModule": "dpo", "KTOModule": "kto"}  # what align.bench can build and estimate
PRESET_OF_ID = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15-arch",
    "runwayml/stable-diffusion-v1-5": "sd15-arch",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-arch",
    "stabilityai/stable-diffusion-3.5-medium": "sd35-arch",
    "black-forest-labs/FLUX.1-dev": "flux-arch",
}
BENCH_RECORDS = Path(__file__).resolve().parents[2] / "docs" / "bench_results.jsonl"


def gpu(name: str) -> Gpu:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None


def class_name(path: str | None) -> str:
    return (path or "").rpartition(".")[2]


@dataclass
class Plan:
    world: int
    micro: int
    accumulation: int
    global_batch: int
    unit: str
    target_batch: int | None = None  # data.global_batch_size when set
    samples: int | None = None  # in the training set
    samples_from: str = ""  # where the count comes from, or why it is unknown
    epoch_batches: int | None = None  # per rank
    steps: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int | None:
        return None if self.epoch_batches is None else self.epoch_batches // self.accumulation

    @property
    def seen(self) -> int | None:
        return None if self.steps is None else self.steps * self.global_batch

    @property
    def per_pass(self) -> int | None:
        """Samples one epoch trains on (the remainder of a pass sits out)."""
        return None if self.epoch_batches is None else self.epoch_batches * self.world * self.micro


def world_size(trainer: dict, devices: int | None, num_nodes: int | None) -> int:
    if devices is None:
        devices = trainer.get("devices", 1)
        if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
            devices = int(devices)
        if isinstance(devices, (list, tuple)):
            devices = len(devices)
        elif isinstance(devices, str) and "," in devices:
            devices = len([d for d in devices.split(",") if d.strip()])
        if not isinstance(devices, int) or devices < 1:
            raise ValueError(f"trainer.devices is {devices!r}: pass --devices N")
    return devices * (num_nodes or int(trainer.get("num_nodes") or 1))


def data_args(cfg: dict) -> dict:
    """The data module's arguments, an online module's round data (its ``data`` dict) included."""
    args = cfg["data"]["init_args"]
    if not isinstance(args.get("data"), dict):
        return args
    return {**args["data"], **{k: v for k, v in args.items() if v is not None}}


def make_plan(cfg: dict, world: int, num_samples: int | None = None) -> Plan:
    """The batch, the data's size and epoch, and the steps of ``cfg`` on ``world`` GPUs."""
    data, trainer = data_args(cfg), cfg["trainer"]
    micro, target = int(data["batch_size"]), data.get("global_batch_size")
    if target:
        accumulation, actual = accumulation_for(int(target), micro, world)
    else:
        accumulation = int(trainer.get("accumulate_grad_batches") or 1)
        actual = accumulation * micro * world
    unit = UNITS.get(class_name(cfg["model"]["class_path"]), "image")
    plan = Plan(world, micro, accumulation, actual, unit, target_batch=target)
    if target and actual != target:
        plan.notes.append(
            f"global batch {target} is not reachable on {world} GPUs x {micro}: {actual} is used"
        )
    plan.samples, plan.epoch_batches, plan.samples_from = _training_samples(cfg, plan, num_samples)
    # the steps from max_steps / max_epochs and the epoch length
    max_steps, max_epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if (max_steps is None or max_steps < 0) and max_epochs is None:
        max_epochs = 1000  # Lightning's default when neither is set
    candidates = [max_steps] if max_steps is not None and max_steps >= 0 else []
    if max_epochs is not None and max_epochs >= 0 and plan.steps_per_epoch is not None:
        candidates.append(max_epochs * plan.steps_per_epoch)
    plan.steps = min(candidates) if candidates else None
    return plan


def _training_samples(
    cfg: dict, plan: Plan, num_samples: int | None
) -> tuple[int | None, int | None, str]:
    """(samples, batches per rank per epoch, where the count comes from)."""
    data = data_args(cfg)
    if num_samples is not None:
        epoch = epoch_batches(
            num_samples,
            world=plan.world,
            workers=int(data.get("num_workers") or 0),
            batch_size=int(data["batch_size"]),
            multiple_of=plan.accumulation,
            batches_per_epoch=data.get("batches_per_epoch"),
        )
        return num_samples, epoch, "--num-samples"
    module, _, name = cfg["data"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not hasattr(cls, "epoch_plan"):
        return None, None, f"{name} does not stream data epochs"
    try:
        with no_shard_downloads():  # a plan downloads nothing
            samples, epoch = cls(**cfg["data"]["init_args"]).epoch_plan(
                plan.world, plan.accumulation
            )
    except (FileNotFoundError, ValueError) as err:
        return None, None, f"{err} (pass --num-samples)"
    return samples, epoch, "the shards"


def lr_points(model_args: dict, steps: int) -> list[tuple[int, float]]:
    """The learning rate after ``s`` optimizer steps at a few points, from the config's optimizer
    and scheduler (stepped per optimizer step, as ``configure_optimizers`` does)."""
    from lightning.pytorch.cli import instantiate_class  # seconds to import; align plan has it

    lr = float(model_args.get("optimizer", {}).get("init_args", {}).get("lr", 1e-3))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    spec = model_args.get("lr_scheduler") or {}
    scheduler = instantiate_class(optimizer, spec) if spec else None
    warm = spec.get("init_args", {}).get("total_iters")
    marks = {0, 1, steps // 4, steps // 2, steps - 1, *([warm] if warm and warm < steps else [])}
    points = []
    for step in range(steps):
        if step in marks:
            points.append((step, optimizer.param_groups[0]["lr"]))
        if scheduler is not None:
            optimizer.step()
            scheduler.step()
    return points


def preset_of(model: str, override: str | None = None) -> str | None:
    """The architecture preset to estimate ``model`` with: a preset name, a known hub id, or a local
    diffusers directory: its UNet (SD1.5 or SDXL shaped by its cross-attention width) or its flow
    transformer (the SD3/FLUX preset whose every denoiser setting its config has)."""
    if override or model in PRESETS:
        return override or model
    unet = Path(model) / "unet" / "config.json"
    if unet.is_file():
        width = json.loads(unet.read_text()).get("cross_attention_dim")
        return {768: "sd15-arch", 2048: "sdxl-arch"}.get(width)
    transformer = Path(model) / "transformer" / "config.json"
    if transformer.is_file():
        config = json.loads(transformer.read_text())
        for name, preset in PRESETS.items():
            wanted = json.loads(json.dumps(preset.denoiser))  # tuples as JSON lists
            if preset.family in FLOW_FAMILIES and all(
                config.get(k) == v for k, v in wanted.items()
            ):
                return name
        return None
    return PRESET_OF_ID.get(model)


def measured_mfu(objective: str, preset: str, batch: int):
    """(MFU vs the spec bf16 peak, the record) of the nearest-batch Lightning GPU benchmark of
    ``objective`` on ``preset`` in ``docs/bench_results.jsonl``; None when there is none."""
    if not BENCH_RECORDS.is_file():
        return None
    found = []  # (record, the GPU's spec)
    for line in BENCH_RECORDS.read_text().splitlines():
        rec = json.loads(line)
        device = rec.get("env", {}).get("device", "").upper()
        spec = next((g for key, g in GPUS.items() if key.upper() in device), None)
        if (
            spec is not None
            and rec.get("mode") == "lightning"
            and (rec.get("objective"), rec.get("preset")) == (objective, preset)
            and rec.get("achieved_tflops")
        ):
            found.append((rec, spec))
    if not found:
        return None
    rec, spec = min(
        found, key=lambda f: (abs(f[0]["batch"] - batch), f[0].get("compile_unet", False))
    )
    return rec["achieved_tflops"] / spec.bf16_tflops, rec


def _fmt(x: object) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "?"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1:
        return f"{int(x):,}"
    return f"{x:.4g}"


def compare(ours: dict[str, object], official: dict[str, object], reasons: dict[str, str]):
    """Rows (setting, ours, official, mark): mark is '' when equal, else the reason or a flag."""
    rows = []
    for key, theirs in official.items():
        mine = ours.get(key)
        if isinstance(theirs, float) and mine is not None:
            same = math.isclose(float(mine), theirs, rel_tol=1e-9)
        else:
            same = mine == theirs
        mark = "" if same else "differs: " + reasons.get(key, "no reason recorded")
        rows.append((key, _fmt(mine), _fmt(theirs), mark))
    return rows


def our_settings(cfg: dict, plan: Plan) -> dict[str, object]:
    """The values of ``cfg`` under the names the recipes use."""
    model, data, trainer = cfg["model"]["init_args"], data_args(cfg), cfg["trainer"]
    opt = model.get("optimizer") or {}
    sched = (model.get("lr_scheduler") or {}).get("init_args", {})
    return {
        "GPUs": plan.world,
        "micro-batch": plan.micro,
        "accumulation": plan.accumulation,
        "global batch": plan.global_batch,
        "optimizer": class_name(opt.get("class_path")),
        "learning rate": opt.get("init_args", {}).get("lr"),
        "warm-up steps": sched.get("total_iters"),
        "steps": plan.steps,
        "grad clip": trainer.get("gradient_clip_val"),
        "beta": model.get("beta"),
        "caption dropout": model.get("caption_dropout"),
        "resolution": data.get("resolution", model.get("resolution")),
        "precision": str(trainer.get("precision")),
        "LoRA rank": model.get("lora_rank"),
        "LoRA dropout": model.get("lora_dropout"),
    }


def step_config(cfg: dict, preset: str) -> StepConfig | None:
    """The ``align.bench`` step of a DPO/KTO config (None for other modules)."""
    model, data, trainer = cfg["model"]["init_args"], data_args(cfg), cfg["trainer"]
    objective = OBJECTIVES.get(class_name(cfg["model"]["class_path"]))
    if objective is None:
        return None
    opt = model.get("optimizer") or {}
    adamw = "adamw-fused" if opt.get("init_args", {}).get("fused") else "adamw"
    named = {"Adafactor": "adafactor", "AdamW8bit": "adamw8bit"}
    optimizer = named.get(class_name(opt.get("class_path")), adamw)
    cached = bool(data.get("cached"))
    return StepConfig(
        objective=objective,
        preset=preset,
        batch=int(data["batch_size"]),
        resolution=data.get("resolution"),
        precision="32" if str(trainer.get("precision")).startswith("32") else "bf16",
        lora_rank=int(model.get("lora_rank") or 0),
        gradient_checkpointing=bool(model.get("gradient_checkpointing")),
        frozen_dtype=model.get("frozen_dtype"),
        cached_latents=cached,
        cached_text=cached,
        optimizer=optimizer,
    )


def memory_gib(step: StepConfig, shards: int = 1) -> tuple[float, float]:
    """GiB per GPU, bracketed by 2- and 4-byte activations, on the meta device (SD1.5: ~20 s).
    ``shards``: FSDP's FULL_SHARD divides weights, gradients, optimizer state and the frozen
    models by it (the activations stay whole; the one gathered block is left out)."""
    record = memory_record(step)
    frozen = "bf16" if step.frozen_dtype else "fp32"
    static = record[f"static_{frozen}_frozen_gib"]
    low, high = (t - static + static / shards for t in record[f"total_{frozen}_frozen_gib"])
    return (high, high) if step.precision == "32" else (low, high)  # float32: 4-byte activations


def fsdp_shards(trainer: dict, world: int) -> tuple[int, bool] | None:
    """(GPUs that share each FSDP shard, whether FSDP checkpoints block activations) of a
    trainer config with Lightning's FSDPStrategy; None without FSDP or when it shards no weights
    (SHARD_GRAD_OP, NO_SHARD: estimated unsharded)."""
    strategy = trainer.get("strategy")
    if "fsdp" not in str(strategy).lower():
        return None
    args = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    sharding = args.get("sharding_strategy") or "FULL_SHARD"
    sharding = str(getattr(sharding, "name", sharding)).upper()  # an enum once resolved
    devices = world // int(trainer.get("num_nodes") or 1)
    shards = {"FULL_SHARD": world, "HYBRID_SHARD": devices}.get(sharding)
    return None if shards is None else (shards, bool(args.get("activation_checkpointing_policy")))


def hours(plan: Plan, flops: int, device: Gpu, mfu: float, step: StepConfig) -> float:
    """Wall-clock hours of ``plan.steps`` at ``mfu`` of ``device``'s peak (each GPU runs its
    micro-batches one after another; model FLOPs, plus the policy recompute under checkpointing)."""
    peak = (device.tf32_tflops if step.precision == "32" else device.bf16_tflops) * 1e12
    work = flops * (CHECKPOINT_RECOMPUTE if step.gradient_checkpointing else 1.0)
    return plan.steps * plan.accumulation * work / (peak * mfu) / 3600
