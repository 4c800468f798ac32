"""The GPU measurement scripts stay runnable: their `align bench` lines parse, they refuse a machine
without CUDA, and the step profiler runs (on the CPU, tiny preset)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from align.commands.bench import parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_bench.sh"


def bench_lines() -> list[list[str]]:
    lines = [line.strip() for line in SCRIPT.read_text().splitlines()]
    # no "bench LIMIT"
    return [shlex.split(line, comments=True)[2:] for line in lines if re.match(r"bench \d+ ", line)]


def test_every_bench_line_of_the_gpu_script_parses():
    lines = bench_lines()
    assert len(lines) >= 12
    for args in lines:
        parser().parse_args(args)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_refuses_a_machine_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(SCRIPT), "core", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr
    assert not (tmp_path / "bench.jsonl").exists()


def _fake_cuda_python(tmp_path, imports_ok: bool = True) -> str:
    """A Python for the script that passes its CUDA check (and fails its import check if asked)."""
    shim = tmp_path / "python"
    fail_imports = "" if imports_ok else 'if [[ "$*" == *"import align.cli"* ]]; then exit 1; fi\n'
    shim.write_text(
        "#!/bin/bash\n"
        'if [[ "$*" == *cuda.is_available* ]]; then exit 0; fi\n'
        f'{fail_imports}exec {sys.executable} "$@"\n'
    )
    shim.chmod(0o755)
    return str(shim)


def _run_script(tmp_path, part: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGN": "echo", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), part, str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gpu_script_budget_skips_what_it_cannot_finish(tmp_path):
    python = _fake_cuda_python(tmp_path)
    spent = _run_script(tmp_path, "flow", PYTHON=python, BUDGET_S="0")
    assert spent.stdout.count("skipped, BUDGET_S spent") == 4
    rows = _run_script(tmp_path, "flow", PYTHON=python, BUDGET_S="600")
    assert "skipped" not in rows.stdout
    assert rows.stdout.count("echo bench --device cuda") == 4


def test_gpu_script_flux_part_measures_flux_lora_rows_then_sd35(tmp_path):
    out = _run_script(tmp_path, "flux", PYTHON=_fake_cuda_python(tmp_path))
    rows = [line for line in out.stdout.splitlines() if line.startswith("### ")]
    presets = [row.split("--preset ")[1].split()[0] for row in rows]
    assert presets == ["flux-arch"] * 3 + ["sd35-arch"]
    assert all("--lora-rank 32" in row and "--gradient-checkpointing" in row for row in rows)


def test_gpu_script_stops_when_align_does_not_import(tmp_path):
    out = _run_script(tmp_path, "goals", PYTHON=_fake_cuda_python(tmp_path, imports_ok=False))
    assert out.returncode == 3
    assert "does not import" in out.stderr


def test_profile_step_runs_on_the_tiny_preset():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "scripts/profile_step.py",
            "--preset",
            "tiny",
            "--batch",
            "1",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"per step: wall \d+\.\d ms", out.stdout)
