"""Named model presets built from config with random weights.

``tiny`` / ``tiny-xl`` / ``tiny-sd3`` / ``tiny-flux`` are SD1.5-, SDXL-, SD3- and FLUX.1-shaped
models small enough for CPU tests and the embedded default (in the style of diffusers' own tiny test
components); ``sd15-arch`` / ``sdxl-arch`` / ``sd35-arch`` (SD3.5 Medium) / ``flux-arch`` (FLUX.1
dev) are the real architectures with random weights, for speed and memory benchmarks without
downloading anything. Every preset uses the real CLIP tokenizer (built offline), so CLIP token ids
match the real models'; the T5 tokenizer of the SD3/FLUX presets is character-level (built offline:
the real one's vocabulary cannot be downloaded), so their T5 ids differ from the real T5's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

_CLIP_TINY = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,
    projection_dim=32,
)
_CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    projection_dim=768,
    hidden_act="quick_gelu",
)
_CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
    hidden_act="gelu",
)

_VAE_TINY = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=4,
    layers_per_block=1,
    sample_size=32,
    # a trained VAE's scaling factor gives image latents unit variance (SD's: 0.18215); this one
    # does the same for the random tiny encoder (measured on the synthetic shapes: std 1.0 at
    # seed 0), so images are not drowned by the diffusion noise. See ``point_posterior``.
    scaling_factor=5.5,
)
_VAE_SD = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

_UNET_TINY = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
_UNET_TINY_XL = dict(
    _UNET_TINY,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=64,
    attention_head_dim=[2, 4],
    transformer_layers_per_block=[1, 2],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)
_UNET_SD15 = dict(
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
_UNET_SDXL = dict(
    _UNET_SD15,
    block_out_channels=[320, 640, 1280],
    sample_size=128,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


# flow matching: SD3 (stabilityai/stable-diffusion-3.5-medium) and FLUX.1 (black-forest-labs/
# FLUX.1-dev), as their transformer, vae, scheduler and text_encoder_3 configs set them
_FLOW_SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
_FLOW_FLUX = {
    **_FLOW_SD3,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_VAE_FLOW = {
    **_VAE_SD,
    "sample_size": 1024,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_VAE_TINY_SD3 = {**_VAE_TINY, "latent_channels": 16, "shift_factor": 0.0609}
_VAE_TINY_FLUX = {**_VAE_TINY, "latent_channels": 16, "shift_factor": 0.1159}
_T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
)
_T5_TINY = dict(d_model=64, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
_SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
_SD3_TINY = dict(
    _SD35_MEDIUM,
    sample_size=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,  # the T5 width; both CLIPs' 32 + 32 are zero-padded to it
    caption_projection_dim=32,
    pooled_projection_dim=64,  # both CLIPs' projections, concatenated
    pos_embed_max_size=16,
    dual_attention_layers=(0,),
)
_FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2 x 2
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
_FLUX_TINY = dict(
    _FLUX_DEV,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)
FAMILIES = ("sd15", "sdxl", "sd3", "flux")
FLOW_FAMILIES = ("sd3", "flux")


@dataclass(frozen=True)
class Preset:
    """Everything needed to build one model family with random weights."""

    family: str  # one of FAMILIES
    # UNet2DConditionModel / SD3Transformer2DModel / FluxTransformer2DModel
    denoiser: dict[str, Any]
    vae: dict[str, Any]
    # CLIP text configs: SD1.5 one, SDXL two, SD3 two (L, G), FLUX one (L)
    text_encoders: list[dict[str, Any]]
    resolution: int  # native image size in pixels
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER))
    t5: dict[str, Any] | None = None  # SD3 / FLUX: the T5 encoder's config


PRESETS: dict[str, Preset] = {
    "tiny": Preset("sd15", _UNET_TINY, _VAE_TINY, [_CLIP_TINY], resolution=32),
    "tiny-xl": Preset("sdxl", _UNET_TINY_XL, _VAE_TINY, [_CLIP_TINY, _CLIP_TINY], resolution=32),
    "tiny-sd3": Preset(
        "sd3", _SD3_TINY, _VAE_TINY_SD3, [_CLIP_TINY] * 2, 32, dict(_FLOW_SD3), _T5_TINY
    ),
    "tiny-flux": Preset(
        "flux", _FLUX_TINY, _VAE_TINY_FLUX, [_CLIP_TINY], 32, dict(_FLOW_FLUX), _T5_TINY
    ),
    "sd15-arch": Preset("sd15", _UNET_SD15, _VAE_SD, [_CLIP_L], resolution=512),
    "sdxl-arch": Preset(
        "sdxl",
        _UNET_SDXL,
        vae={**_VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025},
        text_encoders=[_CLIP_L, _CLIP_BIGG],
        resolution=1024,
    ),
    "sd35-arch": Preset(
        "sd3",
        _SD35_MEDIUM,
        {**_VAE_FLOW, "scaling_factor": 1.5305, "shift_factor": 0.0609},
        [_CLIP_L, _CLIP_BIGG],
        1024,
        dict(_FLOW_SD3),
        _T5_XXL,
    ),
    "flux-arch": Preset(
        "flux",
        _FLUX_DEV,
        {**_VAE_FLOW, "scaling_factor": 0.3611, "shift_factor": 0.1159},
        [_CLIP_L],
        1024,
        dict(_FLOW_FLUX),
        _T5_XXL,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
