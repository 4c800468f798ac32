"""SD3 and FLUX.1 (flow matching) through the same loader, prompt encoders and modules as the UNets.

Parity is against the computations of diffusers' own training scripts
(``examples/dreambooth/train_dreambooth_lora_sd3.py`` / ``..._flux.py``, quoted line for line in
``_script_errors``) and pipelines (``encode_prompt``), on the tiny presets.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from align.models import ModelSourceError, load_components
from align.models.prompts import build_prompt_encoder
from align.modules import DPOModule, SFTModule

CAPTIONS = ["a red circle on the left", "two blue squares", ""]


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def family_dir(request, tmp_path_factory):
    """A tiny preset saved as a diffusers pipeline directory: the real loading path."""
    out = tmp_path_factory.mktemp(request.param)
    load_components(request.param).to_pipeline().save_pretrained(out)
    return request.param, out


def test_a_saved_pipeline_loads_as_its_family_and_encodes_as_its_pipeline(family_dir):
    name, where = family_dir
    parts = load_components(str(where))
    assert parts.family == name.removeprefix("tiny-") and parts.is_flow
    assert type(parts.unet).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")
    pipe = parts.to_pipeline()
    with torch.no_grad():
        ours = build_prompt_encoder(parts, "clip")(CAPTIONS)
        if parts.family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                CAPTIONS, None, None, do_classifier_free_guidance=False
            )
        else:
            embeds, pooled, _ = pipe.encode_prompt(CAPTIONS, None)
    assert torch.equal(ours.embeds, embeds) and torch.equal(ours.pooled, pooled)
    rebuilt = load_components(name)  # the preset is the same model, seed for seed
    assert torch.equal(
        next(iter(rebuilt.unet.state_dict().values())), next(iter(parts.unet.state_dict().values()))
    )


def test_an_unknown_family_is_named_with_the_families_align_trains(tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "X"]})
    )
    with pytest.raises(ModelSourceError, match="PixArtAlphaPipeline.*SD1.5, SDXL, SD3/SD3.5, FLUX"):
        load_components(str(tmp_path))


def _script_errors(family, transformer, scheduler, latents, noise, u, cond, precondition, scheme):
    """The scripts' per-sample loss, their lines with our names (bsz = latents.shape[0])."""
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    if family == "sd3":
        pred = transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]
    else:
        b, c, h, w = latents.shape
        vae_scale_factor = 2
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype)
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        guidance = torch.tensor([3.5]).expand(b)
        pred = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(cond.embeds.shape[1], 3),
            img_ids=image_ids,
            return_dict=False,
        )[0]
        pred = FluxPipeline._unpack_latents(
            pred,
            height=h * vae_scale_factor,
            width=w * vae_scale_factor,
            vae_scale_factor=vae_scale_factor,
        )
    if precondition:
        pred = pred * (-sigmas) + noisy
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = latents if precondition else noise - latents
    squared = weighting.float() * (pred.float() - target.float()) ** 2
    return torch.mean(squared.reshape(target.shape[0], -1), 1), timesteps


@pytest.mark.parametrize(
    "name,flow",
    [
        ("tiny-sd3", {}),  # logit-normal, velocity target
        ("tiny-sd3", {"precondition_outputs": True, "weighting_scheme": "sigma_sqrt"}),
        ("tiny-sd3", {"weighting_scheme": "mode"}),
        ("tiny-flux", {}),  # uniform ("none"), guidance 3.5
        ("tiny-flux", {"weighting_scheme": "cosmap"}),
    ],
)
def test_flow_errors_and_timesteps_equal_the_training_scripts(name, flow):
    module = SFTModule(model=name, flow=flow)
    scheme = module.flow.weighting_scheme
    latents, noise = torch.randn(2, 3, 16, 16, 16).unbind(0)
    cond = module.encode_prompts(CAPTIONS)
    t = module.flow.sample_timesteps(module.scheduler, 3, torch.Generator().manual_seed(7))
    u = compute_density_for_timestep_sampling(
        scheme, 3, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(7)
    )
    with torch.no_grad():
        ours = module.unet_errors(latents, noise, t, cond)
        theirs, timesteps = _script_errors(
            module.components.family,
            module.unet,
            module.scheduler,
            latents,
            noise,
            u,
            cond,
            flow.get("precondition_outputs", False),
            scheme,
        )
    assert torch.equal(t, timesteps)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_timestep_range_keeps_flow_timesteps_inside_it():
    module = SFTModule(model="tiny-sd3", timestep_range=[500, 1000])
    gen = torch.Generator().manual_seed(0)
    t = module.flow.sample_timesteps(module.scheduler, 4096, gen, 200, 600)
    assert t.min() >= 200 and t.max() < 600 and len(t.unique()) > 50
    t = module.flow.sample_timesteps(module.scheduler, 4096, gen, 500, 1000)
    assert t.min() >= 500 and t.max() > 990  # up to N: sigma = 1 included
    with pytest.raises(ValueError, match="no training timestep"):
        module.flow.sample_timesteps(
            module.scheduler, 1, torch.Generator(), 1, 2
        )  # shifted: t > 2.9


def test_flow_latents_are_shifted_then_scaled_as_the_scripts_do():
    module = SFTModule(model="tiny-flux")
    mean = torch.randn(2, 16, 16, 16)
    moments = torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)  # a point posterior
    latents = module.encode_latents({"latent_moments": moments})
    config = module.vae.config
    assert config.shift_factor != 0
    torch.testing.assert_close(latents, (mean - config.shift_factor) * config.scaling_factor)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_lora_export_reloads_in_the_stock_pipeline_at_the_trained_scale(name, tmp_path):
    module = DPOModule(model=name, lora_rank=4, lora_alpha=8.0, beta=100.0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for pname, p in module.unet.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.05)
    module.export(tmp_path / "lora")
    pipe = load_components(name).to_pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    latents, t = torch.randn(1, 16, 16, 16), torch.tensor([500.0])
    cond = module.encode_prompts(CAPTIONS[:1])
    with torch.no_grad():
        ours = module.unet_forward(module.unet, latents, t, cond, None)
        theirs = module.unet_forward(pipe.transformer, latents, t, cond, None)
        with_adapter_off = module.unet_errors(latents, latents, t, cond, reference=True)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert with_adapter_off.isfinite().all()


@pytest.mark.slow  # the fast suite keeps the parity and export-scale tests
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_full_export_is_a_pipeline_of_the_family(name, tmp_path):
    module = DPOModule(model=name, beta=100.0)
    with torch.no_grad():
        next(module.unet.parameters()).add_(0.1)
    module.export(tmp_path / "full")
    pipe = module.components.pipeline_class().from_pretrained(str(tmp_path / "full"))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert torch.equal(next(pipe.transformer.parameters()), next(module.unet.parameters()))


def test_bad_flow_settings_fail_at_start_naming_the_problem():
    with pytest.raises(ValueError, match="segment encoder.*sd3"):
        SFTModule(model="tiny-sd3", prompt_encoder="segment")
    with pytest.raises(ValueError, match=r"lora_targets \['to_nowhere'\]"):
        DPOModule(model="tiny-flux", lora_rank=2, lora_targets=["to_nowhere"])
    with pytest.raises(ValueError, match="flow settings apply to SD3/FLUX"):
        SFTModule(model="tiny", flow={"weighting_scheme": "none"})
    with pytest.raises(ValueError, match="snr_gamma"):
        SFTModule(model="tiny-sd3", snr_gamma=5.0)
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        SFTModule(model="tiny-sd3", flow={"weighting_scheme": "lognormal"})


def _grpo(name, **kw):
    from align.modules import GRPOModule
    from align.rewards.weighted import WeightedReward

    args = dict(group_size=2, num_steps=4, eta=0.7, guidance_scale=3.5, lora_rank=4)
    return GRPOModule(model=name, reward=WeightedReward("jpeg-compressibility"), **{**args, **kw})


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_grpo_samples_on_the_pipelines_own_sigmas(name):
    module = _grpo(name)
    pipe = module.components.to_pipeline(scheduler=module.components.sampler())
    cond = module.encode_prompts(["a red circle"])
    kwargs = (
        {}
        if name == "tiny-flux"
        else {"negative_prompt_embeds": cond.embeds, "negative_pooled_prompt_embeds": cond.pooled}
    )
    pipe(
        prompt_embeds=cond.embeds,
        pooled_prompt_embeds=cond.pooled,
        num_inference_steps=4,
        height=32,
        width=32,
        output_type="latent",
        **kwargs,
    )
    torch.testing.assert_close(module.sigmas, pipe.scheduler.sigmas.float())
    torch.testing.assert_close(module.timesteps, pipe.scheduler.timesteps.float())


@pytest.mark.slow  # the fast suite keeps the parity and export-scale tests
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_grpo_trains_a_flow_lora_with_log_probs_it_can_recompute(name, tmp_path):
    import lightning as L

    from align.data.prompts import PromptDataModule

    module = _grpo(name, kl_beta=0.01, timestep_range=[500, 1000])
    assert [module.timesteps[i] >= 500 for i in module.trainable_steps] and len(
        module.trainable_steps
    ) < module.num_steps
    module.eval()
    rollout = module.sample(["a red circle"] * 2)
    log_prob, _ = module.step_log_prob(rollout, 1, torch.arange(2))
    torch.testing.assert_close(log_prob, rollout["log_probs"][1])
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters() if p.requires_grad}
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, PromptDataModule(prompts=str(tmp_path / "p.txt"), batch_size=2))
    moved = [
        not torch.equal(p, before[n]) for n, p in module.unet.named_parameters() if n in before
    ]
    assert any(moved) and all(p.isfinite().all() for p in module.unet.parameters())


def test_rft_is_refused_on_flow_models_naming_grpo():
    from align.modules import RFTModule
    from align.rewards.rft import DirectReward

    with pytest.raises(ValueError, match="use GRPOModule"):
        RFTModule(DirectReward("jpeg-compressibility"), model="tiny-sd3", lora_rank=4)


def test_lora_with_frozen_bf16_stores_the_base_in_bf16_and_trains_the_adapter_in_fp32():
    module = DPOModule(model="tiny-flux", lora_rank=4, frozen_dtype="bf16", beta=100.0).train()
    dtypes = {name: p.dtype for name, p in module.unet.named_parameters() if "proj_out" not in name}
    lora = {n for n in dtypes if "lora_" in n}
    assert lora and all(dtypes[n] == torch.float32 for n in lora)
    assert {dtypes[n] for n in dtypes if n not in lora} == {torch.bfloat16}
    assert module.unet.proj_out.weight.dtype == torch.float32  # fp32_output's last layer
    batch = {"pixel_values": torch.rand(4, 3, 32, 32) * 2 - 1, "caption": ["a", "b"]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        policy, ref = module.pair_errors(batch)
    (policy.sum() - ref.sum()).backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_flux_switches_off_cudnn_attention_whose_backward_fails_on_it(name):
    module = DPOModule(model=name, lora_rank=4)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        module.setup("fit")
        assert torch.backends.cuda.cudnn_sdp_enabled() == (name == "tiny-sd3")
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
