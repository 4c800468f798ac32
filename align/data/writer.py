"""Resumable, deterministic sharded writing shared by every ``align data`` converter.

A converter plans its work as an ordered list of :class:`Unit` s (a parquet row group, an input tar,
a chunk of an annotation list), each with an exact number of input *rows* known before any row is
converted, and a module-level ``convert(payload, need)`` function that yields one item per planned
row, in order: a sample dict (``{"jpg": bytes, "json": dict, ...}``, optionally with ``__key__``), a
:class:`Skip` (counted by its reason), or ``None`` for a row whose shard is already done
(``need(j)`` is false: the converter may skip the expensive work). ``Skip(reason, row=False)``
counts something that is not a planned row (an image with no caption found while streaming a tar),
attributed to the shard of the next row.

Rows are partitioned into shards *within* a unit: rows ``[k*S, (k+1)*S)`` of a unit go to its k-th
shard, and shards are numbered ``{prefix}-{index:06d}.tar`` in plan order. So the shard a row lands
in depends only on the plan and never on the number of workers, and a resumed run writes
byte-identical shards (tar members have fixed mtime 0, uid/gid 0, mode 0444; JSON is written in
insertion order).

Each shard is written to ``<name>.tmp-<pid>``, fsynced, then atomically renamed, and only then
entered into ``manifest.json`` (sample count, bytes, sha256, rows and skips per reason). The
manifest carries a fingerprint of the source (command, options, input names and sizes, the plan): an
output folder written from a different source is refused and nothing in it is touched. On resume,
shards listed in the manifest whose size and sha256 verify are kept; the others are rewritten. Every
run ends by writing ``summary.json`` (rows read, written, skipped by reason) and printing it.

Reading shards back lives in :mod:`align.data.tars`; the converters' shared helpers (image
preparation, JSONL reading, command-line options) in :mod:`align.data.convert_helpers`.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from itertools import accumulate
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from align.data.tars import READ_ERRORS, HashingStream, sha256_file

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
MANIFEST_FORMAT = "align-shards/1"


class ForeignOutputError(RuntimeError):
    """The output folder holds shards that this run did not plan; nothing was written."""


class BusyOutputError(ForeignOutputError):
    """Another live process is writing the output folder."""


@dataclass(frozen=True)
class Unit:
    """One indivisible piece of work: ``rows`` planned input rows,
    described by ``payload`` (picklable)."""

    name: str
    rows: int
    payload: Any = None


@dataclass(frozen=True)
class Skip:
    """A row (or, with ``row=False``, an unplanned input item) that produced no sample, and why."""

    reason: str
    row: bool = True


@dataclass
class Summary:
    command: str
    out: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: int = 0
    shards_kept: int = 0
    shards_written: int = 0
    files_skipped: dict = field(default_factory=dict)
    seconds: float = 0.0
    rows_converted: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def rows_read(self) -> int:
        return self.written + sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "command": self.command,
            "out": self.out,
            "rows_read": self.rows_read,
            "written": self.written,
            "skipped_total": sum(self.skipped.values()),
            "skipped": dict(sorted(self.skipped.items())),
            "files_skipped": self.files_skipped,
            "shards": self.shards,
            "shards_kept": self.shards_kept,
            "shards_written": self.shards_written,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_converted / self.seconds, 2)
            if self.seconds > 0
            else None,
            **self.extra,
        }

    def format(self) -> str:
        d = self.to_dict()
        lines = [
            f"{self.command}: {d['rows_read']} rows read, {d['written']} written, "
            f"{d['skipped_total']} skipped -> {self.out}",
            f"  shards: {self.shards} ({self.shards_written} written this run, "
            f"{self.shards_kept} kept)",
        ]
        for reason, n in d["skipped"].items():
            lines.append(f"  skipped {reason}: {n}")
        for reason, names in self.files_skipped.items():
            lines.append(
                f"  files skipped ({reason}): {len(names)}: {', '.join(names[:5])}"
                + (" ..." if len(names) > 5 else "")
            )
        if d["rows_per_s"]:
            lines.append(
                f"  {self.rows_converted} rows converted in {d['seconds']:.1f} s "
                f"({d['rows_per_s']:.1f} rows/s)"
            )
        for key, value in self.extra.items():
            lines.append(f"  {key}: {json.dumps(value)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- manifest


def file_identity(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list:
    """(name relative to ``root``, size) of an input file, for source fingerprints. Not the mtime
    (copies change it) nor the absolute path (folders move)."""
    path = Path(path)
    name = str(path.relative_to(root)) if root is not None else path.name
    return [name, path.stat().st_size]


def load_manifest(out_dir: str | os.PathLike) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------ writing


class _ShardOut:
    def __init__(self, out_dir: Path, name: str):
        import webdataset as wds

        self.path = out_dir / name
        self.tmp = out_dir / f"{name}.tmp-{os.getpid()}"
        self.handle = open(self.tmp, "wb")
        self.hashing = HashingStream(self.handle)
        self.tar = wds.TarWriter(self.hashing, mtime=0, user="", group="", mode=0o444, encoder=True)

    def finish(self) -> tuple[int, str]:
        self.tar.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)
        return self.hashing.size, self.hashing.sha256.hexdigest()

    def abandon(self) -> None:
        try:
            # closes tarfile's stream cleanly (into the temp file that is deleted next)
            self.tar.close()
        except Exception:
            pass
        finally:
            self.handle.close()
            self.tmp.unlink(missing_ok=True)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _clean_key(key: str) -> str:
    return str(key).replace(".", "_").replace("/", "_").replace("\\", "_") or "_"


@dataclass
class _Task:
    unit: Unit
    first_shard: int
    first_row: int
    done: frozenset
    convert: Callable
    shard_size: int
    out_dir: str
    prefix: str


def _run_unit(task: _Task) -> Iterator[tuple]:
    """Convert one unit; yields events: ("rows", n), ("shard", name, record), ("warning", text)."""
    unit, size, done = task.unit, task.shard_size, task.done
    n_shards = math.ceil(unit.rows / size)
    stats = {j: {"samples": 0, "rows": 0, "skipped": Counter()} for j in range(n_shards)}
    open_shard: dict[int, _ShardOut] = {}

    def new_shard(j: int) -> _ShardOut:
        return _ShardOut(Path(task.out_dir), shard_name(task.prefix, task.first_shard + j))

    def close_before(end: int) -> Iterator[tuple]:
        """Finish every needed shard before ``end`` not finished yet (an empty one too)."""
        nonlocal current
        for j in range(current, end):
            current = j + 1
            if j in done:
                continue
            out = open_shard.pop(j, None) or new_shard(j)
            nbytes, digest = out.finish()
            s = stats[j]
            record = {**s, "skipped": dict(sorted(s["skipped"].items())), "bytes": nbytes}
            yield "shard", out.path.name, {**record, "sha256": digest, "unit": unit.name}

    pos, pending_progress, current = 0, 0, 0
    items = iter(task.convert(unit.payload, lambda j: (j // size) not in done))
    try:
        while True:
            try:
                item = next(items)
            except StopIteration:
                break
            except READ_ERRORS as exn:
                # A damaged input (truncated parquet page, broken tar):
                # the rest of the unit is lost, counted.
                yield (
                    "warning",
                    f"{unit.name}: read error after {pos} of {unit.rows} rows "
                    f"({type(exn).__name__}: {exn}); {unit.rows - pos} rows counted as read_error",
                )
                for row in range(pos, unit.rows):
                    if row // size not in done:
                        stats[row // size]["rows"] += 1
                        stats[row // size]["skipped"]["read_error"] += 1
                        pending_progress += 1
                pos = unit.rows
                break
            if isinstance(item, Skip) and not item.row:
                j = min(pos // size, n_shards - 1)
                if n_shards and j not in done:
                    stats[j]["skipped"][item.reason] += 1
                continue
            if pos >= unit.rows:
                raise RuntimeError(
                    f"converter yielded more than the {unit.rows} planned rows of {unit.name}"
                )
            j = pos // size
            yield from close_before(j)
            pos += 1
            if j in done:
                continue
            if item is None:
                raise RuntimeError(
                    f"converter yielded no item for needed row {pos - 1} of {unit.name}"
                )
            stats[j]["rows"] += 1
            if isinstance(item, Skip):
                stats[j]["skipped"][item.reason] += 1
            else:
                key = item.get("__key__", f"{task.first_row + pos - 1:010d}")
                if j not in open_shard:
                    open_shard[j] = new_shard(j)
                open_shard[j].tar.write({**item, "__key__": _clean_key(key)})
                stats[j]["samples"] += 1
            pending_progress += 1
            if pending_progress >= 32:
                yield ("rows", pending_progress)
                pending_progress = 0
        if pos < unit.rows:
            raise RuntimeError(
                f"converter yielded {pos} of the {unit.rows} planned rows of {unit.name}"
            )
        if pending_progress:
            yield ("rows", pending_progress)
        yield from close_before(n_shards)
    finally:
        for out in open_shard.values():
            out.abandon()
        if hasattr(items, "close"):
            items.close()


_EVENTS = None


def _pool_init(events, parent: int | None = None) -> None:
    global _EVENTS
    _EVENTS = events
    if parent is not None:
        die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """Make this pool worker exit when the process that started it dies, SIGKILL included: no orphan
    keeps writing shards after its converter is gone (Linux: the kernel's parent-death signal;
    elsewhere a watchdog thread)."""
    import ctypes
    import threading

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _pool_run(task: _Task) -> None:
    try:
        for event in _run_unit(task):
            _EVENTS.put(event)
        _EVENTS.put(("done", task.unit.name))
    except BaseException:
        _EVENTS.put(("fatal", task.unit.name, traceback.format_exc()))
        raise


def _verify_entry(out_dir: Path, name: str, record: dict) -> bool:
    path = out_dir / name
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return size == record.get("bytes") and sha256_file(path) == record.get("sha256")


def write_shards(
    out_dir: str | os.PathLike,
    *,
    command: str,
    prefix: str,
    source: dict,
    units: list[Unit],
    convert: Callable,
    shard_size: int,
    workers: int = 1,
    progress: bool = True,
    pre_skipped: Counter | dict | None = None,
    files_skipped: dict | None = None,
    extra: dict | None = None,
    log=print,
) -> Summary:
    """Write (or resume writing) the shards of ``units`` into ``out_dir``; returns the summary,
    which is also printed and written to ``summary.json``. Raises :class:`ForeignOutputError`
    (touching nothing) when ``out_dir`` holds shards of another source. ``pre_skipped``: skips
    counted while planning."""
    import tqdm  # noqa: F401  (imported before the clock starts, so the rate measures conversion)
    import webdataset  # noqa: F401

    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    start = time.time()
    out = Path(out_dir)
    print_id = fingerprint(
        {
            "command": command,
            "prefix": prefix,
            "source": source,
            "shard_size": shard_size,
            "plan": [[u.name, u.rows] for u in units],
            "pre_skipped": dict(pre_skipped or {}),
            "files_skipped": files_skipped or {},
        }
    )
    old_manifest = _own_manifest(out, print_id)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        counts = [math.ceil(unit.rows / shard_size) for unit in units]
        firsts = list(accumulate(counts, initial=0))
        first_rows = list(accumulate((unit.rows for unit in units), initial=0))
        total_shards, total_rows = firsts[-1], first_rows[-1]
        names = {shard_name(prefix, i) for i in range(total_shards)}
        records = _kept_records(out, old_manifest, names, workers, progress, log)
        for stale in out.glob("*.tmp-*"):
            stale.unlink()
        manifest = {
            "format": MANIFEST_FORMAT,
            "command": command,
            "prefix": prefix,
            "fingerprint": print_id,
            "source": source,
            "shard_size": shard_size,
            "planned_shards": total_shards,
            "complete": False,
            "shards": {},
        }

        def save_manifest() -> None:
            manifest["shards"] = {k: records[k] for k in sorted(records)}
            manifest["complete"] = len(records) == total_shards
            _atomic_write_json(out / MANIFEST, manifest)

        save_manifest()
        kept = len(records)
        tasks = []
        for unit, n, first, first_row in zip(units, counts, firsts, first_rows):
            done = frozenset(j for j in range(n) if shard_name(prefix, first + j) in records)
            if len(done) < n:
                args = (convert, shard_size, str(out), prefix)
                tasks.append(_Task(unit, first, first_row, done, *args))
        kept_rows = sum(r["rows"] for r in records.values())
        converted, warnings = _convert(
            tasks, workers, records, save_manifest, command, total_rows, kept_rows, progress
        )
        summary = Summary(
            command=command,
            out=str(out),
            shards=total_shards,
            shards_kept=kept,
            shards_written=total_shards - kept,
            files_skipped=dict(files_skipped or {}),
            seconds=time.time() - start,
            rows_converted=converted,
            extra=dict(extra or {}),
        )
        summary.skipped.update(pre_skipped or {})
        for record in records.values():
            summary.written += record["samples"]
            summary.skipped.update(record["skipped"])
        if warnings:
            summary.extra["warnings"] = warnings
        _atomic_write_json(out / SUMMARY, summary.to_dict())
        log(summary.format())
        return summary
    finally:
        lock.unlink(missing_ok=True)


def _own_manifest(out: Path, print_id: str) -> dict | None:
    """The manifest of ``out`` if this run may write there; refuses a folder of another source."""
    manifest = load_manifest(out) if out.exists() else None
    if manifest is not None and manifest.get("fingerprint") != print_id:
        raise ForeignOutputError(
            f"refusing to write into {out}: its {MANIFEST} was written by `align data "
            f"{manifest.get('command')}` from a different source or with different options "
            f"(fingerprint {str(manifest.get('fingerprint'))[:12]}, this run {print_id[:12]}). "
            "Nothing was changed; use another --out, or delete the folder to start over."
        )
    if manifest is None and out.exists():
        strangers = sorted(p.name for p in out.iterdir() if p.name.endswith(".tar"))
        if strangers:
            raise ForeignOutputError(
                f"refusing to write into {out}: it holds {len(strangers)} .tar files "
                f"({strangers[0]}, ...) but no {MANIFEST}, so their source is unknown. Nothing was "
                "changed; use another --out."
            )
    return manifest


def _lock(out: Path) -> Path:
    """Take ``out/.lock`` (holding our pid); a lock held by a live process means another run is
    writing."""
    lock = out / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except PermissionError:
                pass  # alive, owned by someone else
            raise BusyOutputError(
                f"{out} is being written by process {pid} (remove {lock} if that is wrong)"
            )
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return lock
    raise BusyOutputError(f"could not take {lock}")


def _kept_records(out: Path, manifest, names: set, workers: int, progress: bool, log) -> dict:
    """The manifest's records of planned shards whose size and sha256 still verify."""
    from tqdm import tqdm

    listed = {k: v for k, v in (manifest or {}).get("shards", {}).items() if k in names}
    if not listed:
        return {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checks = pool.map(lambda kv: _verify_entry(out, *kv), listed.items())
        bar = dict(desc="verifying kept shards", unit="shard", leave=False)
        ok = list(tqdm(checks, total=len(listed), disable=not progress, **bar))
    records = {k: v for (k, v), good in zip(listed.items(), ok) if good}
    if len(records) < len(listed):
        log(
            f"{len(listed) - len(records)} shard(s) listed in {MANIFEST} failed verification; "
            "rewriting"
        )
    return records


def _convert(tasks, workers, records, save_manifest, command, total, kept, progress):
    """Run ``tasks`` (in this process, or a pool of ``workers``), entering each finished shard in
    ``records`` and saving the manifest; returns (rows converted, warnings)."""
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=kept,
        unit="row",
        desc=f"align data {command}",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.05,
    )
    converted, warnings = 0, []

    def handle(event) -> None:
        nonlocal converted
        if event[0] == "rows":
            bar.update(event[1])
            converted += event[1]
        elif event[0] == "shard":
            records[event[1]] = event[2]
            save_manifest()
        elif event[0] == "warning":
            warnings.append(event[1])
            bar.write(f"warning: {event[1]}", file=sys.stderr)

    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                for event in _run_unit(task):
                    handle(event)
        else:
            _convert_in_pool(tasks, workers, handle)
    finally:
        bar.close()
        save_manifest()
    return converted, warnings


def _convert_in_pool(tasks: list[_Task], workers: int, handle: Callable) -> None:
    # fork where there is one: workers inherit the imports (spawn re-imports align.data -> torch)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    events = ctx.Queue()
    # ProcessPoolExecutor, not Pool: a worker that dies (OOM kill) fails its future instead of
    # hanging
    with ProcessPoolExecutor(
        min(workers, len(tasks)),
        mp_context=ctx,
        initializer=_pool_init,
        initargs=(events, os.getpid()),
    ) as pool:
        futures = []
        try:
            futures = [pool.submit(_pool_run, task) for task in tasks]
            remaining = len(tasks)
            while remaining:
                try:
                    event = events.get(timeout=1.0)
                except queue_module.Empty:
                    for future in futures:
                        if future.done() and future.exception() is not None:
                            raise future.exception()
                    continue
                if event[0] == "done":
                    remaining -= 1
                elif event[0] == "fatal":
                    raise RuntimeError(f"worker failed on {event[1]}:\n{event[2]}")
                else:
                    handle(event)
        except BaseException:
            for future in futures:
                future.cancel()
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            raise


def run_command(write: Callable[[], Summary]) -> int:
    """Exit status for a converter's ``main``: 2 for a refused output folder,
    1 when nothing was written."""
    try:
        summary = write()
    except ForeignOutputError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; finished shards are kept: rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    if summary.written == 0:
        print("error: no samples were written", file=sys.stderr)
        return 1
    return 0
