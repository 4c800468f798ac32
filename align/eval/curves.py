"""Training curves of a run: the few that matter for its method, read from the run's CSV log.

``open_run(run_dir)`` takes the directory the end-of-run summary prints (``run directory: ...``)
and returns a :class:`RunCurves`: the method (from ``model.class_path`` in the run's
``config.yaml``), the files the curves came from and every numeric metric as ``{name: (steps,
values)}``. ``plot_run`` draws the panels of :func:`panels`: DPO loss, implicit accuracy and
reward margin; KTO loss and the desirable / undesirable class rewards; SFT loss; plus the learning
rate and the gradient norm when they were logged; train and val in one panel.

Where the metrics are found, first match wins:

1. ``<run dir>/metrics.csv`` (Lightning ``CSVLogger`` format);
2. every ``<run dir>/csv/version_N/metrics.csv``, joined in order (a resume starts a new version;
   from the step it resumed at, the new version's values replace the old);
3. ``csv/version_N/metrics.csv`` beside the run directory (up to two levels up: the layout where
   the run directory is ``logs/align-dpo/<wandb id>/`` and the CSV logger writes
   ``logs/csv/version_N/``): the version that was being written when the run's ``config.yaml``
   was (there, versions are numbered per logger, not per run, so time is the link);
4. the wandb offline run of the same id (``wandb/*-<run dir name>/run-<id>.wandb`` beside it),
   or a ``.wandb`` file below;
5. the newest ``metrics.csv`` anywhere below.

A path to a ``metrics.csv`` or ``.wandb`` file is read as is. The ``.wandb`` reader is private to
this module: a LevelDB-style log (a 7-byte ``:W&B`` header, 32 KiB blocks of records with a 7-byte
header: CRC, length, type FULL/FIRST/MIDDLE/LAST) of wandb ``Record`` protobufs whose ``history``
records hold the logged rows; wandb >= 0.19 ships no Python reader (CRCs are not verified).
"""

from __future__ import annotations

import csv
import json
import math
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from align.extras import require

Curves = dict[str, tuple[list[float], list[float]]]
_BLOCK = 32768
_HEADER = 7
# a CSV version counts as the run's when the run's config.yaml was written inside its time span,
# give or take this much (loggers and the config are set up a few seconds apart)
_START_SLACK_S = 120.0

# LightningModule class name -> method
METHODS = {
    "DPOModule": "dpo",
    "KTOModule": "kto",
    "SFTModule": "sft",
    "RFTModule": "rft",
    "PreferenceModelModule": "preference",
}
# per method: (panel title, metric names without the train/ or val/ prefix)
METHOD_PANELS: dict[str, list[tuple[str, list[str]]]] = {
    "dpo": [
        ("loss", ["loss"]),
        ("implicit accuracy", ["implicit_acc"]),
        ("reward margin", ["reward_margin"]),
    ],
    "kto": [("loss", ["loss"]), ("class rewards", ["reward_desirable", "reward_undesirable"])],
    "sft": [("loss", ["loss"])],
    "rft": [("loss", ["loss"]), ("reward", ["reward_mean", "reward_weighted"])],
    "preference": [("loss", ["loss"]), ("accuracy", ["accuracy"])],
}
# a run whose config names no known module: its method from what it logged
_SIGNATURE_METRICS = [
    ("train/implicit_acc", "dpo"),
    ("train/reward_desirable", "kto"),
    ("train/accuracy", "preference"),
    ("train/reward_mean", "rft"),
    ("train/reward_weighted", "rft"),
]


@dataclass
class RunCurves:
    run_dir: Path
    method: str | None  # dpo, kto, sft, rft, preference; None when neither config nor metrics say
    sources: list[Path]  # the metrics.csv files (in the order written) or the .wandb file read
    curves: Curves

    def summary(self) -> str:
        shown = [name for _, names in panels(self) for name in names]
        lines = [
            f"run {self.run_dir}: method {self.method or 'unknown'}, {len(self.curves)} metrics "
            f"logged, read from {', '.join(str(p) for p in self.sources)}"
        ]
        for name in shown:
            steps, values = self.curves[name]
            lines.append(
                f"  {name:<28} {len(values):>6} points, last {values[-1]:.4g} at step {steps[-1]:g}"
            )
        return "\n".join(lines)


def _add(curves: dict, key: str, step: float, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        return
    curves[key][0].append(float(step))
    curves[key][1].append(float(value))


def read_lightning_csv(path: str | Path) -> Curves:
    """Every numeric column of a Lightning ``metrics.csv`` against ``step``
    (rows where it is set)."""
    curves: dict = defaultdict(lambda: ([], []))
    with Path(path).open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = float(row["step"]) if row.get("step") not in (None, "") else float(i)
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    _add(curves, key, step, float(value))
                except ValueError:
                    continue
    return dict(curves)


def _wandb_records(path: Path):
    """The raw protobuf payloads of a ``.wandb`` file."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file (no :W&B header)")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
            pending = b""
        else:  # zero bytes past the last record
            break


def _read_wandb_file(path: Path) -> Curves:
    """Every numeric scalar logged to a wandb run file, against ``_step``."""
    from wandb.proto import wandb_internal_pb2

    curves: dict = defaultdict(lambda: ([], []))
    for i, payload in enumerate(_wandb_records(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                row[key] = json.loads(item.value_json)
            except ValueError:
                continue
        step = row.get("_step", record.history.step.num if record.history.HasField("step") else i)
        for key, value in row.items():
            if not key.startswith("_"):
                _add(curves, key, step, value)
    return dict(curves)


def locate(path: str | Path) -> Path:
    """``path`` as given, or, when relative and absent, below the nearest parent of the working
    directory that holds it: a notebook runs in ``notebooks/`` while the summary printed a path
    relative to the repository root."""
    path = Path(path).expanduser()
    if path.exists() or path.is_absolute():
        return path
    for parent in Path.cwd().resolve().parents:
        if (parent / path).exists():
            return parent / path
    return path


def newest_run(logs: str | Path = "logs") -> Path:
    """The most recently started run directory under ``logs`` (a folder holding a ``config.yaml``,
    wandb's own folders aside); else the folder of the newest ``metrics.csv``."""
    root = locate(logs)
    configs = (p for p in root.rglob("config.yaml") if "wandb" not in p.relative_to(root).parts)
    newest = _newest(configs) or _newest(root.rglob("metrics.csv"))
    if newest is None:
        raise FileNotFoundError(f"no run under {root} (no config.yaml, no metrics.csv)")
    return newest.parent


def _newest(paths) -> Path | None:
    """The most recently modified of ``paths`` (the first of a tie), None for none."""
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def _span(version_dir: Path) -> tuple[float, float]:
    """(first, last) modification time of a CSV logger version's files: when it was written."""
    times = [p.stat().st_mtime for p in version_dir.iterdir() if p.is_file()]
    return min(times), max(times)


def _version_number(metrics: Path) -> tuple[float, str]:
    """Sort key of ``csv/version_N/metrics.csv``: by N (version_10 after version_9)."""
    number = metrics.parent.name.removeprefix("version_")
    return (int(number) if number.isdigit() else math.inf, metrics.parent.name)


def _csv_of_run(run_dir: Path) -> list[Path]:
    """The run's ``metrics.csv`` files, in the order they were written: the one in the run
    directory; else every ``csv/version_N`` below it (one per start: a resume adds a version);
    else the ``csv/version_N`` beside it that was written while the run ran."""
    if (run_dir / "metrics.csv").is_file():
        return [run_dir / "metrics.csv"]
    below = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=_version_number)
    if below:
        return below
    for where in (run_dir.parent, run_dir.parent.parent):
        candidates = sorted(where.glob("csv/version_*/metrics.csv"), key=_version_number)
        if not candidates:
            continue
        config = run_dir / "config.yaml"
        if not config.is_file():  # nothing to match on: the newest
            return [_newest(candidates)]
        started = config.stat().st_mtime
        during = []
        for candidate in candidates:
            first, last = _span(candidate.parent)
            if first - _START_SLACK_S <= started <= last + _START_SLACK_S:
                during.append((abs(first - started), candidate))
        if during:
            return [min(during)[1]]
    return []


def read_csv_versions(paths: list[Path]) -> Curves:
    """The curves of a run's CSV versions joined in order: a resumed run's steps from where it
    resumed replace what the earlier start logged from there on."""
    joined: Curves = {}
    for path in paths:
        part = read_lightning_csv(path)
        if not part:
            continue
        resumed_at = min(steps[0] for steps, _ in part.values())
        for name, (steps, values) in joined.items():
            kept = [i for i, step in enumerate(steps) if step < resumed_at]
            joined[name] = ([steps[i] for i in kept], [values[i] for i in kept])
        for name, (steps, values) in part.items():
            old_steps, old_values = joined.get(name, ([], []))
            joined[name] = (old_steps + steps, old_values + values)
    return {name: curve for name, curve in joined.items() if curve[0]}


def _wandb_of_run(run_dir: Path) -> Path | None:
    """The run's ``.wandb`` file: in or below the run directory, or beside it under the run's id
    (WandbLogger names the run directory after the wandb run id)."""
    below = sorted(run_dir.rglob("*.wandb"), key=lambda p: p.stat().st_mtime)
    if below:
        return below[-1]
    for where in (run_dir.parent, run_dir.parent.parent):
        found = sorted(where.glob(f"wandb/*-{run_dir.name}/run-{run_dir.name}.wandb"))
        if found:
            return found[-1]
    return None


def find_run(path: str | Path) -> tuple[str, list[Path]]:
    """``("csv", [metrics.csv, ...])`` (in the order written) or ``("wandb", [run-<id>.wandb])`` for
    a run directory or a file."""
    path = locate(path)
    if path.is_file():
        return ("wandb", [path]) if path.suffix == ".wandb" else ("csv", [path])
    if not path.is_dir():
        raise FileNotFoundError(f"no run at {path}")
    found = _csv_of_run(path)
    if found:
        return "csv", found
    wandb_file = _wandb_of_run(path)
    if wandb_file is not None:
        return "wandb", [wandb_file]
    metrics = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if metrics:
        return "csv", metrics[-1:]
    raise FileNotFoundError(f"no Lightning metrics.csv and no wandb run in, below or beside {path}")


def _read(kind: str, files: list[Path]) -> Curves:
    return _read_wandb_file(files[0]) if kind == "wandb" else read_csv_versions(files)


def read_curves(path: str | Path) -> Curves:
    return _read(*find_run(path))


def run_method(run_dir: Path, curves: Curves) -> str | None:
    """The method of a run: its config's ``model.class_path``, else what its metrics say."""
    config = run_dir / "config.yaml"
    if config.is_file():
        model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        class_name = str(model.get("class_path", "")).rsplit(".", 1)[-1]
        if class_name in METHODS:
            return METHODS[class_name]
    for metric, method in _SIGNATURE_METRICS:
        if metric in curves:
            return method
    return "sft" if "train/loss" in curves else None


def open_run(path: str | Path) -> RunCurves:
    """The curves of the run at ``path`` (a run directory, or a metrics file)."""
    path = locate(path)
    kind, sources = find_run(path)
    curves = _read(kind, sources)
    run_dir = path if path.is_dir() else path.parent
    return RunCurves(run_dir, run_method(run_dir, curves), sources, curves)


def panels(run: RunCurves) -> list[tuple[str, list[str]]]:
    """(title, logged metric names) of each panel to draw, empty panels left out."""
    wanted = METHOD_PANELS.get(run.method or "", [("loss", ["loss"])])
    out = []
    for title, names in wanted:
        logged = [f"{split}/{n}" for n in names for split in ("train", "val")]
        logged = [name for name in logged if name in run.curves]
        if logged:
            out.append((title, logged))
    learning_rates = sorted(name for name in run.curves if name.startswith("lr-"))
    if learning_rates:
        out.append(("learning rate", learning_rates))
    if "train/grad_norm" in run.curves:
        out.append(("grad norm", ["train/grad_norm"]))
    return out


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_run(run: RunCurves, smooth: int = 1):
    """One row of panels (pyplot figure, so a notebook shows it); ``smooth``: moving-average window
    of the train curves."""
    plt = require("matplotlib.pyplot", "eval", "the training-curve plots")
    chosen = panels(run)
    if not chosen:
        raise ValueError(f"{run.run_dir} logged none of the curves of a {run.method} run")
    fig, axes = plt.subplots(
        1, len(chosen), figsize=(3.6 * len(chosen), 3.0), squeeze=False, layout="constrained"
    )
    for ax, (title, names) in zip(axes[0], chosen):
        for name in names:
            steps, values = run.curves[name]
            if name.startswith("train/") and smooth > 1:
                values = moving_average(values, smooth)
            ax.plot(steps, values, label=name, marker="." if len(values) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
        if title == "implicit accuracy":
            ax.axhline(0.5, color="k", lw=0.6, ls=":")  # chance
    fig.suptitle(f"{run.method or 'run'}: {run.run_dir}", fontsize=9)
    return fig
