import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from align.data.pickapic import PickAPicDataModule
from align.modules import DPOModule


@pytest.fixture(scope="module")
def batch(pair_shards):
    dm = PickAPicDataModule(
        str(pair_shards), batch_size=3, resolution=32, num_workers=0, batches_per_epoch=1
    )
    return next(iter(dm.train_dataloader()))


def unets(module):
    return [m for m in module.modules() if isinstance(m, UNet2DConditionModel)]


def test_pair_shares_noise_and_timestep(batch, monkeypatch):
    m = DPOModule(model="tiny").train()
    seen = {}

    def spy(latents, noise, t, cond, time_ids=None, reference=False):
        seen.update(latents=latents, noise=noise, t=t, cond=cond.embeds)
        return torch.zeros(latents.shape[0])

    monkeypatch.setattr(m, "unet_errors", spy)
    m.pair_errors(batch)
    b = 3
    assert torch.equal(seen["noise"][:b], seen["noise"][b:]) and torch.equal(
        seen["t"][:b], seen["t"][b:]
    )
    assert torch.equal(seen["cond"][:b], seen["cond"][b:])
    assert not torch.equal(seen["latents"][:b], seen["latents"][b:])  # winners and losers differ


def test_timestep_range_bounds_the_sampled_timesteps(batch):
    m = DPOModule(model="tiny", timestep_range=(600, 610)).train()
    latents = torch.zeros(400, 4, 4, 4)
    noise, t = m.sample_noise(latents, group=2)
    assert int(t.min()) >= 600 and int(t.max()) <= 609 and len(set(t.tolist())) == 10
    assert torch.equal(t[:200], t[200:]) and torch.equal(noise[:200], noise[200:])
    _, t_all = DPOModule(model="tiny").sample_noise(latents)
    assert int(t_all.min()) < 600  # the default draws from every timestep


@pytest.mark.parametrize("bad", [(500, 500), (-1, 10), (0, 1001)])
def test_a_bad_timestep_range_fails_at_start(bad):
    with pytest.raises(ValueError, match="timestep_range"):
        DPOModule(model="tiny", timestep_range=bad)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_loss_is_log2_when_policy_equals_reference(batch, lora_rank):
    m = DPOModule(model="tiny", lora_rank=lora_rank).train()
    policy, ref = m.pair_errors(batch)
    assert torch.allclose(policy, ref, atol=1e-6)
    loss = m.training_step(batch, 0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-5)


def test_frozen_parts_never_train_nor_checkpoint(batch):
    m = DPOModule(model="tiny")
    opt = m.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.unet.parameters()}
    for frozen in (m.vae, m.prompt_encoder, m.ref_unet):
        assert all(not p.requires_grad for p in frozen.parameters())
    m.train()
    assert not m.vae.training and not m.ref_unet.training and m.unet.training
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("unet.") for k in ckpt["state_dict"])
    m.on_load_checkpoint(ckpt)
    m.load_state_dict(ckpt["state_dict"])  # strict: the frozen parts are filled back in


def test_lora_reference_is_the_same_unet_without_adapters(batch):
    m = DPOModule(model="tiny", lora_rank=4).train()
    assert m.ref_unet is None and len(unets(m)) == 1
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    m.seed_streams("train", 0)
    policy, ref = m.pair_errors(batch)
    base = DPOModule(model="tiny").train()
    base.seed_streams("train", 0)
    _, ref_full = base.pair_errors(batch)
    assert not torch.allclose(policy, ref)
    assert torch.allclose(ref, ref_full, atol=1e-5)


def test_a_step_lowers_winner_error_relative_to_loser(batch):
    m = DPOModule(model="tiny").train()
    opt = torch.optim.SGD(m.unet.parameters(), lr=1e-6)

    def margin():
        m.seed_streams("train", 123)
        policy, _ = m.pair_errors(batch)
        return (policy[:3] - policy[3:]).mean()

    before = margin().item()
    m.seed_streams("train", 123)
    m.training_step(batch, 0).backward()
    opt.step()
    with torch.no_grad():
        after = margin().item()
    assert after < before


def test_reference_runs_without_autograd_state(batch):
    m = DPOModule(model="tiny").train()
    _, ref = m.pair_errors(batch)
    assert not ref.requires_grad and ref.grad_fn is None


def test_export_loads_into_a_pipeline_that_samples(tmp_path):
    from diffusers import StableDiffusionPipeline

    m = DPOModule(model="tiny")
    out = m.export(tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    for p, q in zip(pipe.unet.parameters(), m.unet.parameters()):
        assert torch.equal(p, q)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=7.5,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3)


def test_lora_export_loads_with_load_lora_weights(tmp_path, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    m = DPOModule(model=str(tiny_pipeline_dir), lora_rank=4)
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
    out = m.export(tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(out))
    tuned = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.allclose(torch.from_numpy(base), torch.from_numpy(tuned))


def test_sdxl_pairs_get_time_ids(pair_shards):
    dm = PickAPicDataModule(
        str(pair_shards), batch_size=2, resolution=32, num_workers=0, batches_per_epoch=1
    )
    b = next(iter(dm.train_dataloader()))
    m = DPOModule(model="tiny-xl").train()
    ids = m.time_ids(b, 4)
    assert ids.shape == (4, 6) and ids[0].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    loss = m.training_step(b, 0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-5)


def test_frozen_dtype_stores_frozen_parts_in_bf16_and_still_trains(batch):
    m = DPOModule(model="tiny", frozen_dtype="bf16").train()
    assert next(m.ref_unet.parameters()).dtype == torch.bfloat16
    assert next(m.vae.parameters()).dtype == torch.bfloat16
    assert next(m.prompt_encoder.parameters()).dtype == torch.bfloat16
    assert next(m.unet.parameters()).dtype == torch.float32
    policy, ref = m.pair_errors(batch)
    assert policy.dtype == ref.dtype == torch.float32
    # policy == reference up to bf16 rounding of the reference
    assert torch.allclose(policy, ref, rtol=5e-2)
    loss = m.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is None for p in m.ref_unet.parameters())
    assert any(p.grad is not None for p in m.unet.parameters())
    with pytest.raises(ValueError, match="frozen_dtype"):
        DPOModule(model="tiny", frozen_dtype="int8")


def test_a_data_module_that_keeps_ties_fails_before_the_first_step(pair_shards, monkeypatch):
    import lightning as L

    m = DPOModule(model="tiny")
    monkeypatch.setattr(m, "training_step", lambda *a: pytest.fail("a step ran"))
    dm = PickAPicDataModule(
        str(pair_shards),
        batch_size=2,
        resolution=32,
        num_workers=0,
        batches_per_epoch=1,
        drop_ties=False,
    )
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="drop_ties"):
        trainer.fit(m, datamodule=dm)


@pytest.mark.parametrize("preset", ["tiny", "tiny-xl"])
def test_lora_export_with_alpha_other_than_rank_rebuilds_the_trained_unet(tmp_path, preset):
    """Rank 4, alpha 16: the stock pipeline's load_lora_weights gives the trained UNet's output."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from helpers import perturb_lora

    from align.models import load_components

    base_dir = tmp_path / "base"
    load_components(preset).save_pretrained(base_dir)
    m = DPOModule(model=str(base_dir), lora_rank=4, lora_alpha=16).eval()
    perturb_lora(m, seed=1)
    out = m.export(tmp_path / "lora")
    cls = StableDiffusionXLPipeline if preset == "tiny-xl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(base_dir))
    pipe.load_lora_weights(str(out))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    cond = torch.randn(
        2, 7, m.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)
    )
    extra = {}
    if preset == "tiny-xl":
        extra = {
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.ones(2, 6)}
        }
    with torch.no_grad():
        want = m.unet(x, t, encoder_hidden_states=cond, **extra).sample
        got = pipe.unet(x, t, encoder_hidden_states=cond, **extra).sample
        m.unet.disable_adapters()
        effect = (want - m.unet(x, t, encoder_hidden_states=cond, **extra).sample).abs().max()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert effect > 1e-3  # the LoRA changes the output, so the match is not vacuous


def test_sdxl_time_ids_are_the_official_constant_unless_asked_per_image():
    batch = {
        "original_size": torch.tensor([[40, 50], [64, 30]]),
        "crop_top_left": torch.tensor([[3, 0], [0, 7]]),
    }
    official = DPOModule(model="tiny-xl").time_ids(batch, 2)
    assert official.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    image = DPOModule(model="tiny-xl", time_ids="image").time_ids(batch, 2)
    assert image.tolist() == [
        [40.0, 50.0, 3.0, 0.0, 32.0, 32.0],
        [64.0, 30.0, 0.0, 7.0, 32.0, 32.0],
    ]
    with pytest.raises(ValueError, match="time_ids"):
        DPOModule(model="tiny-xl", time_ids="both")


def test_a_full_export_samples_with_the_bases_scheduler_and_keeps_its_safety_checker(tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from align.models import load_components

    small = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config=small,
            projection_dim=8,
            vision_config={**small, "image_size": 32, "patch_size": 8},
        )
    )
    parts = load_components("tiny")
    # the base samples with PNDM, as SD1.5
    base = parts.to_pipeline(scheduler=parts.inference_scheduler)
    base.register_modules(
        safety_checker=checker, feature_extractor=CLIPImageProcessor(crop_size=32, size=32)
    )
    base.register_to_config(requires_safety_checker=True)
    base.save_pretrained(tmp_path / "base")
    out = DPOModule(model=str(tmp_path / "base")).export(tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # the base's sampler, not DDPM
    assert pipe.safety_checker is not None and pipe.feature_extractor is not None
    xl = StableDiffusionPipeline.load_config(
        str(DPOModule(model="tiny-xl").export(tmp_path / "xl"))
    )
    assert xl["scheduler"][1] == "EulerDiscreteScheduler"
