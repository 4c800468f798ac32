"""Long-caption converters (sam, journeydb, coco, folder) on tiny inputs in the real layouts."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from align.data.commands import coco, folder, journeydb, sam, verify
from align.data.tars import iter_tar_samples


def image(seed: int, size=(24, 16), fmt="JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, 90, 160)).save(out, fmt)
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def samples(out: Path) -> list[tuple[str, dict]]:
    return [s for shard in sorted(out.glob("*.tar")) for s in iter_tar_samples(str(shard))]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def check_valid(out: Path) -> None:
    assert verify.main([str(out), "--schema", "long", "--no-progress", "--workers", "1"]) == 0


def test_sam(tmp_path: Path) -> None:
    src, captions = tmp_path / "sa1b", tmp_path / "captions"
    src.mkdir()
    (captions / "sa_000001").mkdir(parents=True)
    with tarfile.open(src / "sa_000000.tar", "w") as tar:
        for n in (1, 2, 3, 4):
            add(tar, f"sa_{n}.jpg", image(n, (60, 40)) if n != 4 else b"\xff\xd8 broken")
            add(
                tar,
                f"sa_{n}.json",
                json.dumps({"image": {"image_id": n}, "annotations": []}).encode(),
            )
    with tarfile.open(src / "sa_000001.tar", "w") as tar:
        add(tar, "sa_5.jpg", image(5))
        add(tar, "sa_5.json", b"{}")
    (src / "sa_000002.tar").write_bytes(b"this is not a tar file at all" * 40)
    for n in (1, 2, 4):
        (captions / f"sa_{n}.txt").write_text(f"Image {n} shows a scene. It has details.\n")
    (captions / "sa_000001" / "sa_5.txt").write_text("Nested caption.")
    out = tmp_path / "out"
    assert (
        sam.main(
            [
                "--src",
                str(src),
                "--captions",
                str(captions),
                "--out",
                str(out),
                "--no-progress",
                "--workers",
                "1",
                "--shorter-side",
                "20",
            ]
        )
        == 0
    )
    got = dict(samples(out))
    assert sorted(got) == ["sa_1", "sa_2", "sa_5"]
    assert got["sa_1"]["txt"] == b"Image 1 shows a scene. It has details."
    assert Image.open(io.BytesIO(got["sa_1"]["jpg"])).size == (30, 20)  # shorter side 40 -> 20
    assert json.loads(got["sa_5"]["json"]) == {
        "source": "sa-1b",
        "image": "sa_5.jpg",
        "tar": "sa_000001.tar",
    }
    s = summary(out)
    assert s["skipped"] == {"missing_caption": 1, "undecodable_image": 1} and s["written"] == 3
    assert s["files_skipped"] == {"unreadable_tar": ["sa_000002.tar"]}
    check_valid(out)


def journeydb_annotations(path: Path, entries: list) -> Path:
    lines = [json.dumps(e) if isinstance(e, dict) else e for e in entries]
    path.write_text("\n".join(lines) + "\n")
    return path


ANNOTATIONS = [
    {
        "img_path": "./000/aaa.jpg",
        "prompt": "a red fox, detailed, 4k --ar 3:2",
        "Task2": {"Caption": "A fox."},
    },
    {"img_path": "./000/bbb.jpg", "prompt": "a blue bird", "Task2": {"Caption": "A bird."}},
    {"img_path": "./001/ccc.jpg", "prompt": "a castle", "Task2": {"Caption": "A castle."}},
    {"img_path": "./001/gone.jpg", "prompt": "never downloaded"},
    "{broken json",
    {"img_path": "./002/ddd.jpg", "prompt": ""},
]


def test_journeydb_folder(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    for rel, seed in (
        ("000/aaa.jpg", 1),
        ("000/bbb.jpg", 2),
        ("001/ccc.jpg", 3),
        ("002/ddd.jpg", 4),
    ):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(image(seed))
    anno = journeydb_annotations(tmp_path / "train_anno_realease_repath.jsonl", ANNOTATIONS)
    out = tmp_path / "out"
    assert (
        journeydb.main(
            [
                "--annotations",
                str(anno),
                "--images",
                str(images),
                "--out",
                str(out),
                "--no-progress",
                "--workers",
                "1",
                "--shard-size",
                "4",
            ]
        )
        == 0
    )
    got = samples(out)
    assert [s["txt"] for _, s in got] == [
        b"a red fox, detailed, 4k --ar 3:2",
        b"a blue bird",
        b"a castle",
    ]
    assert summary(out)["skipped"] == {
        "missing_image": 1,
        "bad_annotation": 1,
        "missing_caption": 1,
    }
    check_valid(out)
    out2 = tmp_path / "out2"
    assert (
        journeydb.main(
            [
                "--annotations",
                str(anno),
                "--images",
                str(images),
                "--out",
                str(out2),
                "--no-progress",
                "--workers",
                "1",
                "--caption-field",
                "Task2.Caption",
            ]
        )
        == 0
    )
    assert [s["txt"] for _, s in samples(out2)] == [b"A fox.", b"A bird.", b"A castle."]


def test_journeydb_archives(tmp_path: Path) -> None:
    archives = tmp_path / "imgs"
    archives.mkdir()
    with tarfile.open(archives / "000.tgz", "w:gz") as tar:
        add(tar, "000/bbb.jpg", image(2))  # archive order differs from annotation order
        add(tar, "000/zzz.jpg", image(9))  # no annotation
        add(tar, "000/aaa.jpg", image(1))
    with tarfile.open(archives / "001.tar.gz", "w:gz") as tar:
        add(tar, "./001/ccc.jpg", image(3))
    anno = journeydb_annotations(tmp_path / "anno.jsonl", ANNOTATIONS)
    out = tmp_path / "out"
    assert (
        journeydb.main(
            [
                "--annotations",
                str(anno),
                "--images",
                str(archives),
                "--out",
                str(out),
                "--no-progress",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    got = samples(out)
    assert [s["txt"] for _, s in got] == [
        b"a blue bird",
        b"a red fox, detailed, 4k --ar 3:2",
        b"a castle",
    ]
    assert [json.loads(s["json"])["img_path"] for _, s in got] == [
        "./000/bbb.jpg",
        "./000/aaa.jpg",
        "./001/ccc.jpg",
    ]
    # zzz: image without caption; gone.jpg: not in its archive; ddd.jpg: no archive 002;
    # one broken line
    assert summary(out)["skipped"] == {
        "missing_caption": 1,
        "missing_image": 2,
        "bad_annotation": 1,
    }
    check_valid(out)


def coco_layout(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "val2017"
    images.mkdir()
    for image_id in (139, 285, 632):
        (images / f"{image_id:012d}.jpg").write_bytes(image(image_id))
    data = {
        "info": {},
        "licenses": [],
        "images": [
            {"id": i, "file_name": f"{i:012d}.jpg", "height": 16, "width": 24}
            for i in (632, 139, 285, 724, 776)
        ],
        "annotations": [
            {"id": 12, "image_id": 139, "caption": "a woman  standing in a kitchen"},
            {"id": 3, "image_id": 139, "caption": "A room with a stove and a long counter top."},
            {"id": 40, "image_id": 285, "caption": "A big brown bear."},
            {"id": 41, "image_id": 632, "caption": "   "},
            # 724's file is not in the folder
            {"id": 50, "image_id": 724, "caption": "A stop sign."},
        ],
    }
    captions = tmp_path / "annotations" / "captions_val2017.json"
    captions.parent.mkdir()
    captions.write_text(json.dumps(data))
    return images, captions


def test_coco_join_longest_and_resume(tmp_path: Path) -> None:
    images, captions = coco_layout(tmp_path)
    out = tmp_path / "out"
    args = [
        "--images",
        str(images),
        "--captions",
        str(captions),
        "--no-progress",
        "--workers",
        "1",
        "--shard-size",
        "2",
    ]
    assert coco.main([*args, "--out", str(out)]) == 0
    got = dict(samples(out))
    assert sorted(got) == ["coco_139", "coco_285"]
    assert (
        got["coco_139"]["txt"]
        == b"A room with a stove and a long counter top. a woman standing in a kitchen."
    )
    assert json.loads(got["coco_285"]["json"]) == {
        "source": "coco",
        "image_id": 285,
        "file_name": "000000000285.jpg",
    }
    # 632 blank, 776 none; 724
    assert summary(out)["skipped"] == {"missing_caption": 2, "missing_image": 1}
    check_valid(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert coco.main([*args, "--out", str(out)]) == 0  # a finished run resumes to a no-op
    assert summary(out)["shards_kept"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before

    longest = tmp_path / "longest"
    assert coco.main([*args, "--out", str(longest), "--caption-mode", "longest"]) == 0
    assert (
        dict(samples(longest))["coco_139"]["txt"] == b"A room with a stove and a long counter top."
    )


def test_folder(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(image(1))
    (images / "sub" / "b.png").write_bytes(image(2, fmt="PNG"))
    (images / "c.webp").write_bytes(image(3, fmt="WEBP"))
    (images / "notes.txt").write_text("not an image")
    lines = [
        {"file": "a.jpg", "caption": "First. Long caption."},
        {"file": "./sub/b.png", "caption": "Second."},
        {"file": "d.jpg", "caption": "no such image"},
        {"file": "a.jpg", "caption": "a repeat"},
        "{oops",
    ]
    caps = tmp_path / "captions.jsonl"
    caps.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines))
    out = tmp_path / "out"
    assert (
        folder.main(
            [
                "--images",
                str(images),
                "--captions",
                str(caps),
                "--out",
                str(out),
                "--no-progress",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    got = samples(out)
    assert [(json.loads(s["json"])["file"], s["txt"]) for _, s in got] == [
        ("a.jpg", b"First. Long caption."),
        ("sub/b.png", b"Second."),
    ]
    assert Image.open(io.BytesIO(got[1][1]["jpg"])).format == "JPEG"  # PNG re-encoded
    assert summary(out)["skipped"] == {
        "missing_caption": 1,
        "missing_image": 1,
        "duplicate_caption": 1,
        "bad_caption_line": 1,
    }
    check_valid(out)
