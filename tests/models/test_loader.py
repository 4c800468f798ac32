import pytest
import torch

from align.models import ModelSourceError, load_components
from align.models.presets import PRESETS


def test_tiny_preset_is_sd15_shaped_and_deterministic():
    a, b = load_components("tiny"), load_components("tiny")
    assert not a.is_sdxl and len(a.text_encoders) == 1
    assert a.unet.config.cross_attention_dim == a.text_encoders[0].config.hidden_size
    assert a.resolution == 32
    for p, q in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(p, q)


def test_tiny_xl_preset_has_two_encoders_and_text_time():
    c = load_components("tiny-xl")
    assert c.is_sdxl
    assert c.unet.config.addition_embed_type == "text_time"
    hidden = sum(e.config.hidden_size for e in c.text_encoders)
    assert c.unet.config.cross_attention_dim == hidden
    assert c.tokenizers[1].pad_token == "!"


def test_local_directory_round_trip(tiny_pipeline_dir):
    loaded = load_components(str(tiny_pipeline_dir))
    built = load_components("tiny")
    assert loaded.source == str(tiny_pipeline_dir)
    for p, q in zip(loaded.unet.parameters(), built.unet.parameters()):
        assert torch.equal(p, q)
    assert loaded.tokenizers[0]("a cat").input_ids == built.tokenizers[0]("a cat").input_ids


@pytest.mark.parametrize("source", ["./does/not/exist", "/no/such/model", "tinyy", "not a model"])
def test_bad_sources_fail_with_a_message_naming_them(source):
    with pytest.raises(ModelSourceError, match="no such directory") as err:
        load_components(source)
    assert repr(source) in str(err.value)


def test_unreachable_hub_id_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="org/missing-model") as err:
        load_components("org/missing-model")
    assert "without network" in str(err.value) and "hf download org/missing-model" in str(err.value)


def test_arch_presets_are_the_real_architectures():
    # checked on config only (building them is for benchmarks):
    # SD1.5 UNet is 320-640-1280-1280 with 768 cross-attn
    assert PRESETS["sd15-arch"].denoiser["block_out_channels"] == [320, 640, 1280, 1280]
    assert PRESETS["sdxl-arch"].denoiser["cross_attention_dim"] == 2048
    assert PRESETS["sdxl-arch"].denoiser["projection_class_embeddings_input_dim"] == 6 * 256 + 1280


def test_another_vae_replaces_the_models_and_must_fit_its_unet(tmp_path, tiny_pipeline_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**{**PRESETS["tiny"].vae, "scaling_factor": 0.5})
    vae.save_pretrained(tmp_path / "vae")  # a standalone VAE repo, as madebyollin/sdxl-vae-fp16-fix
    parts = load_components(str(tiny_pipeline_dir), vae=str(tmp_path / "vae"))
    assert parts.vae.config.scaling_factor == 0.5
    from align.modules import DPOModule

    assert DPOModule(model="tiny", vae=str(tmp_path / "vae")).vae.config.scaling_factor == 0.5
    parts = load_components("tiny", vae=str(tiny_pipeline_dir))  # a pipeline's vae subfolder
    assert parts.vae.config.latent_channels == 4
    with pytest.raises(ModelSourceError, match="vae '/nowhere/vae'"):
        load_components("tiny", vae="/nowhere/vae")
    AutoencoderKL(**{**PRESETS["tiny"].vae, "latent_channels": 8}).save_pretrained(
        tmp_path / "vae8"
    )
    with pytest.raises(ModelSourceError, match="8 latent channels, the denoiser takes 4"):
        load_components("tiny", vae=str(tmp_path / "vae8"))


def test_variant_and_revision_pass_through(tmp_path, tiny_pipeline_dir, monkeypatch):
    load_components("tiny").to_pipeline().save_pretrained(tmp_path / "fp16", variant="fp16")
    parts = load_components(str(tmp_path / "fp16"), variant="fp16")
    assert parts.unet.config.in_channels == 4
    with pytest.raises(ModelSourceError, match="variant 'bf16'"):
        load_components(str(tiny_pipeline_dir), variant="bf16")
    from diffusers import UNet2DConditionModel

    seen = {}
    original = UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **{k: v for k, v in kwargs.items() if k != "revision"})

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(spy))
    load_components(str(tiny_pipeline_dir), revision="main")
    assert seen["revision"] == "main"
