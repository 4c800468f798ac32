"""The evaluation report: one table (mean score per reward, win rate against the baseline, FID),
written as ``report.md``, ``report.csv`` and ``report.json``, plus ``scores.csv``
(every image's scores, both sets). The figures beside it are ``align.eval.figures``'s."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

REPORT_FILES = ("report.md", "report.csv", "report.json", "scores.csv")
CSV_COLUMNS = tuple(
    "reward n_images run_mean run_ci_low run_ci_high baseline_mean baseline_ci_low baseline_ci_high"
    " win_rate win_rate_ci_low win_rate_ci_high wins ties losses n_pairs pairing".split()
)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    style = "g" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else "f"
    return f"{value:.{digits}{style}}"


def _with_ci(est: dict | None, digits: int = 4) -> str:
    if not est:
        return "-"
    return f"{_fmt(est['value'], digits)} [{_fmt(est['low'], digits)}, {_fmt(est['high'], digits)}]"


def table_rows(report: dict) -> list[dict]:
    """The report as flat rows (the CSV)."""
    rows = []
    for name, r in report["rewards"].items():
        row = {"reward": name, "n_images": r["run"]["n"]}
        for part in ("run", "baseline", "win_rate"):
            est = r.get(part)  # None without a baseline: its columns are empty
            value = part if part == "win_rate" else f"{part}_mean"
            keys = {value: "value", f"{part}_ci_low": "low", f"{part}_ci_high": "high"}
            if part == "win_rate":
                keys.update(
                    wins="wins", ties="ties", losses="losses", n_pairs="n", pairing="pairing"
                )
            row.update({column: est[key] if est else None for column, key in keys.items()})
        rows.append(row)
    fid = report.get("fid")
    if fid:
        rows.append(
            {
                "reward": f"fid ({fid['features']})",
                "n_images": fid["run_n"],
                "run_mean": fid["run"],
                "baseline_mean": fid.get("baseline"),
            }
        )
    return rows


def to_markdown(report: dict) -> str:
    has_base = report.get("baseline") is not None
    conf = int(round(100 * report.get("confidence", 0.95)))
    head = ["reward", "images", f"run mean [{conf}% CI]"]
    if has_base:
        median = report.get("pairing") == "median"
        pairing = "median image per prompt" if median else "paired by prompt and seed"
        head += [
            f"baseline mean [{conf}% CI]",
            f"win rate vs baseline [{conf}% CI] ({pairing})",
            "W / T / L",
        ]
    lines = [f"# Evaluation: {report['run']}", ""]
    if has_base:
        lines.append(f"Baseline: {report['baseline']}  ")
    lines.append(
        f"Prompts: {report['num_prompts']}, seeds: {report['seeds']}, bootstrap: "
        f"{report['n_boot']} resamples of prompts  "
    )
    if report.get("skipped"):
        lines.append(
            f"Skipped unreadable images: {sum(len(v) for v in report['skipped'].values())}  "
        )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["rewards"].items():
        cells = [name, str(r["run"]["n"]), _with_ci(r["run"])]
        if has_base:
            win = r.get("win_rate")
            cells += [
                _with_ci(r.get("baseline")),
                _with_ci(win, 3),
                f"{win['wins']} / {win['ties']} / {win['losses']}" if win else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    fid = report.get("fid")
    if fid:
        lines += [
            "",
            f"FID against {fid['reference']} ({fid['features']} features, "
            f"{fid['reference_n']} reference images):",
            "",
            "| set | images | FID |",
            "|---|---|---|",
            f"| run | {fid['run_n']} | {_fmt(fid['run'])} |",
        ]
        if fid.get("baseline") is not None:
            lines.append(f"| baseline | {fid['baseline_n']} | {_fmt(fid['baseline'])} |")
    figures = report.get("figures") or {}
    if figures:  # written beside report.md by align.eval.figures
        lines += ["", *(f"![{name}]({file})" for name, file in figures.items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path, score_rows: list[dict]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in REPORT_FILES}
    paths["report.md"].write_text(to_markdown(report), encoding="utf-8")
    paths["report.json"].write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    columns = ["set", "prompt_index", "seed", "prompt", "path", *report["rewards"].keys()]
    # the csv module writes None and missing cells as empty ones
    for name, fields, rows in (
        ("report.csv", CSV_COLUMNS, table_rows(report)),
        ("scores.csv", columns, score_rows),
    ):
        with paths[name].open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return paths


def read_scores(out_dir: str | Path) -> list[dict]:
    """``scores.csv`` of a report directory as dicts (scores as floats)."""
    with (Path(out_dir) / "scores.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fixed = {"set", "prompt", "path"}
    for row in rows:
        for key, value in row.items():
            if key in ("prompt_index", "seed"):
                row[key] = int(value)
            elif key not in fixed and value != "":
                row[key] = float(value)
    return rows
