import glob
import math
from pathlib import Path

import pytest
import torch

from align.cli import main
from align.data.kto import KTODataModule
from align.data.synthetic import write_synthetic_kto
from align.modules import KTOModule

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kto_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("kto")
    write_synthetic_kto(out, 48, 4, 32, 0)
    return out


@pytest.fixture(scope="module")
def batch(kto_shards):
    dm = KTODataModule(
        str(kto_shards),
        p_desirable=0.5,
        batch_size=6,
        resolution=32,
        num_workers=0,
        batches_per_epoch=1,
        seed=3,
    )
    b = next(iter(dm.train_dataloader()))
    b["desirable"] = torch.tensor([True, False, True, False, True, False])
    return b


def test_loss_is_one_half_when_policy_equals_reference(batch):
    m = KTOModule(model="tiny").train()
    assert math.isclose(m.training_step(batch, 0).item(), 0.5, rel_tol=1e-6)


def test_a_step_raises_desirable_and_lowers_undesirable_rewards(batch):
    m = KTOModule(model="tiny").train()  # policy == reference: x = 0, where the utility is steepest
    opt = torch.optim.SGD(m.unet.parameters(), lr=1e-6)

    def rewards():
        m.seed_streams("train", 7)
        out = m.objective_output(batch)
        return out.reward_desirable.item(), out.reward_undesirable.item(), out

    d0, u0, out = rewards()
    out.loss.backward()
    opt.step()
    with torch.no_grad():
        d1, u1, _ = rewards()
    assert d1 > d0 and u1 < u0


def test_all_one_class_batch_gives_a_finite_loss(batch):
    m = KTOModule(model="tiny").train()
    one_class = {**batch, "desirable": torch.ones(6, dtype=torch.bool)}
    out = m.objective_output(one_class)
    assert torch.isfinite(out.loss) and out.reward_undesirable == 0 and out.frac_desirable == 1


def test_mismatched_reference_point_uses_rolled_prompts(batch, monkeypatch):
    m = KTOModule(model="tiny", reference_point="mismatched").train()
    calls = []
    original = m.unet_errors

    def spy(latents, noise, t, cond, time_ids=None, reference=False):
        calls.append((cond.embeds.clone(), noise, reference))
        return original(latents, noise, t, cond, time_ids, reference=reference)

    monkeypatch.setattr(m, "unet_errors", spy)
    out = m.objective_output(batch)
    assert len(calls) == 4
    matched, rolled = calls[0][0], calls[2][0]
    assert torch.equal(rolled, matched.roll(1, dims=0)) and calls[2][1] is calls[0][1]
    assert out.reference_point >= 0 and torch.isfinite(out.loss)


def test_end_to_end_tiny_fit_and_export(tmp_path, kto_shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/kto/tiny.yaml"),
            "--data.shards",
            str(kto_shards),
            "--data.val_shards",
            "null",
            "--data.num_workers",
            "0",
            "--data.batch_size",
            "4",
            "--trainer.max_steps",
            "3",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    export = glob.glob(str(tmp_path / "logs/align-kto/*/export/final/unet"))
    assert export
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(export[0])
    metrics = open(glob.glob(str(tmp_path / "logs/*/*/csv/version_*/metrics.csv"))[0]).readline()
    for name in (
        "train/loss",
        "train/reward_desirable",
        "train/reward_undesirable",
        "train/reference_point",
        "train/frac_desirable",
    ):
        assert name in metrics


def test_mismatched_reference_point_with_one_image_per_batch_fails_before_the_first_step(
    kto_shards, monkeypatch
):
    import lightning as L

    m = KTOModule(model="tiny", reference_point="mismatched")
    monkeypatch.setattr(m, "training_step", lambda *a: pytest.fail("a step ran"))
    dm = KTODataModule(
        str(kto_shards), batch_size=1, resolution=32, num_workers=0, batches_per_epoch=1
    )
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="batch_size >= 2"):
        trainer.fit(m, datamodule=dm)
