"""Named model presets built from config with random weights.

``tiny`` / ``tiny-xl`` are SD1.5- and SDXL-shaped models small enough for CPU tests and the embedded
default (in the style of diffusers' own tiny test components); ``sd15-arch`` / ``sdxl-arch`` are the
real architectures with random weights, for speed and memory benchmarks without downloading
anything.
Every preset uses the real CLIP tokenizer (built offline), so token ids match SD's exactly.
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
    block_out_channels=[32, 64],
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=64,
    attention_head_dim=[2, 4],
    norm_num_groups=8,
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
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    sample_size=128,
    in_channels=4,
    out_channels=4,
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


@dataclass(frozen=True)
class Preset:
    """Everything needed to build one model family with random weights."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: list[dict[str, Any]]  # one (SD1.5) or two (SDXL) CLIP text configs
    resolution: int  # native image size in pixels
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER))

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2


PRESETS: dict[str, Preset] = {
    "tiny": Preset(unet=_UNET_TINY, vae=_VAE_TINY, text_encoders=[_CLIP_TINY], resolution=32),
    "tiny-xl": Preset(
        unet=_UNET_TINY_XL, vae=_VAE_TINY, text_encoders=[_CLIP_TINY, _CLIP_TINY], resolution=32
    ),
    "sd15-arch": Preset(unet=_UNET_SD15, vae=_VAE_SD, text_encoders=[_CLIP_L], resolution=512),
    "sdxl-arch": Preset(
        unet=_UNET_SDXL,
        vae={**_VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025},
        text_encoders=[{**_CLIP_L, "hidden_act": "quick_gelu"}, _CLIP_BIGG],
        resolution=1024,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
