"""`align data verify`: good shards pass; corrupt members, schema violations and damaged tars fail;
latent caches (`align data cache-latents`) are checked as cached shards."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from align.data.cached import npy_bytes
from align.data.commands import verify
from align.data.tars import iter_tar_samples
from align.data.writer import Unit, write_shards
from helpers import run_cache


def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (seed % 256, 40, 90)).save(out, "JPEG")
    return out.getvalue()


def pair(i: int, **meta) -> dict:
    return {
        "__key__": f"{i:06d}",
        "jpg_0.jpg": jpeg(i),
        "jpg_1.jpg": jpeg(i + 100),
        "json": {
            "caption": f"cap {i}",
            "label_0": 1.0,
            "label_1": 0.0,
            "image_0_uid": f"a{i}",
            **meta,
        },
    }


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def run(*args: str) -> int:
    return verify.main([*map(str, args), "--no-progress", "--workers", "1"])


def test_good_shards_of_each_schema_pass(tmp_path: Path, capsys) -> None:
    write_tar(tmp_path / "pairs-000000.tar", [pair(i) for i in range(3)])
    write_tar(tmp_path / "pairs-000001.tar", [pair(i) for i in range(3, 5)])
    write_tar(
        tmp_path / "single.tar",
        [
            {
                "__key__": "u1",
                "jpg": jpeg(1),
                "json": {"caption": "c", "label": True, "image_uid": "u1", "wins": 1, "losses": 0},
            }
        ],
    )
    write_tar(
        tmp_path / "long.tar",
        [
            {
                "__key__": "sa_1",
                "jpg": jpeg(2),
                "txt": "A long caption. Two.",
                "json": {"source": "sa-1b"},
            }
        ],
    )
    assert run(tmp_path / "pairs-{000000..000001}.tar") == 0
    assert "5 samples, 0 bad samples" in capsys.readouterr().out
    assert run(tmp_path / "single.tar", tmp_path / "long.tar") == 0
    assert "{'single': 1, 'long': 1}" in capsys.readouterr().out
    assert run(tmp_path / "single.tar", "--schema", "pair") == 1  # forced schema is enforced


def test_corrupt_image_and_schema_violations_fail(tmp_path: Path, capsys) -> None:
    bad_image = pair(1)
    bad_image["jpg_1.jpg"] = bad_image["jpg_1.jpg"][:60]
    missing = pair(2)
    del missing["jpg_0.jpg"]
    samples = [pair(0), bad_image, missing, pair(3, label_0=0.3, label_1=0.7), pair(4)]
    samples[4]["json"] = "{not json"
    write_tar(tmp_path / "bad.tar", samples)
    report = tmp_path / "report.json"
    assert run(tmp_path / "bad.tar", "--report", report) == 1
    out = capsys.readouterr().out
    assert "000001: corrupt_image: jpg_1.jpg" in out
    data = json.loads(report.read_text())
    assert data["problems"] == {
        "corrupt_image": 1,
        "missing_jpg_0.jpg": 1,
        "bad_label": 1,
        "bad_json": 1,
    }
    assert data["samples"] == 5 and data["bad_samples"] == 4


@pytest.mark.parametrize(
    "sample",
    [
        pair(0, caption="   "),
        {
            "__key__": "u1",
            "jpg": jpeg(1),
            "json": {"caption": "", "label": True, "image_uid": "u1", "wins": 1, "losses": 0},
        },
        {"__key__": "sa_1", "jpg": jpeg(2), "txt": " \n", "json": {"source": "sa-1b"}},
    ],
)
def test_blank_captions_training_would_skip_are_reported(tmp_path: Path, capsys, sample) -> None:
    write_tar(tmp_path / "blank.tar", [sample])
    assert run(tmp_path / "blank.tar") == 1
    assert "empty_caption" in capsys.readouterr().out


def test_truncated_tar_and_checksum_mismatch_fail(tmp_path: Path, capsys) -> None:
    tar = write_tar(tmp_path / "x-000000.tar", [pair(i) for i in range(4)])
    data = tar.read_bytes()
    (tmp_path / "cut-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    assert run(tmp_path / "cut-000000.tar") == 1
    assert "corrupt_tar" in capsys.readouterr().out

    def convert(payload, need):
        yield from (pair(i) for i in payload)

    out = tmp_path / "shards"
    write_shards(
        out,
        command="t",
        prefix="p",
        source={},
        units=[Unit("u", 3, [0, 1, 2])],
        convert=convert,
        shard_size=10,
        progress=False,
        log=lambda *_: None,
    )
    assert run(out) == 0
    shard = out / "p-000000.tar"
    blob = bytearray(shard.read_bytes())
    at = blob.index(b"cap 1")
    blob[at : at + 5] = b"cap 9"  # still a valid sample, but not what the converter wrote
    shard.write_bytes(bytes(blob))
    assert run(out / "p-*.tar") == 1
    assert "checksum_mismatch" in capsys.readouterr().out


def test_nothing_to_verify(tmp_path: Path) -> None:
    assert run(tmp_path / "none-*.tar") == 2


# ------------------------------------------------------------------------------------ latent caches


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Caches made by the real `align data cache-latents` with the tiny model: 3 pairs with
    --flip in two shards (float32), 2 long captions in one (float16, the default)."""
    root = tmp_path_factory.mktemp("verify-caches")
    write_tar(root / "pairs.tar", [pair(i) for i in range(3)])
    write_tar(
        root / "long.tar",
        [
            {
                "__key__": f"l{i}",
                "jpg": jpeg(i),
                "txt": f"A long caption {i}. Two.",
                "json": {"source": "sa-1b"},
            }
            for i in range(2)
        ],
    )
    assert (
        run_cache(
            "--model",
            "tiny",
            "--shards",
            root / "pairs.tar",
            "--out",
            root / "pairs-cache",
            "--flip",
            "--store-dtype",
            "float32",
            "--shard-size",
            2,
        )
        == 0
    )
    assert (
        run_cache("--model", "tiny", "--shards", root / "long.tar", "--out", root / "long-cache")
        == 0
    )
    return root / "pairs-cache", root / "long-cache"


def edit_sample(shard: Path, key: str, edit) -> None:
    """Rewrite ``shard`` with ``edit(sample)`` applied to sample ``key``
    (its manifest keeps the old sha256)."""
    samples = [{"__key__": k, **sample} for k, sample in iter_tar_samples(str(shard))]
    (target,) = [s for s in samples if s["__key__"] == key]
    edit(target)
    write_tar(shard, samples)


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False).copy()


def test_latent_caches_are_checked_as_cached_shards(caches, tmp_path: Path, capsys) -> None:
    pairs, long = caches
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert run(pairs, long, "--report", report) == 0
    assert "verified 3 shards ({'cached': 3}): 5 samples, 0 bad samples" in capsys.readouterr().out
    assert [
        (Path(r["shard"]).parent.name, r["cache_schema"])
        for r in json.loads(report.read_text())["shards"]
    ] == [("pairs-cache", "pair"), ("pairs-cache", "pair"), ("long-cache", "long")]
    assert run(long, "--schema", "cached") == 0
    # a shard copied alone (no manifest, no uncond.npy): recognised by its members,
    # checked against itself
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(pairs / "cache-000000.tar", alone)
    assert run(alone) == 0 and "{'cached': 1}" in capsys.readouterr().out
    # image shards are unchanged: auto still says pair; forced cached,
    # a pair shard has none of the tensors
    write_tar(tmp_path / "raw.tar", [pair(0)])
    assert run(tmp_path / "raw.tar") == 0 and "{'pair': 1}" in capsys.readouterr().out
    assert run(tmp_path / "raw.tar", "--schema", "cached") == 1
    assert "missing_embeds.npy" in capsys.readouterr().out


def test_corrupt_cached_pairs_are_named(caches, tmp_path: Path, capsys) -> None:
    bad = shutil.copytree(caches[0], tmp_path / "bad")

    def nan_embeds(sample):
        embeds = npy(sample["embeds.npy"])
        embeds[3, 5] = np.nan
        sample["embeds.npy"] = npy_bytes(embeds)

    def truncate(sample):
        sample["moments_1.npy"] = sample["moments_1.npy"][:-10]

    def drop_flip_and_shrink(sample):
        del sample["moments_0_flip.npy"]
        sample["moments_1.npy"] = npy_bytes(npy(sample["moments_1.npy"])[:, ::2, ::2])

    edit_sample(bad / "cache-000000.tar", "000000", nan_embeds)
    edit_sample(bad / "cache-000000.tar", "000001", truncate)
    edit_sample(bad / "cache-000001.tar", "000002", drop_flip_and_shrink)
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert run(bad, "--report", report) == 1
    out = capsys.readouterr().out
    assert "000000: non_finite: embeds.npy: 1 of 2464 values are NaN or infinite" in out
    assert "000001: bad_npy: moments_1.npy: ValueError: EOF" in out
    assert "000002: shape_mismatch: moments_1.npy: (8, 8, 8); sample 000002 has (8, 16, 16)" in out
    data = json.loads(report.read_text())
    assert data["problems"] == {
        "non_finite": 1,
        "bad_npy": 1,
        "missing_moments_0_flip.npy": 1,
        "shape_mismatch": 1,
        "checksum_mismatch": 2,
    }
    assert data["samples"] == 3 and data["bad_samples"] == 3


def test_unfinished_or_inconsistent_long_caption_cache_fails(
    caches, tmp_path: Path, capsys
) -> None:
    bad = shutil.copytree(caches[1], tmp_path / "bad")
    (bad / "uncond.npy").unlink()  # an interrupted run: training refuses the folder

    def float32(sample):
        sample["moments.npy"] = npy_bytes(npy(sample["moments.npy"]).astype(np.float32))

    def other_resolution(sample):
        meta = json.loads(sample["json"])
        meta["cache"]["resolution"] = 64
        sample["json"] = json.dumps(meta).encode()

    edit_sample(bad / "cache-000000.tar", "l0", float32)
    edit_sample(bad / "cache-000000.tar", "l1", other_resolution)
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert run(bad, "--report", report) == 1
    out = capsys.readouterr().out
    assert "-: missing_uncond: no uncond.npy beside the shard" in out
    assert "l0: wrong_dtype: moments.npy: float32, the cache stores float16" in out
    assert "l1: cache_settings_mismatch: resolution: 64 here, 32 in manifest.json" in out
    data = json.loads(report.read_text())
    assert data["problems"] == {
        "missing_uncond": 1,
        "wrong_dtype": 1,
        "cache_settings_mismatch": 1,
        "checksum_mismatch": 1,
    }
    assert data["bad_samples"] == 2
