"""The demo base's conditioning capacity: wider than the tiny preset's where the config says so, and
the trained base directory (UNet or flow transformer) loads back with it."""

from __future__ import annotations

import pytest
import torch

from align.demo.base import BaseConfig, build_base, demo_conditioning
from align.models import load_components


def test_conditioning_widens_the_text_encoder_and_adds_cross_attention_to_every_level():
    parts = load_components("tiny", seed=0)
    demo_conditioning(parts, BaseConfig(text_width=64, cross_attention_levels=2))
    unet, text = parts.unet, parts.text_encoders[0]
    assert unet.config.cross_attention_dim == 64 and text.config.hidden_size == 64
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 2
    assert list(unet.config.up_block_types) == ["CrossAttnUpBlock2D"] * 2
    ids = parts.tokenizers[0](
        ["a red square in the top left."], padding="max_length", return_tensors="pt"
    ).input_ids
    out = unet(
        torch.randn(1, 4, 16, 16), torch.tensor([10]), encoder_hidden_states=text(ids)[0]
    ).sample
    assert out.shape == (1, 4, 16, 16)


def test_the_tiny_presets_conditioning_leaves_the_parts_as_they_are():
    parts = load_components("tiny", seed=0)
    unet, text = parts.unet, parts.text_encoders[0]
    demo_conditioning(parts, BaseConfig(text_width=32, cross_attention_levels=1))
    assert parts.unet is unet and parts.text_encoders[0] is text


def test_a_level_count_the_unet_does_not_have_fails_with_its_name():
    with pytest.raises(ValueError, match="cross_attention_levels"):
        demo_conditioning(load_components("tiny", seed=0), BaseConfig(cross_attention_levels=3))


def test_the_trained_base_loads_back_with_its_conditioning(tmp_path):
    torch.set_num_threads(1)
    base = build_base(
        tmp_path / "base",
        BaseConfig(scenes=16, vae_steps=1, vae_batch=4, unet_steps=1, unet_batch=4, threads=1),
    )
    parts = load_components(str(base))
    assert parts.unet.config.cross_attention_dim == 64 == parts.text_encoders[0].config.hidden_size
    assert list(parts.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 2


def test_the_base_is_reproducible_and_reused_only_by_the_same_settings_and_code(
    tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    import align.demo.base as base_module

    cfg = BaseConfig(scenes=16, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, threads=1)
    weights = []
    for name in ("a", "b"):
        build_base(tmp_path / name, cfg)
        weights.append(load_file(tmp_path / name / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # to the bit
    assert base_module.base_matches(tmp_path / "a", cfg)
    assert not base_module.base_matches(tmp_path / "a", BaseConfig(**{**vars(cfg), "threads": 2}))
    monkeypatch.setattr(base_module, "code_fingerprint", lambda family: "changed")
    assert not base_module.base_matches(tmp_path / "a", cfg)  # the code that made it changed


def test_the_flow_base_is_an_sd3_pipeline_on_8x8_latents_with_centred_latents(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(1)
    cfg = BaseConfig(
        family="sd3", scenes=16, vae_steps=1, vae_batch=4, unet_steps=1, unet_batch=4, threads=1
    )
    parts = load_components(str(build_base(tmp_path / "base", cfg)))
    assert parts.family == "sd3" and parts.resolution == 32
    assert parts.unet.config.num_layers == cfg.flow_layers
    assert parts.unet.config.caption_projection_dim == 4 * cfg.flow_head_dim
    assert parts.noise_scheduler.config.shift == cfg.flow_shift
    assert parts.vae.config.latent_channels == cfg.flow_latent_channels
    assert parts.unet.config.in_channels == cfg.flow_latent_channels
    assert parts.vae.config.shift_factor != 0.0
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "base")
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_an_unknown_base_family_fails_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="sd15.*sd3"):
        build_base(tmp_path / "base", BaseConfig(family="flux", scenes=4))
