"""align data relabel: pairs re-labelled by a reward's preference, human labels kept,
shards otherwise intact."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from helpers import jpeg, pair_sample, write_tar
from PIL import Image

from align.cli import main as align


def read_tar(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, field = info.name.partition(".")
            samples.setdefault(key, {})[field] = tar.extractfile(info).read()
    return samples


@pytest.fixture()
def shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    colors = [
        (200, 30, 30),
        (30, 200, 30),
        (30, 30, 200),
        (240, 240, 20),
        (10, 10, 10),
        (128, 0, 255),
    ]
    good = [
        pair_sample(
            f"{i:06d}",
            caption=c,
            label_0=l,
            first=jpeg(colors[i], (48, 40)),
            second=jpeg(colors[-1 - i], (40, 48)),
            ranking_id=i,
        )
        for i, (c, l) in enumerate(
            [("a red square", 1.0), ("a green dog", 0.0), ("a blue sky", 0.5)]
        )
    ]
    bad_label = pair_sample("000003", label_0=0.3)
    broken = pair_sample("000004", first=b"not a jpeg")
    write_tar(src / "pairs-000000.tar", good[:2] + [bad_label])
    write_tar(src / "pairs-000001.tar", [good[2], broken])
    return src


def test_relabel_by_pickscore(shards, tmp_path, tiny_rewards):
    from align.rewards import build_reward

    out = tmp_path / "out"
    source = str(tiny_rewards["pickscore"])
    assert (
        align(
            [
                "data",
                "relabel",
                "--reward",
                "pickscore",
                "--reward-source",
                source,
                "--src",
                str(shards),
                "--out",
                str(out),
                "--batch-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((out / "relabel_summary.json").read_text())
    assert summary["relabelled"] == 3 and summary["shards"] == 2
    assert summary["skipped_bad_label"] == 1 and summary["skipped_unreadable_image"] == 1

    reward = build_reward("pickscore", source)
    for name in ("pairs-000000.tar", "pairs-000001.tar"):
        before, after = read_tar(shards / name), read_tar(out / name)
        assert set(after) <= set(before)
        for key, fields in after.items():
            old, new = json.loads(before[key]["json"]), json.loads(fields["json"])
            assert fields["jpg_0.jpg"] == before[key]["jpg_0.jpg"]  # images copied byte for byte
            assert fields["jpg_1.jpg"] == before[key]["jpg_1.jpg"]
            images = [
                Image.open(io.BytesIO(fields[f])).convert("RGB") for f in ("jpg_0.jpg", "jpg_1.jpg")
            ]
            s0, s1 = reward.score(images, [old["caption"]] * 2).tolist()
            assert new["label_0"] == (1.0 if s0 > s1 else 0.0 if s1 > s0 else 0.5)
            assert new["label_0"] + new["label_1"] == 1.0
            assert (new["human_label_0"], new["human_label_1"]) == (old["label_0"], old["label_1"])
            assert new["ai_feedback"]["reward"] == "pickscore"
            assert new["ai_feedback"]["score_0"] == pytest.approx(s0, rel=1e-4)
            assert new["ranking_id"] == old["ranking_id"] and new["caption"] == old["caption"]

    # relabelling relabelled shards keeps the *human* label, and the output reads as ordinary pairs
    again = tmp_path / "again"
    assert (
        align(
            [
                "data",
                "relabel",
                "--reward",
                "clip",
                "--reward-source",
                str(tiny_rewards["clip"]),
                "--src",
                str(out / "pairs-*.tar"),
                "--out",
                str(again),
                "--no-progress",
            ]
        )
        == 0
    )
    for key, fields in read_tar(again / "pairs-000000.tar").items():
        meta = json.loads(fields["json"])
        assert (
            meta["human_label_0"]
            == json.loads(read_tar(shards / "pairs-000000.tar")[key]["json"])["label_0"]
        )
        assert meta["ai_feedback"]["reward"] == "clip"

    from align.data.pickapic import decode_pair
    from align.data.transforms import ImageTransform

    sample = {"__key__": "000000", **read_tar(out / "pairs-000000.tar")["000000"]}
    decoded = decode_pair(
        sample, ImageTransform(resolution=32), drop_ties=False, joint_augment=False
    )
    assert decoded["caption"] == "a red square" and decoded["pixel_values"].shape == (2, 3, 32, 32)


def test_relabel_refuses_to_overwrite_and_bad_sources(shards, tmp_path, tiny_rewards, capsys):
    assert (
        align(
            ["data", "relabel", "--reward", "pickscore", "--src", str(shards), "--out", str(shards)]
        )
        == 2
    )
    assert "must differ" in capsys.readouterr().err
    assert (
        align(
            [
                "data",
                "relabel",
                "--reward",
                "pickscore",
                "--src",
                str(tmp_path / "none-*.tar"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no shards" in capsys.readouterr().err
    assert (
        align(
            [
                "data",
                "relabel",
                "--reward",
                "hps",
                "--reward-source",
                str(tmp_path),
                "--src",
                str(shards),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "HPS_v2.1_compressed.pt" in capsys.readouterr().err
