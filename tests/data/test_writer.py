"""align.data.writer: deterministic partitioning, atomic shards, manifest, resume,
foreign folders; read back."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from align.data import tars, writer
from align.data.writer import ForeignOutputError, Skip, Unit, write_shards

CONVERTED: list[str] = []


class Crash(Exception):
    """Stands in for the process dying mid-unit."""


def toy_convert(payload, need):
    """Rows are strings: "skip:<reason>", "extra:<reason>" (not a row), "ioerror", "crash",
    or a sample text."""
    j = 0
    for value in payload:
        if value.startswith("extra:"):
            yield Skip(value[6:], row=False)
            continue
        if value == "ioerror":
            raise OSError("damaged input")
        if not need(j):
            yield None
        elif value == "crash":
            raise Crash()
        elif value == "die":
            os._exit(3)  # a worker killed from outside (OOM)
        elif value.startswith("skip:"):
            yield Skip(value[5:])
        else:
            CONVERTED.append(value)
            yield {"txt": value, "json": {"value": value}}
        j += 1


def units(*payloads: list[str]) -> list[Unit]:
    return [
        Unit(f"u{i}", sum(not v.startswith("extra:") for v in p), p) for i, p in enumerate(payloads)
    ]


def write(out: Path, plan: list[Unit], shard_size=3, source=None, **kw):
    return write_shards(
        out,
        command="toy",
        prefix="toy",
        source=source or {"inputs": "a"},
        units=plan,
        convert=toy_convert,
        shard_size=shard_size,
        progress=False,
        log=lambda *_: None,
        **kw,
    )


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


PLAN = (
    ["a", "b", "skip:tie", "c", "d"],
    ["e", "extra:no_caption", "f", "g", "h", "i", "j", "k"],
    [],
    ["skip:bad", "skip:bad"],
)


def test_partition_within_units_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = write(out, units(*PLAN))
    manifest = json.loads((out / "manifest.json").read_text())
    names = sorted(manifest["shards"])
    # unit rows 5, 7, 0, 2 with 3 per shard -> 2 + 3 + 0 + 1 shards, numbered in plan order
    assert names == [f"toy-{i:06d}.tar" for i in range(6)]
    assert [manifest["shards"][n]["rows"] for n in names] == [3, 2, 3, 3, 1, 2]
    assert [manifest["shards"][n]["samples"] for n in names] == [2, 2, 3, 3, 1, 0]
    assert manifest["shards"][names[2]]["skipped"] == {"no_caption": 1}
    assert manifest["complete"] is True
    assert summary.written == 11 and dict(summary.skipped) == {"tie": 1, "no_caption": 1, "bad": 2}
    assert summary.rows_read == 15
    assert json.loads((out / "summary.json").read_text())["skipped_total"] == 4
    for name in names:
        record = manifest["shards"][name]
        assert (
            tars.sha256_file(out / name) == record["sha256"]
            and (out / name).stat().st_size == record["bytes"]
        )
        for member in members(out / name):
            assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o444)
    # all rows skipped: a valid, empty shard keeps the numbering
    assert members(out / names[5]) == []
    keys = [m.name for m in members(out / names[0])]
    assert keys == ["0000000000.json", "0000000000.txt", "0000000001.json", "0000000001.txt"]
    # global row index keys
    assert [m.name for m in members(out / names[1])][0] == "0000000003.json"


def test_crash_then_resume_is_byte_identical_and_skips_done_work(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    write(clean, units(*PLAN))
    reference = {p.name: p.read_bytes() for p in clean.glob("*.tar")}

    crashing = [list(p) for p in PLAN]
    crashing[1][6] = "crash"  # row j: dies while shard 3 (rows h, i, j) is half written
    out = tmp_path / "out"
    with pytest.raises(Crash):
        write(out, units(*crashing))
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["toy-000000.tar", "toy-000001.tar", "toy-000002.tar"]
    assert manifest["complete"] is False
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == sorted(manifest["shards"])
    assert not list(out.glob("*.tmp-*"))  # the half-written shard was never renamed into place

    CONVERTED.clear()
    summary = write(out, units(*PLAN))  # same plan (same fingerprint): resume
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == reference
    assert CONVERTED == ["h", "i", "j", "k"]  # rows of kept shards were not converted again
    assert summary.shards_kept == 3 and summary.shards_written == 3
    assert summary.written == 11 and summary.rows_read == 15  # totals include the kept shards


def test_read_error_counts_the_rest_of_the_unit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = write(out, units(["a", "b", "c", "d", "ioerror", "x", "y"]))
    assert summary.written == 4 and summary.skipped["read_error"] == 3
    assert summary.extra["warnings"] and "damaged input" in summary.extra["warnings"][0]


def test_wrong_row_count_is_a_bug_not_a_skip(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="planned rows"):
        write(tmp_path / "a", [Unit("u", 3, ["a", "b"])])
    with pytest.raises(RuntimeError, match="planned rows"):
        write(tmp_path / "b", [Unit("u", 1, ["a", "b"])])


def test_foreign_and_unknown_folders_are_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write(out, units(*PLAN))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ForeignOutputError, match="different source"):
        write(out, units(*PLAN), source={"inputs": "b"})
    with pytest.raises(ForeignOutputError):
        write(out, units(*PLAN), shard_size=4)
    with pytest.raises(ForeignOutputError):
        write(out, units(["a"]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "data-000000.tar").write_bytes(b"x")
    with pytest.raises(ForeignOutputError, match="no manifest"):
        write(loose, units(*PLAN))


def test_workers_give_identical_shards(tmp_path: Path) -> None:
    write(tmp_path / "one", units(*PLAN), workers=1)
    write(tmp_path / "three", units(*PLAN), workers=3)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").glob("*.tar")}
    assert one == {p.name: p.read_bytes() for p in (tmp_path / "three").glob("*.tar")}


def test_a_dead_worker_fails_the_run_instead_of_hanging(tmp_path: Path) -> None:
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        write(tmp_path / "out", units(["a", "b"], ["c", "die", "d"]), workers=2)
    # same plan (names and row counts), the input now readable: the resume cleans up and completes
    write(tmp_path / "out", units(["a", "b"], ["c", "x", "d"]), workers=2)
    write(tmp_path / "clean", units(["a", "b"], ["c", "x", "d"]), workers=1)
    assert not list((tmp_path / "out").glob("*.tmp-*"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")} == {
        p.name: p.read_bytes() for p in (tmp_path / "clean").glob("*.tar")
    }


def test_expand_and_read_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write(out, units(*PLAN))
    paths, missing = tars.expand_shard_paths(
        [
            str(out / "toy-{000000..000002}.tar"),
            str(out / "toy-00000[45].tar"),
            str(tmp_path / "nope-*.tar"),
        ]
    )
    assert [Path(p).name for p in paths] == [
        "toy-000000.tar",
        "toy-000001.tar",
        "toy-000002.tar",
        "toy-000004.tar",
        "toy-000005.tar",
    ]
    assert missing == [str(tmp_path / "nope-*.tar")]
    assert len(tars.expand_shard_paths([str(out)])[0]) == 6
    samples = list(tars.iter_tar_samples(paths[0]))
    assert [k for k, _ in samples] == ["0000000000", "0000000001"]
    assert samples[0][1] == {"json": b'{"value": "a"}', "txt": b"a"}
    lazy = list(tars.iter_tar_samples(paths[0], fields=lambda f: f == "txt"))
    assert lazy[1][1] == {"json": None, "txt": b"b"}


def test_a_folder_being_written_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as other:
        try:
            (out / ".lock").write_text(str(other.pid))
            with pytest.raises(writer.BusyOutputError, match=str(other.pid)):
                write(out, units(*PLAN))
        finally:
            other.kill()
    other.wait()
    write(out, units(*PLAN))  # the lock of a dead process is stale: taken over
    assert not (out / ".lock").exists() and (out / "manifest.json").exists()


def test_pool_workers_die_with_their_converter(tmp_path):
    """SIGKILL of a converter's main process takes its pool workers with it
    (no orphan writes on)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import multiprocessing as mp, os, time
from concurrent.futures import ProcessPoolExecutor
from align.data.writer import die_with_parent

def work(_):
    open({str(tmp_path / "worker.pid")!r}, 'w').write(str(os.getpid()))
    time.sleep(120)

if __name__ == '__main__':
    with ProcessPoolExecutor(1, mp_context=mp.get_context('fork'), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pool.submit(work, 0).result()
"""
    parent = subprocess.Popen([sys.executable, "-c", script])
    pid_file = tmp_path / "worker.pid"
    deadline = time.time() + 60
    while not pid_file.is_file() and time.time() < deadline:
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            state = open(f"/proc/{pid}/status").read().split("State:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state not in ("Z", "X")

    deadline = time.time() + 10
    while alive(worker) and time.time() < deadline:
        time.sleep(0.2)
    if alive(worker):
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the pool worker outlived its parent")
