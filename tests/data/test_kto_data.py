import pytest
import torch
from helpers import single_sample, write_tar

from align.data.kto import KTODataModule, decode_single
from align.data.pipeline import SkipSample
from align.data.synthetic import write_synthetic_kto
from align.data.transforms import ImageTransform

T = ImageTransform(16, crop="center", flip_prob=0.0)


@pytest.mark.parametrize(
    "sample,reason",
    [
        (single_sample("a", label="yes"), "label_not_boolean"),
        (single_sample("b", label=1), "label_not_boolean"),
        (single_sample("c", label=None), "missing_label"),
        (single_sample("d", caption=""), "empty_caption"),
        (single_sample("e", image=b"broken"), "corrupt_image"),
    ],
)
def test_bad_single_samples_are_named_skips(sample, reason):
    with pytest.raises(SkipSample) as err:
        decode_single(sample, T)
    assert err.value.reason == reason


def test_each_class_stream_keeps_only_its_class():
    assert decode_single(single_sample("a", label=False), T, want=True) is None
    assert decode_single(single_sample("a", label=False), T, want=False)["desirable"] is False


def test_mixing_follows_p_desirable_whatever_the_ratio_on_disk(tmp_path):
    write_synthetic_kto(tmp_path, 40, 2, 16, 0, p_desirable=0.2)
    for p in (0.8, 0.3):
        dm = KTODataModule(
            str(tmp_path),
            p_desirable=p,
            batch_size=10,
            resolution=16,
            num_workers=0,
            batches_per_epoch=30,
        )
        labels = torch.cat([b["desirable"] for b in dm.train_dataloader()])
        assert abs(labels.float().mean().item() - p) < 0.07


def test_bad_samples_counted_and_training_data_keeps_flowing(tmp_path):
    write_tar(
        tmp_path / "a.tar",
        [single_sample(f"g{i}", label=i % 2 == 0) for i in range(6)]
        + [single_sample("x", label="maybe"), single_sample("y", image=b"nope")],
    )
    dm = KTODataModule(
        str(tmp_path / "a.tar"), batch_size=4, resolution=16, num_workers=0, batches_per_epoch=5
    )
    batches = list(dm.train_dataloader())
    totals = {}
    for b in batches:
        for k, v in b["skipped"].items():
            totals[k] = totals.get(k, 0) + v
    assert len(batches) == 5 and totals.get("label_not_boolean") and totals.get("corrupt_image")


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="p_desirable"):
        KTODataModule(str(tmp_path), p_desirable=1.0)
    with pytest.raises(ValueError, match="desirable_shards"):
        KTODataModule(desirable_shards=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no shards match"):
        KTODataModule(str(tmp_path / "none-*.tar"))


def test_shards_without_one_class_fail_instead_of_waiting_for_it(tmp_path):
    write_tar(tmp_path / "a.tar", [single_sample(f"d{i}", label=True) for i in range(6)])
    dm = KTODataModule(
        str(tmp_path),
        p_desirable=0.5,
        batch_size=4,
        resolution=16,
        num_workers=0,
        # 20 draws at p = 0.5: one of them asks for the absent class
        batches_per_epoch=5,
    )
    with pytest.raises(RuntimeError, match="no usable sample.*hold no sample of this kind"):
        list(dm.train_dataloader())
