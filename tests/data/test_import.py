"""`align data import`: a preference set with its own column names (jsonl with image paths, parquet
with Hugging Face image columns) becomes pair shards with Pick-a-Pic labels; unreadable choices and
images are skipped and counted."""

import importlib
import json
import tarfile

import pytest

from helpers import jpeg

main = importlib.import_module("align.data.commands.import_").main
RED, BLUE = (200, 30, 30), (30, 30, 200)


def labels(folder) -> list[tuple[str, float]]:
    found = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    found.append((meta["caption"], meta["label_0"]))
    return found


def test_jsonl_with_paths_and_named_choices(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img/a.jpg").write_bytes(jpeg(RED))
    (tmp_path / "img/b.jpg").write_bytes(jpeg(BLUE))
    rows = [
        {"prompt": "one", "left": "img/a.jpg", "right": "img/b.jpg", "winner": "right"},
        {"prompt": "two", "left": "img/a.jpg", "right": "img/b.jpg", "winner": "left"},
        {"prompt": "three", "left": "img/a.jpg", "right": "img/b.jpg", "winner": "tie"},
        {"prompt": "four", "left": "img/a.jpg", "right": "img/b.jpg", "winner": "nobody"},
        {"prompt": "five", "left": "img/missing.jpg", "right": "img/b.jpg", "winner": "left"},
    ]
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    args = ["--src", str(src), "--out", str(tmp_path / "out"), "--caption-column", "prompt"]
    args += ["--image-columns", "left", "right", "--choice-column", "winner"]
    assert main([*args, "--choice-format", "name", "--no-progress", "--workers", "1"]) == 0
    assert sorted(labels(tmp_path / "out")) == [("one", 0.0), ("three", 0.5), ("two", 1.0)]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["skipped"] == {"bad_choice": 1, "missing_image": 1, "bad_json_line": 1}


def test_parquet_with_image_dicts_and_index_choices(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "caption": ["one", "two"],
            "image_a": [{"bytes": jpeg(RED), "path": None}, {"bytes": jpeg(RED), "path": None}],
            "image_b": [{"bytes": jpeg(BLUE), "path": None}, {"bytes": jpeg(BLUE), "path": None}],
            "preferred": [1, 0],
        }
    )
    pq.write_table(table, tmp_path / "prefs.parquet")
    args = ["--src", str(tmp_path), "--out", str(tmp_path / "out"), "--caption-column", "caption"]
    args += ["--image-columns", "image_a", "image_b", "--choice-column", "preferred"]
    assert main([*args, "--choice-format", "index", "--no-progress", "--drop-ties"]) == 0
    assert labels(tmp_path / "out") == [("one", 0.0), ("two", 1.0)]
    from align.data import PickAPicDataModule

    dm = PickAPicDataModule(str(tmp_path / "out"), batch_size=2, resolution=32, num_workers=0)
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape[0] == 4


def test_no_source_fails(tmp_path):
    args = ["--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]
    args += ["--caption-column", "c", "--image-columns", "a", "b", "--choice-column", "x"]
    assert main(args) == 2
