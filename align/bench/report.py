"""Bench records: their common fields, a fixed-width table of them, and a JSON-lines file they are
appended to (one record per line)."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from align.bench.step import StepConfig
from align.models.presets import get_preset


def software_versions() -> dict[str, str]:
    import diffusers
    import lightning
    import peft
    import transformers

    packages = (torch, lightning, diffusers, transformers, peft)
    return {
        "python": platform.python_version(),
        **{package.__name__: package.__version__ for package in packages},
        "cuda": torch.version.cuda or "",
        "platform": platform.platform(),
    }


def new_record(cfg: StepConfig, mode: str, started: datetime | None = None) -> dict:
    """The fields every record has: when, the mode, and the step's whole configuration."""
    return {
        "time_utc": (started or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "mode": mode,
        **asdict(cfg),
        "resolution": cfg.resolution or get_preset(cfg.preset).resolution,
        "sample_unit": cfg.sample_unit,
    }


# (title, record key, format): a str.format pattern or one of the names _cell knows
_STEP = (
    ("objective", "objective", "{}"),
    ("preset", "preset", "{}"),
    ("res", "resolution", "{}"),
    ("batch", "batch", "{}"),
)
TIMED_COLUMNS = _STEP + (
    ("prec", "precision", "{}"),
    ("mode", "mode", "{}"),
    ("median ms", "median_step_s", "ms"),
    ("samples/s", "samples_per_s", "rate"),
    ("TFLOP/s", "achieved_tflops", "{:.3f}"),
    ("% peak", "frac_of_peak", "pct"),
    ("peak TFLOP/s", "peak_tflops", "{:.3f}"),
    ("peak mem MB", "peak_mem_mb", "{:.0f}"),
    ("overhead", "overhead_vs_bare_pct", "{:+.1f}%"),
)
FLOPS_COLUMNS = _STEP + (
    ("lora", "lora_rank", "{}"),
    ("denoiser GFLOP/step", "unet_flops_per_step", "gflop"),
    ("denoiser GFLOP/sample", "unet_flops_per_sample", "gflop"),
    ("text GFLOP/step", "text_flops_per_step", "gflop"),
    ("total GFLOP/step", "total_flops_per_step", "gflop"),
)
MEMORY_COLUMNS = _STEP + (
    ("lora", "lora_rank", "{}"),
    ("optim", "optimizer", "{}"),
    ("weights+grads+optim GiB", "_train_state_gib", "{:.1f}"),
    ("frozen fp32/bf16 GiB", "_frozen_gib", "{}"),
    ("activations GiB", "_act_gib", "{}"),
    ("total GiB, fp32 frozen", "_total_fp32", "{}"),
    ("total GiB, bf16 frozen", "_total_bf16", "{}"),
)


def _memory_cells(r: dict) -> dict:
    """The memory table's combined cells: sums, and low..high brackets."""
    return {
        **r,
        "_train_state_gib": r["weights_gib"]
        + r["gradients_gib"]
        + r["optimizer_state_gib"]
        + r["autocast_weight_copies_gib"],
        "_frozen_gib": f"{r['frozen_fp32_gib']:.1f}/{r['frozen_bf16_gib']:.1f}",
        "_act_gib": f"{r['activations_bf16_gib'] + r['recompute_block_bf16_gib']:.1f}.."
        f"{r['activations_fp32_gib'] + r['recompute_block_fp32_gib']:.1f}",
        "_total_fp32": "{:.1f}..{:.1f}".format(*r["total_fp32_frozen_gib"]),
        "_total_bf16": "{:.1f}..{:.1f}".format(*r["total_bf16_frozen_gib"]),
    }


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None:
        return "-"
    if fmt == "ms":
        return f"{value * 1e3:.1f}"
    if fmt == "pct":
        return f"{100 * value:.1f}%"
    if fmt == "gflop":
        return f"{value / 1e9:,.1f}"
    if fmt == "rate":
        return f"{value:.2f} {record.get('sample_unit', '')}s"
    return fmt.format(value)


def format_table(records: list[dict]) -> str:
    """A plain-text table: one header, one separator, one row per record
    (timed, FLOP-count or memory records, one kind per table)."""
    if not records:
        return ""
    modes = {r.get("mode") for r in records}
    if modes == {"flops"}:
        columns = FLOPS_COLUMNS
    elif modes == {"memory"}:
        columns = MEMORY_COLUMNS
        records = [_memory_cells(r) for r in records]
    elif modes & {"flops", "memory"}:
        raise ValueError("format_table: one kind of record per table (timed, flops or memory)")
    else:
        columns = TIMED_COLUMNS
    rows = [[title for title, _, _ in columns]]
    rows += [[_cell(r, key, fmt) for _, key, fmt in columns] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def append_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return path
