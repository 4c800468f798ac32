"""`align bench` end to end on the tiny preset: a well-formed table on stdout and valid JSON records
appended."""

import json

import pytest

from align.bench.report import format_table
from align.cli import main

TIMED_KEYS = {
    "objective",
    "preset",
    "mode",
    "batch",
    "median_step_s",
    "samples_per_s",
    "images_per_s",
    "unet_flops_per_step",
    "achieved_tflops",
    "peak_tflops",
    "frac_of_peak",
    "peak_mem_mb",
    "mem_kind",
    "env",
    "argv",
    "time_utc",
}


def table_rows(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if " | " in line or "-+-" in line]
    assert lines and "-+-" in lines[1]
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header
    return [[cell.strip() for cell in line.split(" | ")] for line in lines if "-+-" not in line]


def test_bench_tiny_compare_bare_prints_a_table_and_appends_json(tmp_path, capsys):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"earlier": "record"}\n')
    assert (
        main(
            [
                "bench",
                "--preset",
                "tiny",
                "--batch",
                "1",
                "--steps",
                "3",
                "--warmup",
                "1",
                "--compare-bare",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    rows = table_rows(capsys.readouterr().out)
    header, body = rows[0], rows[1:]
    assert (
        header[:6] == ["objective", "preset", "res", "batch", "prec", "mode"]
        and "median ms" in header
    )
    assert [r[header.index("mode")] for r in body] == ["bare", "lightning"]
    assert all(len(r) == len(header) for r in body)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0] == {"earlier": "record"} and len(records) == 3  # appended, not overwritten
    bare, lit = records[1:]
    for r in (bare, lit):
        assert TIMED_KEYS <= r.keys()
        assert r["median_step_s"] > 0 and r["samples_per_s"] > 0 and r["timed_steps"] == 3
        assert r["unet_flops_per_step"] > 0 and 0 < r["frac_of_peak"] and r["peak_mem_mb"] > 0
        assert (
            r["env"]["torch"] and r["env"]["loadavg_start"] and r["argv"][:2] == ["align", "bench"]
        )
    assert "overhead_vs_bare_pct" in lit and "overhead_vs_bare_pct" not in bare
    ratio = lit["median_step_s"] / bare["median_step_s"]
    assert lit["overhead_vs_bare_pct"] == pytest.approx(100 * (ratio - 1))


def test_bench_flops_only_and_memory_estimate_tables(tmp_path, capsys):
    path = tmp_path / "b.jsonl"
    assert (
        main(
            [
                "bench",
                "--objective",
                "dpo",
                "kto",
                "--preset",
                "tiny",
                "--batch",
                "2",
                "--flops-only",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows[1:]] == ["dpo", "kto"]
    dpo, kto = [json.loads(line) for line in path.read_text().splitlines()]
    # 2 pairs = 4 images vs 2 images
    assert dpo["unet_flops_per_step"] == 2 * kto["unet_flops_per_step"]
    assert main(["bench", "--preset", "tiny", "--memory-estimate", "--json", ""]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0][0] == "objective"


def test_format_table_refuses_mixed_record_kinds():
    with pytest.raises(ValueError):
        format_table([{"mode": "flops"}, {"mode": "bare"}])
