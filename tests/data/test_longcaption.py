"""Long-caption data: the synthetic generator, the mixing data module (skips counted per source),
and the winners-only view of Pick-a-Pic pairs for the SFT baselines."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import jpeg, pair_sample, write_tar
from PIL import Image

from align.data.longcaption import CaptionSource, LongCaptionDataModule
from align.data.synthetic import BACKGROUNDS, COLORS
from align.data.synthetic_long import CELLS, write_synthetic_longcaption
from align.data.winners import WinnersDataModule
from align.models.tokenizer import build_clip_tokenizer


def read_tar(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def near(pixels: np.ndarray, rgb, tol: float = 60.0) -> np.ndarray:
    return np.linalg.norm(pixels.astype(float) - np.array(rgb, dtype=float), axis=-1) < tol


def test_synthetic_long_captions_exceed_77_tokens_and_match_their_images(tmp_path):
    paths = write_synthetic_longcaption(tmp_path, samples=12, shards=2, resolution=96, seed=5)
    assert [p.name for p in paths] == ["longcaption-000000.tar", "longcaption-000001.tar"]
    tokenizer = build_clip_tokenizer()
    samples = {k: v for p in paths for k, v in read_tar(p).items()}
    assert len(samples) == 12
    for key, sample in samples.items():
        caption, meta = sample["txt"].decode(), json.loads(sample["json"])
        ids = tokenizer(caption, verbose=False).input_ids
        assert len(ids) > 100, key
        tail = tokenizer.decode(ids[77:])
        # the tail describes what is in the image
        assert any(o["color"] in tail for o in meta["objects"])
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        cell = 96 // 3
        used = {o["cell"] for o in meta["objects"]}
        for o in meta["objects"]:
            assert (
                f"in the {CELLS[o['cell']]} there is a" in caption
                and f"{o['size']} {o['color']} {o['shape']}" in caption
            )
            row, col = divmod(o["cell"], 3)
            region = image[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
            assert near(region, COLORS[o["color"]]).sum() > 40, (key, o)
        for c in set(range(9)) - used:  # empty cells are background
            row, col = divmod(c, 3)
            region = image[
                row * cell + 2 : (row + 1) * cell - 2, col * cell + 2 : (col + 1) * cell - 2
            ]
            assert near(region, BACKGROUNDS[meta["background"]]).mean() > 0.97, (key, c)


def long_sample(
    key: str, caption: bytes | None = b"A long caption. It has two sentences.", image=None
) -> dict:
    sample = {
        "__key__": key,
        "jpg": image if image is not None else jpeg((30, 160, 60)),
        "json": json.dumps({"source": "test"}).encode(),
    }
    if caption is not None:
        sample["txt"] = caption
    return sample


def test_missing_or_bad_captions_and_images_are_skipped_and_counted_per_source(tmp_path):
    bad = [
        long_sample("nocap", caption=None),
        long_sample("empty", caption=b"  \n"),
        long_sample("latin1", caption="caf\xe9".encode("latin-1")),
        long_sample("corrupt", image=b"\xff\xd8 no"),
        {"__key__": "noimage", "txt": b"An image that is not there."},
    ]
    # 9 samples: whole batches of 3 read them all
    good = [long_sample(f"good{i}") for i in range(4)]
    shard = write_tar(tmp_path / "mixed.tar", bad + good)
    dm = LongCaptionDataModule(
        [CaptionSource(shards=shard, name="web")],
        batch_size=3,
        resolution=16,
        num_workers=0,
        batches_per_epoch=1,
        shuffle_buffer=0,
    )
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["key"]) == ["good0", "good1", "good2"]
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["source"] == ["web"] * 3
    assert batch["caption"] == ["A long caption. It has two sentences."] * 3
    assert batch["skipped"] == {
        "web/missing_caption": 1,
        "web/empty_caption": 1,
        "web/bad_caption": 1,
        "web/corrupt_image": 1,
        "web/missing_jpg": 1,
    }


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    write_synthetic_longcaption(a, samples=8, shards=1, resolution=16, seed=1)
    write_synthetic_longcaption(b, samples=8, shards=1, resolution=16, seed=2)
    return a, b


def test_sources_are_mixed_by_weight(two_sources):
    a, b = two_sources
    sources = [
        {"shards": str(a), "weight": 3.0, "name": "a"},
        {"shards": str(b), "weight": 1.0, "name": "b"},
        {"shards": str(b), "weight": 0.0, "name": "off"},
    ]
    dm = LongCaptionDataModule(
        sources, batch_size=8, resolution=16, num_workers=0, batches_per_epoch=40
    )
    counts = Counter(s for batch in dm.train_dataloader() for s in batch["source"])
    assert set(counts) == {"a", "b"} and sum(counts.values()) == 320
    assert 0.68 < counts["a"] / 320 < 0.82  # 0.75 expected; sd 0.024
    single = LongCaptionDataModule(
        str(a), batch_size=4, resolution=16, num_workers=0, batches_per_epoch=1
    )
    assert next(iter(single.train_dataloader()))["source"] == ["default"] * 4


def test_bad_source_configs_fail_before_training(two_sources, tmp_path):
    a, _ = two_sources
    with pytest.raises(FileNotFoundError, match="nowhere-"):
        LongCaptionDataModule([{"shards": str(tmp_path / "nowhere-{0..3}.tar")}])
    with pytest.raises(ValueError, match="weight must be >= 0"):
        LongCaptionDataModule([{"shards": str(a), "weight": -1}])
    with pytest.raises(ValueError, match="weight > 0"):
        LongCaptionDataModule([{"shards": str(a), "weight": 0}])
    with pytest.raises(ValueError, match="unique"):
        LongCaptionDataModule([{"shards": str(a), "name": "x"}, {"shards": str(a), "name": "x"}])


def test_winners_are_the_preferred_images_and_ties_are_dropped(tmp_path):
    red, green, blue = (220, 30, 30), (30, 200, 30), (30, 30, 220)
    shard = write_tar(
        tmp_path / "pairs.tar",
        [
            pair_sample(
                "p0", caption="first wins", label_0=1.0, first=jpeg(red), second=jpeg(blue)
            ),
            pair_sample("p1", caption="a tie", label_0=0.5, first=jpeg(red), second=jpeg(green)),
            pair_sample(
                "p2", caption="second wins", label_0=0.0, first=jpeg(green), second=jpeg(blue)
            ),
            pair_sample(
                "p3", caption="first again", label_0=1.0, first=jpeg(red), second=jpeg(blue)
            ),
        ],
    )  # 4 pairs: whole batches of 2, so the pass reads every one
    dm = WinnersDataModule(
        shard,
        batch_size=2,
        resolution=16,
        flip_prob=0.0,
        num_workers=0,
        batches_per_epoch=1,
        shuffle_buffer=0,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["caption"] == ["first wins", "second wins"] and batch["pixel_values"].shape == (
        2,
        3,
        16,
        16,
    )
    means = (batch["pixel_values"].mean(dim=(2, 3)) + 1) * 127.5  # back to 0..255 per channel
    torch.testing.assert_close(
        means, torch.tensor([red, blue], dtype=torch.float32), atol=12, rtol=0
    )
    assert batch["skipped"] == {"tie": 1}


def test_synthetic_command_writes_longcaption_shards(tmp_path):
    from align.data.commands.synthetic import main

    assert (
        main(
            [
                "longcaption",
                "--out",
                str(tmp_path),
                "--samples",
                "6",
                "--shards",
                "2",
                "--resolution",
                "32",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "longcaption-000000.tar",
        "longcaption-000001.tar",
    ]
    assert sum(len(read_tar(p)) for p in tmp_path.glob("*.tar")) == 6
