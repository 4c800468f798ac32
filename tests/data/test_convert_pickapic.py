"""`align data pickapic`: a fabricated parquet in the Pick-a-Pic v2 schema -> pair shards."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from align.data.commands import pickapic
from align.data.schema import pair_meta_problem

SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)


def jpeg(seed: int, size=(16, 16), fmt="JPEG") -> bytes:
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def row(
    i: int, label_0=1.0, label_1=0.0, jpg_0=None, jpg_1=None, has_label=True, caption=None
) -> dict:
    return {
        "are_different": True,
        "best_image_uid": f"u{i}a" if label_0 == 1 else f"u{i}b",
        "caption": caption if caption is not None else f"a photo number {i}",
        "created_at": dt.datetime(2023, 5, 1, 12, 0, i % 60),
        "has_label": has_label,
        "image_0_uid": f"u{i}a",
        "image_0_url": f"https://x/{i}a.png",
        "image_1_uid": f"u{i}b",
        "image_1_url": f"https://x/{i}b.png",
        "jpg_0": jpeg(2 * i) if jpg_0 is None else jpg_0,
        "jpg_1": jpeg(2 * i + 1) if jpg_1 is None else jpg_1,
        "label_0": label_0,
        "label_1": label_1,
        "model_0": "sdxl",
        "model_1": "sd21",
        "ranking_id": 1000 + i,
        "user_id": 7 + i % 3,
        "num_example_per_prompt": 1,
        "__index_level_0__": i,
    }


def make_rows() -> list[dict]:
    """20 rows: 3 ties, 2 null labels, 2 corrupt JPEGs, 1 unlabeled, 1 large (downscaled) image,
    11 plain."""
    rows = []
    for i in range(20):
        if i in (3, 11, 17):
            rows.append(row(i, 0.5, 0.5))
        elif i == 5:
            rows.append(row(i, None, None))
        elif i == 14:
            rows.append(row(i, 1.0, None))
        elif i == 7:
            # truncated JPEG: header ok, data gone
            rows.append(row(i, jpg_1=jpeg(1)[:40] + b"\x00" * 20))
        elif i == 12:
            rows.append(row(i, jpg_0=b"not an image at all"))
        elif i == 9:
            rows.append(row(i, 0.0, 1.0, has_label=False))
        elif i == 2:
            rows.append(row(i, jpg_0=jpeg(99, size=(40, 24), fmt="PNG")))
        else:
            rows.append(row(i, *((0.0, 1.0) if i % 2 else (1.0, 0.0))))
    return rows


def write_parquet(path: Path, rows: list[dict], row_group_size: int) -> Path:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    rows = make_rows()
    # TWO row groups
    write_parquet(folder / "train-00000-of-00002.parquet", rows[:12], row_group_size=6)
    write_parquet(folder / "train-00001-of-00002.parquet", rows[12:], row_group_size=8)
    good = folder / "train-00001-of-00002.parquet"
    (folder / "train-00002-of-00002.parquet").write_bytes(
        good.read_bytes()[: good.stat().st_size // 2]
    )
    assert pq.ParquetFile(folder / "train-00000-of-00002.parquet").metadata.num_row_groups == 2
    return folder


def run(src: Path, out: Path, *extra: str) -> int:
    return pickapic.main(
        ["--src", str(src), "--out", str(out), "--no-progress", "--max-side", "32", *extra]
    )


def read_shard(path: Path) -> list[tuple[str, dict]]:
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
            assert member.mtime == 0 and member.uid == 0 and member.gid == 0
    return list(samples.items())


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_counts_schema_and_skips(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(src, out, "--shard-size", "4", "--workers", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_read"] == 20
    assert summary["skipped"] == {"null_label": 2, "undecodable_image": 2}
    assert summary["written"] == 16  # ties and the unlabeled row are kept without the flags
    assert summary["files_skipped"] == {"unreadable_parquet": ["train-00002-of-00002.parquet"]}
    # row groups of 6, 6 and 8 rows with 4 rows per shard -> 2 + 2 + 2 shards,
    # never crossing a row group
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["shards"] == 6 and manifest["complete"] is True
    assert [r["rows"] for _, r in sorted(manifest["shards"].items())] == [4, 2, 4, 2, 4, 4]
    samples = [s for name in sorted(manifest["shards"]) for s in read_shard(out / name)]
    assert len(samples) == 16
    for key, sample in samples:
        assert set(sample) == {"jpg_0.jpg", "jpg_1.jpg", "json"}
        meta = json.loads(sample["json"])
        assert pair_meta_problem(meta) is None
        for field in (
            "image_0_uid",
            "image_1_uid",
            "model_0",
            "model_1",
            "ranking_id",
            "user_id",
            "best_image_uid",
        ):
            assert field in meta
        for name in ("jpg_0.jpg", "jpg_1.jpg"):
            image = Image.open(io.BytesIO(sample[name]))
            assert image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= 32
    by_ranking = {json.loads(s["json"])["ranking_id"]: s for _, s in samples}
    # PNG 40x24 re-encoded
    assert Image.open(io.BytesIO(by_ranking[1002]["jpg_0.jpg"])).size == (32, 19)
    assert by_ranking[1004]["jpg_0.jpg"] == jpeg(8)  # a small JPEG passes through untouched
    assert json.loads(by_ranking[1003]["json"])["label_0"] == 0.5


def test_drop_flags(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(src, out, "--drop-ties", "--drop-unlabeled", "--workers", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"null_label": 2, "undecodable_image": 2, "tie": 3, "unlabeled": 1}
    assert summary["written"] == 12 and summary["rows_read"] == 20


def test_resume_is_byte_identical_and_keeps_finished_shards(src: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    assert run(src, clean, "--shard-size", "4", "--workers", "1") == 0
    reference = shard_bytes(clean)

    out = tmp_path / "out"
    assert run(src, out, "--shard-size", "4", "--workers", "1") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = sorted(manifest["shards"])
    # simulate a crash: the last shard never finished (no file, not in the manifest, a stray temp
    # file), a middle shard was damaged on disk after being listed
    (out / names[-1]).unlink()
    (out / f"{names[-1]}.tmp-12345").write_bytes(b"partial")
    del manifest["shards"][names[-1]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    damaged = out / names[2]
    damaged.write_bytes(damaged.read_bytes()[:-1024])
    kept = {n: (out / n).stat().st_mtime_ns for n in names[:2] + names[3:-1]}
    os.utime(out / names[0], ns=(1, 1))  # a kept shard's mtime must not change: it is not rewritten
    kept[names[0]] = 1

    assert run(src, out, "--shard-size", "4", "--workers", "2") == 0
    assert shard_bytes(out) == reference
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_kept"] == len(names) - 2 and summary["shards_written"] == 2
    assert summary["rows_read"] == 20 and summary["written"] == 16
    assert not list(out.glob("*.tmp-*"))


def test_worker_count_does_not_change_output(src: Path, tmp_path: Path) -> None:
    assert run(src, tmp_path / "one", "--workers", "1", "--shard-size", "5") == 0
    assert run(src, tmp_path / "two", "--workers", "2", "--shard-size", "5") == 0
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")


def test_foreign_output_folder_is_refused(src: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert run(src, out, "--workers", "1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other"
    other.mkdir()
    write_parquet(other / "x.parquet", [row(i) for i in range(5)], row_group_size=5)
    assert run(other, out, "--workers", "1") == 2
    assert "refusing" in capsys.readouterr().err
    assert run(src, out, "--workers", "1", "--drop-ties") == 2  # same files, different options
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "shard-000000.tar").write_bytes(b"")
    assert run(src, stranger, "--workers", "1") == 2


def test_no_images_variant(tmp_path: Path) -> None:
    rows = make_rows()[:6]
    images = tmp_path / "images"
    images.mkdir()
    for i, r in enumerate(rows):
        for side, suffix in ((0, ".jpg"), (1, ".png" if i % 2 else ".webp")):
            if i == 4 and side == 1:
                continue  # a missing image file
            Image.open(io.BytesIO(r[f"jpg_{side}"])).save(
                images / f"{r[f'image_{side}_uid']}{suffix}"
            )
        del r["jpg_0"], r["jpg_1"]
    schema = pa.schema([f for f in SCHEMA if f.name not in ("jpg_0", "jpg_1")])
    src = tmp_path / "train-no-images.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), src, row_group_size=3)
    out = tmp_path / "out"
    # needs --images-dir
    assert pickapic.main(["--src", str(src), "--out", str(out), "--no-progress"]) == 2
    assert (
        pickapic.main(
            [
                "--src",
                str(src),
                "--out",
                str(out),
                "--no-progress",
                "--workers",
                "1",
                "--images-dir",
                str(images),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"null_label": 1, "missing_image": 1}
    assert summary["written"] == 4


def test_missing_source_is_named(tmp_path: Path, capsys) -> None:
    assert pickapic.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_damaged_row_group_is_counted_and_the_rest_converted(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "damaged.parquet", make_rows(), row_group_size=10)
    chunk = next(
        c
        for c in (pq.ParquetFile(path).metadata.row_group(0).column(i) for i in range(len(SCHEMA)))
        if c.path_in_schema == "jpg_0"
    )
    data = bytearray(path.read_bytes())
    # garbage page header, footer intact
    data[chunk.data_page_offset : chunk.data_page_offset + 64] = b"\xab" * 64
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert run(path, out, "--workers", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    # rows 10..19 ok
    assert summary["skipped"] == {"read_error": 10, "null_label": 1, "undecodable_image": 1}
    assert summary["written"] == 8 and "damaged.parquet#rg0" in summary["warnings"][0]
