import json

import pytest
import torch
from helpers import jpeg, pair_sample, single_sample, write_tar

from align.data.pickapic import PickAPicDataModule, collate_pairs, decode_pair
from align.data.pipeline import SkipSample, expand_shards
from align.data.transforms import ImageTransform

T = ImageTransform(16, crop="center", flip_prob=0.0)


def decode(sample, drop_ties=True):
    return decode_pair(sample, T, drop_ties=drop_ties, joint_augment=True)


def test_winner_goes_first_whatever_its_column():
    red, blue = jpeg((250, 0, 0)), jpeg((0, 0, 250))
    a = decode(pair_sample("a", label_0=1.0, first=red, second=blue))
    b = decode(pair_sample("b", label_0=0.0, first=blue, second=red))
    for out in (a, b):  # the red image won both times
        assert out["pixel_values"][0, 0].mean() > 0.5 and out["pixel_values"][1, 2].mean() > 0.5


def test_ties_dropped_by_default_and_kept_on_request():
    tie = pair_sample("t", label_0=0.5)
    with pytest.raises(SkipSample, match="tie"):
        decode(tie)
    assert decode(tie, drop_ties=False)["label"] == 0.5


@pytest.mark.parametrize(
    "sample,reason",
    [
        (pair_sample("c", first=b"\xff\xd8 not a jpeg"), "corrupt_image"),
        ({k: v for k, v in pair_sample("m").items() if k != "jpg_1.jpg"}, "missing_jpg_1"),
        (pair_sample("l", label_0=0.7, label_1=0.3), "bad_label"),
        (pair_sample("l2", label_0=2.0, label_1=-1.0), "bad_label"),
        (pair_sample("e", caption="   "), "empty_caption"),
        ({**pair_sample("j"), "json": b"{not json"}, "bad_json"),
        ({k: v for k, v in pair_sample("n").items() if k != "json"}, "missing_json"),
    ],
)
def test_bad_samples_raise_a_named_skip(sample, reason):
    with pytest.raises(SkipSample) as err:
        decode(sample)
    assert err.value.reason == reason


def test_collate_puts_all_winners_before_all_losers():
    samples = [
        decode(
            pair_sample(
                str(i), label_0=1.0, first=jpeg((10 * i, 0, 0)), second=jpeg((0, 0, 10 * i))
            )
        )
        for i in range(1, 4)
    ]
    batch = collate_pairs(samples)
    assert batch["pixel_values"].shape == (6, 3, 16, 16)
    for i, s in enumerate(samples):
        assert torch.equal(batch["pixel_values"][i], s["pixel_values"][0])
        assert torch.equal(batch["pixel_values"][3 + i], s["pixel_values"][1])
    assert batch["original_size"].shape == (6, 2) and batch["original_size"][0].tolist() == [32, 40]


def test_pipeline_skips_counts_and_goes_on(tmp_path, caplog):
    good = [pair_sample(f"g{i}") for i in range(6)]
    bad = [
        pair_sample("c", first=b"garbage"),
        pair_sample("t", label_0=0.5),
        pair_sample("e", caption=""),
        pair_sample("l", label_0=3.0, label_1=-2.0),
    ]
    write_tar(tmp_path / "a.tar", good[:3] + bad)
    write_tar(tmp_path / "b.tar", good[3:])
    (tmp_path / "c.tar").write_bytes(b"this is not a tar file at all" * 10)
    dm = PickAPicDataModule(
        str(tmp_path / "*.tar"),
        batch_size=2,
        resolution=16,
        num_workers=0,
        batches_per_epoch=6,
        shuffle_buffer=0,
    )
    assert "c.tar" in caplog.text  # an unreadable shard is named at start and left out of the plan
    batches = list(dm.train_dataloader())
    assert len(batches) == 6  # the loader repeats its range after skips to fill the epoch
    totals = {}
    for b in batches:
        for k, v in b["skipped"].items():
            totals[k] = totals.get(k, 0) + v
    for reason in ("corrupt_image", "tie", "empty_caption", "bad_label", "repeated_to_fill"):
        assert totals.get(reason, 0) >= 1, (reason, totals)
    keys = {k for b in batches for k in b["key"]}
    assert keys <= {f"g{i}" for i in range(6)}


def test_missing_shards_fail_at_start_naming_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        PickAPicDataModule(str(tmp_path / "nothing-here-{000..003}.tar"))


def test_expand_shards_handles_braces_globs_and_dirs(pair_shards):
    by_dir = expand_shards(str(pair_shards))
    by_brace = expand_shards(str(pair_shards / "pairs-{000000..000003}.tar"))
    by_glob = expand_shards(str(pair_shards / "pairs-*.tar"))
    assert by_dir == by_brace == by_glob and len(by_dir) == 4


def test_each_rank_reads_a_disjoint_slice_and_equal_batches(pair_shards, monkeypatch):
    seen, counts = [], []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = PickAPicDataModule(
            str(pair_shards), batch_size=2, resolution=16, num_workers=0, batches_per_epoch=5
        )
        batches = list(dm.train_dataloader())
        counts.append(len(batches))
        seen.append({int(k) // 16 for b in batches for k in b["key"]})  # 16 pairs per shard
    assert counts == [5, 5]
    assert seen[0].isdisjoint(seen[1])


def test_fewer_shards_than_ranks_still_give_every_rank_its_own_pairs(pair_shards, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "5")
    keys = []
    for rank in range(5):
        monkeypatch.setenv("RANK", str(rank))
        dm = PickAPicDataModule(
            str(pair_shards), batch_size=2, resolution=16, num_workers=0, drop_ties=False
        )
        keys.append({k for b in dm.train_dataloader() for k in b["key"]})
    # 4 shards, 5 ranks, disjoint
    assert all(keys) and sum(map(len, keys)) == len(set().union(*keys))


def test_too_few_samples_for_the_ranks_is_a_clear_error_at_start(pair_shards, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "5000")
    dm = PickAPicDataModule(str(pair_shards), batch_size=2, resolution=16, num_workers=0)
    with pytest.raises(ValueError, match="cannot give one batch of 2 to each of 5000 rank"):
        dm.train_dataloader()


def test_sdxl_crop_coordinates_are_carried():
    t = ImageTransform(16, crop="random", flip_prob=0.0)
    out = decode_pair(
        pair_sample("s", first=jpeg(size=(64, 32)), second=jpeg(size=(64, 32))), t, True, True
    )
    assert out["original_size"].tolist() == [[32, 64], [32, 64]]
    top, left = out["crop_top_left"][0].tolist()
    assert top == 0 and 0 <= left <= 16
    assert out["crop_top_left"][0].tolist() == out["crop_top_left"][1].tolist()  # joint augment
    json.dumps(out["crop_top_left"].tolist())


def test_shards_with_no_usable_sample_fail_naming_the_skips_instead_of_looping(tmp_path):
    """The wrong schema (single images where pairs are expected) or only unreadable files: one pass
    over the shards finds nothing to train on, and the error says what was skipped
    (it used to skip forever)."""
    (tmp_path / "wrong").mkdir()
    write_tar(tmp_path / "wrong" / "a.tar", [single_sample(f"s{i}") for i in range(5)])
    dm = PickAPicDataModule(
        str(tmp_path / "wrong"), batch_size=2, resolution=16, num_workers=0, batches_per_epoch=3
    )
    with pytest.raises(RuntimeError, match=r"no usable sample .* 1 shard.*'missing_label_0': 4"):
        next(iter(dm.train_dataloader()))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "a.tar").write_bytes(b"this is not a tar file at all" * 10)
    dm = PickAPicDataModule(str(tmp_path / "garbage"), batch_size=2, resolution=16, num_workers=0)
    # nothing readable: refused at start
    with pytest.raises(ValueError, match="0 samples in 1 shard"):
        dm.train_dataloader()


def test_skips_are_logged_one_by_one_then_only_at_powers_of_ten(caplog):
    from align.data.pipeline import SkipCounter

    counter = SkipCounter()
    with caplog.at_level("WARNING", logger="align.data.pipeline"):
        for i in range(1500):
            counter.skip("corrupt_image", f"k{i}")
    assert len(caplog.records) == SkipCounter.LOGGED + 2  # 10 one by one, then at 100 and 1000
    assert "skipped 1000 samples (corrupt_image)" in caplog.records[-1].getMessage()
    assert counter.flush() == {"corrupt_image": 1500} and counter.total["corrupt_image"] == 1500
