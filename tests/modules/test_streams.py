"""Per-rank random streams and the float32 output of DiffusionModule (align.modules.base)."""

import pytest
import torch

from align.modules import DPOModule
from align.modules.base import Float32Conv2d


def draws(module, stage="train", index=0):
    module.seed_streams(stage, index)
    latents = torch.zeros(2, 4, 8, 8)
    noise, t = module.sample_noise(latents, group=2)
    return noise, t, module.drop_captions(["a caption"] * 16)


@pytest.fixture(scope="module")
def dpo():
    return DPOModule(model="tiny", caption_dropout=0.5).train()


def test_each_rank_draws_its_own_noise_timesteps_and_dropout(dpo, monkeypatch):
    rank0 = draws(dpo)
    monkeypatch.setattr(DPOModule, "global_rank", property(lambda self: 1))
    rank1 = draws(dpo)
    assert not torch.equal(rank0[0], rank1[0]) and rank0[2] != rank1[2]
    # reproducible
    assert torch.equal(draws(dpo)[0], rank1[0]) and torch.equal(draws(dpo)[1], rank1[1])


def test_micro_batches_differ_and_validation_batches_repeat(dpo):
    assert not torch.equal(draws(dpo, "train", 0)[0], draws(dpo, "train", 1)[0])
    dpo.on_validation_batch_start({}, 3)
    first = dpo.sample_noise(torch.zeros(2, 4, 8, 8))
    dpo.on_validation_batch_start({}, 3)
    again = dpo.sample_noise(torch.zeros(2, 4, 8, 8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_seed_everything_sets_the_streams(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    five = DPOModule(model="tiny")
    monkeypatch.setenv("PL_GLOBAL_SEED", "6")
    six = DPOModule(model="tiny")
    assert five.stream_seed == 5 and not torch.equal(draws(five)[0], draws(six)[0])


def test_unet_output_is_float32_under_bf16_autocast(dpo):
    unet = dpo.unet
    assert isinstance(unet.conv_out, Float32Conv2d) and isinstance(
        dpo.ref_unet.conv_out, Float32Conv2d
    )
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, encoder_hidden_states=cond).sample
    assert out.dtype == torch.float32
    # export unchanged
    assert set(unet.state_dict()) == set(type(unet).from_config(unet.config).state_dict())


def test_val_metrics_of_a_run_equal_align_validate_on_its_checkpoint(
    tmp_path, pair_shards, monkeypatch
):
    """Fixed noise, timesteps and dropout per validation batch: the fit's last val/loss is what
    `align validate` prints for the checkpoint of the same step."""
    import csv
    from pathlib import Path

    from align.lightning_cli import run_lightning_cli

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    data = [
        "--data.train_shards",
        str(pair_shards),
        "--data.val_shards",
        str(pair_shards / "pairs-000000.tar"),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "2",
        "--data.val_batches",
        "2",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        "logs",
    ]
    run_lightning_cli(
        [
            "fit",
            "--config",
            str(root / "configs/dpo/tiny.yaml"),
            *data,
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.callbacks",
            "lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath",
            "ckpt",
            "--trainer.callbacks.save_last",
            "true",
        ]
    )
    rows = list(csv.DictReader(open(next(Path("logs").glob("*/*/csv/version_*/metrics.csv")))))
    fit_val = [float(r["val/loss"]) for r in rows if r.get("val/loss")][-1]
    cli = run_lightning_cli(
        [
            "validate",
            "--config",
            str(root / "configs/dpo/tiny.yaml"),
            *data,
            "--ckpt_path",
            "ckpt/last.ckpt",
        ]
    )
    validated = float(cli.trainer.callback_metrics["val/loss"])
    assert abs(validated - fit_val) < 1e-6, (fit_val, validated)


def test_fp16_autocast_the_official_precision_trains():
    """The SD1.5 paper configs run `precision: 16-mixed`: fp16 autocast, float32 weights, loss
    scaling (what Lightning does on a GPU; on the CPU it falls back to bf16, so the step is driven
    by hand)."""
    from align.bench.step import StepConfig, make_batch

    dpo = DPOModule(model="tiny", caption_dropout=0.5).train()
    batch = make_batch(dpo, StepConfig(batch=2))
    optimizer = torch.optim.AdamW([p for p in dpo.parameters() if p.requires_grad], lr=1e-5)
    # the scaler starts high and halves on overflow (what Lightning's does); start where it settles
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in dpo.unet.parameters()]
    dpo.seed_streams("train", 0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = dpo.training_step(batch, 0)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for p in dpo.unet.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # no overflow: the step was taken
    assert any(not torch.equal(a, b) for a, b in zip(before, dpo.unet.parameters()))
    assert all(p.dtype == torch.float32 for p in dpo.unet.parameters())
