"""`align data kto-labels`: per-image labels from pair shards,
checked against a hand-computed answer."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from align.data.commands import kto_labels, verify
from align.data.tars import iter_tar_samples

COLORS = {u: (i * 19 % 256, i * 53 % 256, i * 101 % 256) for i, u in enumerate("ABCDEFGHIJKLM")}


def jpeg(uid: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), COLORS[uid]).save(out, "JPEG")
    return out.getvalue()


def pair(n: int, a: str, b: str, label_0: float, *, uid_a=True, bytes_a=True, bytes_b=True) -> dict:
    meta = {
        "caption": f"prompt {n}",
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "image_1_uid": b,
        "model_0": f"model-{a}",
        "model_1": f"model-{b}",
        "ranking_id": n,
    }
    if uid_a:
        meta["image_0_uid"] = a
    sample = {"__key__": f"{n:06d}", "json": meta}
    if bytes_a:
        sample["jpg_0.jpg"] = jpeg(a)
    if bytes_b:
        sample["jpg_1.jpg"] = jpeg(b)
    return sample


PAIRS = [
    pair(1, "A", "B", 1.0),
    pair(2, "A", "C", 1.0),
    pair(3, "C", "D", 0.0),
    pair(4, "B", "D", 0.5),
    pair(5, "E", "F", 0.5),
    pair(6, "B", "G", 1.0),
    pair(7, "D", "A", 1.0),
    pair(8, "H", "C", 1.0, uid_a=False),  # no uid: identified by the sha1 of its JPEG bytes
    pair(9, "I", "J", 1.0, bytes_a=False),  # I has no bytes here ...
    pair(10, "K", "I", 0.5),  # ... but does here: written from this pair
    pair(11, "L", "M", 0.0, bytes_a=False),  # L never has bytes: unresolved
    pair(12, "A", "M", 0.3),  # schema violation: both slots skipped
]
H = "sha1-" + hashlib.sha1(jpeg("H")).hexdigest()
# (wins, losses, ties) by hand
COUNTS = {
    "A": (2, 1, 0),
    "B": (1, 1, 1),
    "C": (0, 3, 0),
    "D": (2, 0, 1),
    "E": (0, 0, 1),
    "F": (0, 0, 1),
    "G": (0, 1, 0),
    H: (1, 0, 0),
    "I": (1, 0, 1),
    "J": (0, 1, 0),
    "K": (0, 0, 1),
    "M": (1, 0, 0),
}
EXPECTED = {
    "preferred-once": {
        "A": True,
        "B": True,
        "D": True,
        H: True,
        "I": True,
        "M": True,
        "C": False,
        "E": False,
        "F": False,
        "G": False,
        "J": False,
        "K": False,
    },
    "always-won": {
        "D": True,
        H: True,
        "I": True,
        "M": True,
        "A": False,
        "B": False,
        "C": False,
        "E": False,
        "F": False,
        "G": False,
        "J": False,
        "K": False,
    },
    "drop-contested": {
        "D": True,
        H: True,
        "I": True,
        "M": True,
        "C": False,
        "E": False,
        "F": False,
        "G": False,
        "J": False,
        "K": False,
    },
}


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    folder = tmp_path / "pairs"
    folder.mkdir()
    for index, chunk in enumerate((PAIRS[:5], PAIRS[5:])):
        with wds.TarWriter(str(folder / f"pickapic-{index:06d}.tar"), mtime=0) as sink:
            for sample in chunk:
                sink.write(sample)
    return folder


def read_labels(out: Path) -> dict[str, tuple[dict, bytes]]:
    labels = {}
    for shard in sorted(out.glob("*.tar")):
        for key, sample in iter_tar_samples(str(shard)):
            meta = json.loads(sample["json"])
            assert meta["image_uid"] not in labels, "each image is labelled once"
            labels[meta["image_uid"]] = (meta, sample["jpg"])
    return labels


@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_policies_match_the_hand_computed_answer(shards: Path, tmp_path: Path, policy: str) -> None:
    out = tmp_path / policy
    assert (
        kto_labels.main(
            [
                "--src",
                str(shards / "pickapic-{000000..000001}.tar"),
                "--out",
                str(out),
                "--policy",
                policy,
                "--no-progress",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    labels = read_labels(out)
    assert {uid: meta["label"] for uid, (meta, _) in labels.items()} == EXPECTED[policy]
    for uid, (meta, image) in labels.items():
        assert (meta["wins"], meta["losses"], meta["ties"]) == COUNTS[uid]
        assert image == jpeg("H" if uid == H else uid)
        assert isinstance(meta["label"], bool)
    assert labels["I"][0]["caption"] == "prompt 10"  # first occurrence that has bytes
    if "A" in labels:
        assert labels["A"][0]["caption"] == "prompt 1"
    assert labels["M"][0]["model"] == "model-M"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_read"] == 24  # image slots: two per pair
    written = len(EXPECTED[policy])
    assert summary["written"] == written
    skipped = {"bad_label": 2, "unresolved_image": 1}
    if policy == "drop-contested":
        skipped["contested"] = 3 + 3  # A (3 slots), B (3 slots)
    skipped["repeat"] = 24 - written - sum(skipped.values())
    assert summary["skipped"] == skipped
    assert (
        summary["images"]["unresolved"] == 1
        and summary["pairs"] == 11
        and summary["tie_pairs"] == 3
    )
    # valid single-image shards
    assert verify.main([str(out), "--no-progress", "--workers", "1"]) == 0


def test_workers_and_resume_give_identical_output(shards: Path, tmp_path: Path) -> None:
    args = ["--src", str(shards), "--no-progress", "--shard-size", "2"]
    assert kto_labels.main([*args, "--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert kto_labels.main([*args, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.tar")}
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "b").glob("*.tar")}
    (tmp_path / "a" / sorted(first)[-2]).unlink()
    assert kto_labels.main([*args, "--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.tar")}
    # foreign
    assert kto_labels.main([*args, "--out", str(tmp_path / "a"), "--policy", "always-won"]) == 2
