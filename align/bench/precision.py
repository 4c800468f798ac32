"""How much a precision setting adds to the DPO logit: per-sample errors of a UNet under autocast
against the same UNet in float64, turned into the logit's scale (``0.5 * beta * (e_w - e_l)``).

DPO learns from the difference of two errors of ~0.1 that differ by ~1e-4; at beta 5000 a rounding
error of 1e-5 in that difference is 0.025 of logit. Measured on random latents and a random UNet of
the preset (SD1.5-shaped presets: ``tiny``, ``sd15-arch``).
"""

from __future__ import annotations

import torch

from align.models import load_components
from align.models.presets import get_preset
from align.modules.base import Float32Conv2d, float32_output
from align.objectives.common import per_sample_error

SETTINGS = {
    "fp32": (None, False),
    "bf16": (torch.bfloat16, False),
    "bf16+fp32-output": (torch.bfloat16, True),
    "fp16": (torch.float16, False),
    "fp16+fp32-output": (torch.float16, True),
}


def _errors(unet, noisy, t, cond, target, dtype, fp32_output: bool) -> torch.Tensor:
    unet.conv_out.__class__ = Float32Conv2d if fp32_output else torch.nn.Conv2d
    with (
        torch.no_grad(),
        torch.autocast(noisy.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
    return per_sample_error(pred.float(), target)


def logit_noise(
    preset: str = "tiny", pairs: int = 64, beta: float = 5000.0, device: str = "cpu", seed: int = 0
) -> dict[str, float]:
    """Std over ``pairs`` of ``0.5 * beta * ((e_w - e_l) - (e_w - e_l)_float64)`` for every
    setting."""
    family = get_preset(preset).family
    if family != "sd15":  # before building it: flux-arch would be 12 B random weights on the host
        raise ValueError(
            f"--logit-noise calls an SD1.5-style UNet with text conditioning only; {preset!r} is "
            f"{family} (SDXL's time ids and the flow transformers are not measured here)"
        )
    parts = load_components(preset, seed=seed)
    unet, scheduler = parts.unet.to(device).eval(), parts.noise_scheduler
    float32_output(unet)
    gen = torch.Generator().manual_seed(seed)
    side = parts.resolution // parts.vae_scale_factor
    latents = torch.randn(2 * pairs, unet.config.in_channels, side, side, generator=gen)
    noise = torch.randn(pairs, *latents.shape[1:], generator=gen).repeat(2, 1, 1, 1)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), generator=gen).repeat(2)
    cond = torch.randn(pairs, 77, unet.config.cross_attention_dim, generator=gen).repeat(2, 1, 1)
    noisy = scheduler.add_noise(latents, noise, t)
    inputs = [x.to(device) for x in (noisy, t, cond, noise)]

    def diff(errors: torch.Tensor) -> torch.Tensor:
        return (errors[:pairs] - errors[pairs:]).double()

    exact_inputs = [x.double() if x.is_floating_point() else x for x in inputs]
    exact = diff(_errors(unet.double(), *exact_inputs, None, False))
    unet.float()
    out = {}
    for name, (dtype, fp32_output) in SETTINGS.items():
        d = diff(_errors(unet, *inputs, dtype, fp32_output))
        out[name] = float((0.5 * beta * (d - exact)).std())
    return out
