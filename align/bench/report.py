"""Bench records as a fixed-width table, and appended to a JSON-lines file (one record per line)."""

from __future__ import annotations

import json
from pathlib import Path

TIMED_COLUMNS = (
    ("objective", "objective", "{}"),
    ("preset", "preset", "{}"),
    ("res", "resolution", "{}"),
    ("batch", "batch", "{}"),
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
FLOPS_COLUMNS = (
    ("objective", "objective", "{}"),
    ("preset", "preset", "{}"),
    ("res", "resolution", "{}"),
    ("batch", "batch", "{}"),
    ("lora", "lora_rank", "{}"),
    ("UNet GFLOP/step", "unet_flops_per_step", "gflop"),
    ("UNet GFLOP/sample", "unet_flops_per_sample", "gflop"),
    ("text GFLOP/step", "text_flops_per_step", "gflop"),
    ("total GFLOP/step", "total_flops_per_step", "gflop"),
)

MEMORY_COLUMNS = (
    ("objective", "objective", "{}"),
    ("preset", "preset", "{}"),
    ("res", "resolution", "{}"),
    ("batch", "batch", "{}"),
    ("lora", "lora_rank", "{}"),
    ("optim", "optimizer", "{}"),
    ("weights+grads+optim GiB", "_train_state_gib", "{:.1f}"),
    ("frozen fp32/bf16 GiB", "_frozen_gib", "{}"),
    ("activations GiB", "_act_gib", "{}"),
    ("total GiB, fp32 frozen", "_total_fp32", "{}"),
    ("total GiB, bf16 frozen", "_total_bf16", "{}"),
)


def _derived(record: dict) -> dict:
    if record.get("mode") != "memory":
        return record
    return {
        **record,
        "_train_state_gib": record["weights_gib"]
        + record["gradients_gib"]
        + record["optimizer_state_gib"]
        + record["autocast_weight_copies_gib"],
        "_frozen_gib": f"{record['frozen_fp32_gib']:.1f}/{record['frozen_bf16_gib']:.1f}",
        "_act_gib": f"{record['activations_bf16_gib'] + record['recompute_block_bf16_gib']:.1f}.."
        f"{record['activations_fp32_gib'] + record['recompute_block_fp32_gib']:.1f}",
        "_total_fp32": "{:.1f}..{:.1f}".format(*record["total_fp32_frozen_gib"]),
        "_total_bf16": "{:.1f}..{:.1f}".format(*record["total_bf16_frozen_gib"]),
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
    (timed or FLOP-count records)."""
    if not records:
        return ""
    modes = {r.get("mode") for r in records}
    columns = {frozenset({"flops"}): FLOPS_COLUMNS, frozenset({"memory"}): MEMORY_COLUMNS}.get(
        frozenset(modes), TIMED_COLUMNS
    )
    if columns is TIMED_COLUMNS and modes & {"flops", "memory"}:
        raise ValueError("format_table: one kind of record per table (timed, flops or memory)")
    records = [_derived(r) for r in records]
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
