"""Denscore training: pair data in shard order with labels kept, the module scoring exactly as the
exported reward does, the loss training the score the right way,
and a tiny `align fit` whose export the registry loads."""

import csv
import glob
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from align.data.pipeline import SkipSample
from align.data.preference import (
    PreferencePairDataModule,
    clip_transform,
    decode_preference_pair,
    write_synthetic_long_pairs,
)
from align.modules.preference import PreferenceModelModule

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def long_pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("longpairs")
    write_synthetic_long_pairs(out, samples=24, shards=2, resolution=32, seed=5, tie_fraction=0.2)
    return out


def raw_samples(shard):
    """{key: json meta} of a shard, read with tarfile (independently of the pipeline)."""
    out = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                out[member.name.split(".")[0]] = json.loads(tar.extractfile(member).read())
    return out


def test_pairs_keep_shard_order_and_labels(long_pairs):
    dm = PreferencePairDataModule(
        str(long_pairs / "longpairs-000000.tar"),
        batch_size=4,
        num_workers=0,
        batches_per_epoch=2,
        shuffle_buffer=0,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 224, 224)
    meta = raw_samples(long_pairs / "longpairs-000000.tar")
    for i, key in enumerate(batch["key"]):
        assert (
            batch["label_0"][i].item() == meta[key]["label_0"]
            and batch["label_1"][i].item() == meta[key]["label_1"]
        )
        assert batch["caption"][i] == meta[key]["caption"]
    assert len(batch["caption"][0].split(". ")) >= 4  # long captions


def test_short_and_empty_captions_are_skipped(long_pairs):
    from helpers import pair_sample

    transform = clip_transform(224)
    assert (
        decode_preference_pair(
            pair_sample("a", caption="One sentence. And two."), transform, min_segments=2
        )["label_0"]
        == 1.0
    )
    with pytest.raises(SkipSample, match="short_caption"):
        decode_preference_pair(
            pair_sample("b", caption="just one sentence"), transform, min_segments=2
        )
    with pytest.raises(SkipSample, match="no_segments"):
        decode_preference_pair(pair_sample("c", caption="..."), transform)
    with pytest.raises(SkipSample, match="tie"):
        decode_preference_pair(
            pair_sample("d", caption="A tie. Two.", label_0=0.5), transform, drop_ties=True
        )


@pytest.fixture(scope="module")
def batch(long_pairs):
    dm = PreferencePairDataModule(str(long_pairs), batch_size=6, num_workers=0, batches_per_epoch=1)
    return next(iter(dm.train_dataloader()))


def test_loss_trains_the_segment_score_the_right_way(batch):
    """A few AdamW steps on one batch: the pair loss falls and the preferred image's segment score
    rises."""
    torch.manual_seed(0)
    m = PreferenceModelModule(model="tiny-clip", segment_weight=0.5).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    first = m.pair_loss(batch)
    assert first.segment_loss > 0 and torch.isclose(
        first.loss, first.pair_loss + 0.5 * first.segment_loss
    )
    for _ in range(6):
        opt.zero_grad()
        out = m.pair_loss(batch)
        out.loss.backward()
        opt.step()
    last = m.pair_loss(batch)
    assert last.pair_loss < first.pair_loss and last.score_margin > first.score_margin


def test_a_fixed_logit_scale_is_not_trained():
    m = PreferenceModelModule(model="tiny-clip", logit_scale=50.0)
    params = {id(p) for p in m.configure_optimizers().param_groups[0]["params"]}
    assert id(m.clip.logit_scale) not in params and len(params) == len(list(m.parameters())) - 1
    assert m.current_logit_scale().item() == 50.0


def test_export_scores_exactly_as_the_module(batch, tmp_path):
    from align.rewards.denscore import Denscore
    from align.rewards.registry import build_reward
    from align.rewards.segments import embed_prompt_segments
    from align.objectives.reward import segment_score

    m = PreferenceModelModule(model="tiny-clip", seed=1).eval()
    m._recent.extend(batch["caption"])
    out = m.export(tmp_path / "export")
    assert (out / "direction.safetensors").is_file() and (out / "align_reward.json").is_file()
    reward = build_reward("denscore", str(out))
    assert isinstance(reward, Denscore) and reward.direction is not None
    b = len(batch["caption"])
    with torch.no_grad():
        img = torch.nn.functional.normalize(
            m.scorer.image_features(batch["pixel_values"][:b]), dim=-1
        )
        texts = embed_prompt_segments(m.scorer, batch["caption"])
        want = segment_score(img, texts.embeddings, texts.mask)
        got_img = torch.nn.functional.normalize(
            reward.image_features(batch["pixel_values"][:b]), dim=-1
        )
        got_texts = embed_prompt_segments(reward, batch["caption"])
        got = segment_score(got_img, got_texts.embeddings, got_texts.mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_align_fit_end_to_end_and_the_registry_loads_the_export(long_pairs, tmp_path, monkeypatch):
    from align.cli import main

    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/longalign/denscore_tiny.yaml"),
            "--data.train_shards",
            str(long_pairs),
            "--data.val_shards",
            str(long_pairs / "longpairs-000001.tar"),
            "--data.batch_size",
            "4",
            "--data.num_workers",
            "0",
            "--data.val_batches",
            "1",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    run = Path(glob.glob(str(tmp_path / "logs/align-denscore/*/"))[0])
    export = run / "export/final"
    assert (export / "model.safetensors").is_file() and (
        export / "preprocessor_config.json"
    ).is_file()
    assert (run / "checkpoints/last.ckpt").is_file() and "PreferenceModelModule" in (
        run / "config.yaml"
    ).read_text()
    rows = list(
        csv.DictReader(open(glob.glob(str(tmp_path / "logs/*/*/csv/version_*/metrics.csv"))[0]))
    )
    logged = set().union(*(r.keys() for r in rows))
    for name in (
        "train/loss",
        "train/accuracy",
        "train/pair_loss",
        "train/segment_loss",
        "train/logit_scale",
        "train/grad_norm",
        "val/loss",
        "val/accuracy",
    ):
        assert name in logged, name

    # the export scores through the registry: Denscore-O, the text-relevant part and S_w,
    # with its direction
    from PIL import Image

    from align.rewards import build_reward

    reward = build_reward("denscore", str(export))
    assert reward.direction is not None
    imgs = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 30, 200))]
    caps = ["A red square. It fills the image.", "A blue square. Nothing else."]
    cols = reward.score_columns(imgs, caps)
    assert list(cols) == ["denscore-o", "denscore", "denscore-w"]
    torch.testing.assert_close(cols["denscore-o"], reward.score(imgs, caps))
    assert torch.isfinite(torch.stack(list(cols.values()))).all()


def test_the_registry_finds_denscore_on_its_own(monkeypatch):
    """`build_reward("denscore")` must not depend on someone having imported align.rewards.denscore
    first."""
    import align.rewards
    from align.rewards import registry

    monkeypatch.delitem(sys.modules, "align.rewards.denscore", raising=False)
    monkeypatch.delattr(align.rewards, "denscore", raising=False)
    monkeypatch.delitem(registry._FACTORIES, "denscore", raising=False)
    assert "denscore" in registry.available_rewards()
