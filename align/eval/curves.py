"""Training curves of a run, from Lightning's CSV logger or a wandb offline run directory.

``read_curves(path)`` returns ``{metric: (steps, values)}`` for:

* a Lightning ``CSVLogger`` ``metrics.csv`` (or a directory holding one, searched recursively: the
  newest);
* a wandb run directory (``wandb/offline-run-*`` or ``wandb/run-*``; or a ``wandb/`` directory: the
  newest run), read from its ``run-<id>.wandb`` file. That file is a LevelDB-style log (a 7-byte
  ``:W&B`` header, 32 KiB blocks of records with a 7-byte header: CRC, length, type
  FULL/FIRST/MIDDLE/LAST) of wandb ``Record`` protobufs; the ``history`` records hold the logged
  rows. wandb >= 0.19 no longer ships a Python reader, hence this small one (CRCs are not verified).
"""

from __future__ import annotations

import csv
import json
import math
import struct
from collections import defaultdict
from pathlib import Path

Curves = dict[str, tuple[list[float], list[float]]]
_BLOCK = 32768
_HEADER = 7


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


def iter_wandb_records(path: str | Path):
    """The raw protobuf payloads of a ``.wandb`` file."""
    data = Path(path).read_bytes()
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


def read_wandb_run(run_dir: str | Path) -> Curves:
    """Every numeric scalar logged to a wandb run, against ``_step``."""
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.wandb")) if run_dir.is_dir() else [run_dir]
    if not files:
        raise FileNotFoundError(f"no .wandb file in {run_dir}")
    curves: dict = defaultdict(lambda: ([], []))
    for i, payload in enumerate(iter_wandb_records(files[0])):
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


def find_run(path: str | Path) -> tuple[str, Path]:
    """('csv', metrics.csv) or ('wandb', run dir) for a file or directory."""
    path = Path(path).expanduser()
    if path.is_file():
        return ("wandb", path) if path.suffix == ".wandb" else ("csv", path)
    if not path.is_dir():
        raise FileNotFoundError(f"no run at {path}")
    if list(path.glob("*.wandb")):
        return "wandb", path
    runs = sorted([p for p in path.rglob("*.wandb")], key=lambda p: p.stat().st_mtime)
    if runs:
        return "wandb", runs[-1].parent
    metrics = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if metrics:
        return "csv", metrics[-1]
    raise FileNotFoundError(f"no Lightning metrics.csv and no wandb run under {path}")


def read_curves(path: str | Path) -> Curves:
    kind, where = find_run(path)
    return read_wandb_run(where) if kind == "wandb" else read_lightning_csv(where)
