"""SFTModule: the denoising loss with CLIP or segment prompt encoders, the trainable T5 adapter,
export and long-prompt sampling from the export, the validation-image callback, and the tiny
LongAlign SFT fit end to end."""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from align.data.longcaption import LongCaptionDataModule
from align.data.synthetic_long import write_synthetic_longcaption
from align.models import load_components
from align.models.sampling import ADAPTER_DIR, SPEC_FILE, generate, load_prompt_encoder
from align.models.t5_adapter import write_tiny_t5
from align.modules.sft import SFTModule

ROOT = Path(__file__).resolve().parents[2]
# > 77 tokens
PREFIX = " ".join(f"Detail {i} shows a wooden chair beside a tall lamp." for i in range(10))
LONG_A = PREFIX + " A purple elephant dances on a red carpet."
LONG_B = PREFIX + " A green giraffe sleeps under a blue tree."


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("long")
    write_synthetic_longcaption(out, samples=24, shards=2, resolution=32, seed=3)
    return out


@pytest.fixture(scope="module")
def batch(long_shards):
    dm = LongCaptionDataModule(
        str(long_shards), batch_size=2, resolution=32, num_workers=0, batches_per_epoch=1
    )
    return next(iter(dm.train_dataloader()))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def cond_and_loss(m: SFTModule, batch: dict, caption: str, monkeypatch):
    """The conditioning the UNet receives and the loss,
    for ``batch`` with every caption set to ``caption``."""
    seen = []
    forward = m.unet_forward

    def spy(unet, noisy, t, cond, time_ids):
        seen.append(cond.embeds.detach().clone())
        return forward(unet, noisy, t, cond, time_ids)

    monkeypatch.setattr(m, "unet_forward", spy)
    m.seed_streams("train", 0)
    with torch.no_grad():
        loss = m.objective_output({**batch, "caption": [caption] * len(batch["caption"])}).loss
    monkeypatch.undo()
    return seen[0], loss


def test_text_beyond_77_tokens_changes_the_modules_conditioning(batch, monkeypatch):
    tokenizer = load_components("tiny").tokenizers[0]
    assert len(tokenizer(PREFIX).input_ids) > 77
    segment = SFTModule(model="tiny", prompt_encoder="segment").train()
    clip = SFTModule(model="tiny", prompt_encoder="clip").train()
    cond_a, loss_a = cond_and_loss(segment, batch, LONG_A, monkeypatch)
    cond_b, loss_b = cond_and_loss(segment, batch, LONG_B, monkeypatch)
    assert cond_a.shape == (2, 240, 32)
    # the tail reaches the UNet and the loss
    assert not torch.allclose(cond_a, cond_b) and loss_a != loss_b
    clip_a, closs_a = cond_and_loss(clip, batch, LONG_A, monkeypatch)
    clip_b, closs_b = cond_and_loss(clip, batch, LONG_B, monkeypatch)
    assert clip_a.shape == (2, 77, 32)
    assert torch.equal(clip_a, clip_b) and closs_a == closs_b  # CLIP alone cuts at 77 tokens


def replay(m: SFTModule, batch: dict, seed: int):
    """The prediction, noise and timesteps of ``m.objective_output(batch)`` after
    ``m.seed_streams("train", seed)``, by hand: the posterior sample, then the noise, then the
    timesteps, from the module's generator."""
    m.seed_streams("train", seed)
    with torch.no_grad():
        cond = m.prompt_encoder(batch["caption"])
        latents = m.encode_latents(batch)
        noise = torch.randn(latents.shape, generator=m.generator)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=m.generator)
        pred = m.unet(
            m.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond.embeds
        ).sample
    return pred, noise, t


def test_loss_is_the_denoising_mse_without_reference(batch):
    from align.objectives.denoise import min_snr_weights

    m = SFTModule(model="tiny", prompt_encoder="segment", lora_rank=4).train()
    assert m.ref_unet is None and not m.use_lora_reference
    with pytest.raises(RuntimeError, match="no reference"):
        m.unet_errors(
            torch.zeros(1, 4, 16, 16),
            torch.zeros(1, 4, 16, 16),
            torch.tensor([1]),
            m.encode_prompts(["a"]),
            reference=True,
        )
    m.seed_streams("train", 7)
    out = m.objective_output(batch)
    pred, noise, _ = replay(m, batch, 7)
    torch.testing.assert_close(out.loss.detach(), F.mse_loss(pred, noise), rtol=1e-5, atol=1e-6)
    assert out.weight_mean.item() == 1.0

    weighted = SFTModule(model="tiny", prompt_encoder="segment", snr_gamma=5.0).train()
    weighted.seed_streams("train", 7)
    w = weighted.objective_output(batch)
    pred, noise, t = replay(weighted, batch, 7)
    weights = min_snr_weights(t, weighted.scheduler.alphas_cumprod, 5.0)
    per_sample = (pred - noise).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(w.loss.detach(), (weights * per_sample).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.weight_mean, weights.mean())


def test_t5_adapter_trains_checkpoints_and_exports_for_long_prompt_sampling(
    batch, t5_dir, tiny_pipeline_dir, tmp_path
):
    from diffusers import StableDiffusionPipeline

    m = SFTModule(
        model=str(tiny_pipeline_dir),
        prompt_encoder="segment",
        lora_rank=4,
        prompt_encoder_args={"t5": {"source": str(t5_dir), "hidden_dim": 24}},
    )
    adapter = m.prompt_encoder.t5.adapter
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    adapter_names = {f"prompt_encoder.t5.adapter.{n}" for n, _ in adapter.named_parameters()}
    assert adapter_names <= trainable and all("lora" in n for n in trainable - adapter_names)
    assert any("lora" in n for n in trainable)
    in_opt = {id(p) for g in m.configure_optimizers().param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.parameters() if p.requires_grad}

    m.train()
    assert adapter.training and not m.prompt_encoder.t5.encoder.training
    assert not m.prompt_encoder.text_encoder.training and not m.vae.training
    loss = m.training_step(batch, 0)
    loss.backward()
    assert (
        all(p.grad is not None for p in adapter.parameters())
        and adapter.norm1.weight.grad.abs().sum() > 0
    )
    frozen = [
        *m.prompt_encoder.text_encoder.parameters(),
        *m.prompt_encoder.t5.encoder.parameters(),
        *m.vae.parameters(),
    ]
    assert all(p.grad is None for p in frozen)

    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == trainable
    m.on_load_checkpoint(ckpt)
    m.load_state_dict(ckpt["state_dict"])

    with torch.no_grad():  # move away from the initialisation so the export has something to carry
        for n, p in m.named_parameters():
            if "lora_B" in n or "adapter" in n:
                p.add_(0.3 * torch.randn_like(p))
    out = m.export(tmp_path / "export")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (
        out / ADAPTER_DIR / "config.json"
    ).is_file()
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["kind"] == "segment" and spec["args"]["t5"]["adapter"] == ADAPTER_DIR

    m.eval()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    pipe.load_lora_weights(str(out))
    encoder = load_prompt_encoder(out, pipe)
    with torch.no_grad():
        got, want = encoder([LONG_A]).embeds, m.prompt_encoder([LONG_A]).embeds
    assert got.shape == (1, 480, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    kw = dict(steps=2, guidance=7.5, seed=0, output_type="np")
    images = generate(pipe, [LONG_A, LONG_B], encoder=str(out), **kw)
    assert images.shape == (2, 32, 32, 3)
    # the tail matters
    assert not torch.allclose(torch.from_numpy(images[0]), torch.from_numpy(images[1]))
    direct = generate(
        m.components.to_pipeline(unet=m.unet, scheduler=m.components.sampler()),
        [LONG_A],
        encoder=m.prompt_encoder,
        **kw,
    )
    torch.testing.assert_close(
        torch.from_numpy(images[:1]), torch.from_numpy(direct), rtol=0, atol=1e-4
    )
    pipe.disable_lora()
    base = generate(pipe, [LONG_A], encoder=encoder, **kw)
    # the LoRA is applied
    assert not torch.allclose(torch.from_numpy(base), torch.from_numpy(images[:1]))


def test_full_finetune_export_is_a_pipeline_that_samples_long_prompts(tmp_path):
    from diffusers import StableDiffusionPipeline

    m = SFTModule(
        model="tiny", prompt_encoder="segment", prompt_encoder_args={"max_rows": 120}
    ).eval()
    out = m.export(tmp_path / "full")
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert json.loads((out / SPEC_FILE).read_text()) == {
        "kind": "segment",
        "args": {"max_rows": 120, "splitter": "official", "t5": None},
    }
    kw = dict(steps=2, guidance=5.0, seed=[3], output_type="np")
    images = generate(pipe, [LONG_A], encoder=out, **kw)
    direct = generate(m.components, [LONG_A], encoder=m.prompt_encoder, **kw)
    torch.testing.assert_close(
        torch.from_numpy(images), torch.from_numpy(direct), rtol=0, atol=1e-4
    )


def test_validation_images_with_csv_logging_only(long_shards, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from align.callbacks.validation_images import ValidationImages

    m = SFTModule(model="tiny", prompt_encoder="segment", lora_rank=4)
    dm = LongCaptionDataModule(
        str(long_shards), batch_size=2, resolution=32, num_workers=0, batches_per_epoch=4
    )
    images = ValidationImages(prompts=[LONG_A, LONG_B], every_n_steps=2, steps=2, at_start=True)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[images],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(m, dm)
    assert images.rendered_steps == [0, 2, 3]  # start, every 2 steps, end
    for step in images.rendered_steps:
        folder = tmp_path / "csv/version_0/images" / f"step-{step:06d}"
        assert sorted(p.name for p in folder.glob("*.png")) == ["00.png", "01.png"]
        assert (folder / "prompts.txt").read_text().splitlines() == [LONG_A, LONG_B]
    assert m.training and m.unet.training and not m.vae.training  # rendering restored the modes


def test_tiny_longalign_sft_fit_end_to_end_then_sample_the_export(
    long_shards, tmp_path, monkeypatch
):
    from align.cli import main

    import wandb

    monkeypatch.chdir(tmp_path)
    try:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/longalign/sft_tiny.yaml"),
                "--data.sources",
                f"[{{name: a, shards: '{long_shards}/longcaption-000000.tar', weight: 3}}, "
                f"{{name: b, shards: '{long_shards}/longcaption-000001.tar'}}]",
                "--data.val_sources",
                f"[{{name: v, shards: '{long_shards}/longcaption-000001.tar'}}]",
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
    finally:
        wandb.finish()  # a run left open would be reused by the next WandbLogger in this process
    run = Path(glob.glob("logs/align-longalign-sft/*/")[0])
    assert "SFTModule" in (run / "config.yaml").read_text()
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    assert (
        ckpt["global_step"] == 3
        and ckpt["state_dict"]
        and all("lora" in k for k in ckpt["state_dict"])
    )
    final = run / "export/final"
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / SPEC_FILE).is_file()
    assert len(list((run / "images/step-000003").glob("*.png"))) == 3
    # log_image reached wandb
    assert len(glob.glob("logs/*/*/wandb/offline-run-*/files/media/images/val/*.png")) == 3
    rows = list(csv.DictReader(open(glob.glob("logs/*/*/csv/version_*/metrics.csv")[0])))
    logged = set().union(*(r.keys() for r in rows))
    assert {"train/loss", "train/err", "train/grad_norm", "val/loss"} <= logged

    # the preset the run started from (same seed, same weights)
    pipe = load_components("tiny").to_pipeline()
    base = generate(pipe, LONG_A, encoder=final, steps=2, seed=0, output_type="np")
    pipe.load_lora_weights(str(final))
    tuned = generate(pipe, LONG_A, encoder=final, steps=2, seed=0, output_type="np")
    assert tuned.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(tuned)).all()
    assert not torch.allclose(torch.from_numpy(base), torch.from_numpy(tuned))


@pytest.mark.parametrize(
    "config",
    [
        "longalign/sft_tiny.yaml",
        "longalign/sft_sd15.yaml",
        "sft/winners_tiny.yaml",
        "sft/winners_sd15.yaml",
    ],
)
def test_configs_parse(config, capsys):
    from align.cli import main

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    assert done.value.code == 0 and "SFTModule" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_sft_winners_fit(pair_shards, tmp_path, monkeypatch):
    from align.cli import main

    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/sft/winners_tiny.yaml"),
            "--data.train_shards",
            str(pair_shards),
            "--data.val_shards",
            "null",
            "--data.num_workers",
            "0",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "null",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    run = Path(glob.glob("logs/align-sft-winners/*/")[0])
    assert (run / "export/final/model_index.json").is_file() and (
        run / "export/final" / SPEC_FILE
    ).is_file()
    rows = list(csv.DictReader(open(glob.glob("logs/*/*/csv/version_*/metrics.csv")[0])))
    assert "train/loss" in set().union(*(r.keys() for r in rows))


@pytest.mark.parametrize(
    "config", ["configs/longalign/sft_sd15.yaml", "configs/longalign/rft_sd15.yaml"]
)
def test_longalign_lora_is_the_official_one(config):
    """Rank 32 on attention, the GEGLU projections and the resnets, dropout 0.1: 28.3 M parameters
    on the SD1.5 architecture (counted on the meta device), as the official SFT and RFT code."""
    from diffusers import UNet2DConditionModel

    from align.commands.plan import resolve
    from align.models.presets import get_preset
    from align.modules.base import add_lora

    args = resolve([str(ROOT / config)], [])["model"]["init_args"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**get_preset("sd15-arch").denoiser)
    add_lora(
        unet, args["lora_rank"], args["lora_alpha"], args["lora_targets"], args["lora_dropout"]
    )
    count = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    assert round(count / 1e6, 1) == 28.3 and args["lora_dropout"] == 0.1
