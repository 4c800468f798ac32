"""The base model of the shapes world: the ``tiny`` preset's VAE, then its UNet and text encoder,
trained on rendered scenes whose captions are deliberately noisy (each object's colour named wrongly
with ``p_color``, its shape with ``p_shape``), so that the base is imperfectly aligned and
preference tuning has something to fix.

The base predicts the velocity (``v_prediction``, as SD 2.x) rather than the noise: at high noise
the velocity target is almost ``-x0``, so the caption's information (which colour, which cell) is
worth a large share of the loss, and a tiny UNet learns to follow captions in a few hundred steps;
with the noise target the caption changes the loss by ~1e-3 at those steps and the same UNet ignored
its captions after 800 steps (measured). Its noise schedule is rescaled to zero terminal SNR (Lin et
al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): with SD's schedule the
last timestep keeps 7% of the image, so the model learned to read where the object is from the
starting noise instead of from the caption. And its VAE downsamples by 4 (one more block than the
``tiny`` preset's), so the tiny UNet works on 8x8 latents: its two levels then span the whole
picture, and it learned which cell a caption names within ~900 steps (judge 0.63 at 900 steps, vs
0.17 after 800 steps on the preset's 16x16 latents, where objects landed wherever the starting noise
put them; measured on one-object scenes). The default world now has one or two objects per scene.

Its conditioning is wider than the ``tiny`` preset's: a 64-wide text encoder (the preset's: 32) and
cross-attention at both UNet levels (the preset's: at the 8x8 level and the mid block). With the
preset's, the base read shapes in two-object scenes at chance (judge 0.530 on the validation
captions), and no method moved held-out captions beyond noise in a few hundred steps, not even plain
SFT on perfectly captioned images; with the wider one (docs/demo/design.md) the base drew 93% of
shapes right (judge 0.721 there), and DPO, KTO, their flipped controls and both RFTs moved the
held-out score by 0.05-0.15 in the report. The UNet grows from 0.80 M to 1.08 M parameters.

``family: sd3`` trains a flow-matching base instead: the ``tiny-sd3`` preset's MMDiT transformer
(deeper and wider: ``flow_layers`` x ``flow_head_dim``) and its two CLIPs (T5 stays as initialised)
on the same scenes with SD3's flow objective (logit-normal timesteps, velocity target) and the same
4x-downsampling VAE. Its latents have 4 channels, not SD3's 16: with 16 (1,024 numbers per image
for a 0.6 M-parameter transformer to generate) the base drew blurred blobs and satisfied 0.38 of
the validation captions' facts, where the UNet base satisfies 0.71 (measured). Its schedule's shift
is ``flow_shift``: SD3's 3.0 serves 1024-pixel images, whose redundancy needs more noise to hide
them; 8x8 latents need none. Its T5 is cut at ``flow_text_tokens`` rows (the configs say
``max_sequence_length: 77``): the transformer's attention over SD3's 77 + 256 text rows made a
training step 4-7x slower on the CPU than over 77 + 77 (measured), and every caption of the world
fits in 64 T5 tokens.

The result is a diffusers pipeline directory (``load_components(dir)`` /
``StableDiffusionPipeline.from_pretrained``) with a ``demo_base.json`` recording the settings; it is
reused when the settings match.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from align.demo import world


# the preset each family's base starts from
PRESETS = {"sd15": "tiny", "sd3": "tiny-sd3"}


@dataclass
class BaseConfig:
    family: str = "sd15"  # or "sd3": a flow-matching (SD3-shaped) base
    scenes: int = 4000
    max_objects: int = (
        2  # one or two objects per scene (see ``align.demo.run.caption_sets`` for why two)
    )
    p_color: float = 0.25
    p_shape: float = 0.15
    vae_steps: int = 400
    vae_batch: int = 16
    vae_lr: float = 2e-3
    unet_steps: int = 1500  # at 1000, DPO and KTO did not rise (docs/demo/design.md)
    unet_batch: int = 32
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    vae_blocks: int = (
        3  # down blocks of the VAE: 2 is the tiny preset's (16x16 latents), 3 gives 8x8
    )
    text_width: int = (
        64  # the text encoder's width = the UNet's cross-attention dim (tiny preset: 32)
    )
    cross_attention_levels: int = (
        2  # UNet levels with cross-attention, from the top (tiny preset: 1)
    )
    # sd3 only: the transformer's depth and head width (4 heads), the flow schedule's shift, and
    # the T5 rows of its conditioning (the pipeline's default: 256; the longest caption takes 64)
    flow_layers: int = 4
    flow_head_dim: int = 16
    flow_shift: float = 1.0
    flow_text_tokens: int = 77
    flow_latent_channels: int = 4  # SD3's VAE has 16 (see the module's docstring)
    seed: int = 0
    # torch threads of the training: the same settings and threads give the same weights to the
    # bit (measured), another thread count other weights (another reduction order)
    threads: int = 2


META = "demo_base.json"
# the code a base is trained by: a change to either trains a new base instead of reusing one
BASE_SOURCES = ("demo/base.py", "demo/world.py")


def code_fingerprint(family: str = "sd15") -> str:
    """sha256 (16 hex digits) of ``BASE_SOURCES`` and of the preset a ``family`` base starts from
    (weights at seed 0, configs, schedule, token ids): a change to the loader or the presets that
    leaves that model as it was keeps the trained base, one that changes it trains a new one."""
    from align.models import load_components

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in BASE_SOURCES:
        digest.update((root / name).read_bytes())
    parts = load_components(PRESETS[family], seed=0)
    for config in (parts.unet.config, parts.vae.config, parts.noise_scheduler.config):
        public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        for name, tensor in module.state_dict().items():
            digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    digest.update(parts.text_encoders[0].config.to_json_string(use_diff=False).encode())
    digest.update(str(parts.tokenizers[0]("a red circle at the top left").input_ids).encode())
    return digest.hexdigest()[:16]


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def render_dataset(
    n: int, seed: int, max_objects: int = world.GRID * world.GRID
) -> tuple[list, torch.Tensor]:
    """``n`` random scenes and their images as a (n, 3, 32, 32) tensor in [-1, 1]."""
    rng = random.Random(seed)
    scenes = [world.random_scene(rng, max_objects=max_objects) for _ in range(n)]
    images = np.stack([np.asarray(world.render(s, rng)) for s in scenes])
    return scenes, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _progress(stage: str, step: int, total: int, loss: float, start: float) -> None:
    if step == 1 or step % max(1, total // 10) == 0 or step == total:
        log(f"{stage} step {step}/{total} loss {loss:.4f} ({time.time() - start:.0f}s)")


def demo_vae(blocks: int, preset: str = "tiny", **overrides):
    """``preset``'s VAE with ``blocks`` down/up blocks (channels doubling from 8):
    downsampling 2**(blocks-1); ``overrides``: other config fields (``latent_channels``)."""
    from diffusers import AutoencoderKL

    from align.models.presets import get_preset

    config = dict(get_preset(preset).vae)
    config.update(
        block_out_channels=[8 * 2**i for i in range(blocks)],
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        **overrides,
    )
    return AutoencoderKL(**config)


def demo_conditioning(parts, cfg: BaseConfig) -> None:
    """Replace ``parts``' UNet and text encoder by fresh ones with ``cfg``'s conditioning capacity
    (unchanged when it is the tiny preset's): ``text_width`` for the text encoder (its MLP twice as
    wide) and the UNet's cross-attention dim, cross-attention blocks at the top
    ``cross_attention_levels`` levels."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, text_cfg = dict(parts.unet.config), parts.text_encoders[0].config.to_dict()
    levels = len(unet_cfg["block_out_channels"])
    if not 1 <= cfg.cross_attention_levels <= levels:
        raise ValueError(
            f"cross_attention_levels must be 1..{levels}, got {cfg.cross_attention_levels}"
        )
    attend = [i < cfg.cross_attention_levels for i in range(levels)]
    if cfg.text_width == text_cfg["hidden_size"] and attend == [
        t.startswith("CrossAttn") for t in unet_cfg["down_block_types"]
    ]:
        return
    unet_cfg.update(
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)],
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.text_width // 8,
    )
    text_cfg.update(
        hidden_size=cfg.text_width,
        intermediate_size=2 * cfg.text_width,
        projection_dim=cfg.text_width,
    )
    parts.unet = UNet2DConditionModel.from_config(unet_cfg)
    parts.text_encoders[0] = CLIPTextModel(CLIPTextConfig(**text_cfg))


def train_vae(vae, images: torch.Tensor, cfg: BaseConfig, gen: torch.Generator) -> None:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = time.time()
    for step in range(1, cfg.vae_steps + 1):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = images[idx]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * dist.kl().mean()
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _progress("vae", step, cfg.vae_steps, loss.item(), start)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat(
        [
            vae.encode(images[i : i + batch]).latent_dist.parameters
            for i in range(0, len(images), batch)
        ]
    )


def demo_transformer(parts, cfg: BaseConfig) -> None:
    """Replace ``parts``' SD3 transformer by a fresh one ``cfg.flow_layers`` deep with heads
    ``cfg.flow_head_dim`` wide, for the demo's latents (``sample_size`` from the VAE)."""
    from diffusers import SD3Transformer2DModel

    config = dict(parts.unet.config)
    heads = config["num_attention_heads"]
    config.update(
        sample_size=world.SIZE // parts.vae_scale_factor,
        in_channels=parts.vae.config.latent_channels,
        out_channels=parts.vae.config.latent_channels,
        num_layers=cfg.flow_layers,
        attention_head_dim=cfg.flow_head_dim,
        caption_projection_dim=heads * cfg.flow_head_dim,  # the joint blocks' width
    )
    parts.unet = SD3Transformer2DModel.from_config(config)


def prompt_encoder(parts, cfg: BaseConfig):
    """The base's text encoding: the model's own, the flow base's T5 cut at ``flow_text_tokens``."""
    from align.models.prompts import build_prompt_encoder

    rows = {"max_sequence_length": cfg.flow_text_tokens} if parts.is_flow else {}
    return build_prompt_encoder(parts, "clip", **rows)


def train_denoiser(
    parts, moments: torch.Tensor, scenes: list, cfg: BaseConfig, gen: torch.Generator
) -> None:
    """The UNet (noise schedule and ``cfg.prediction_type``) or the flow transformer (SD3's flow
    objective) and the text encoders, on noisy captions of ``scenes``."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from align.models.flow import FlowMatching, transformer_forward
    from align.objectives.common import diffusion_target

    denoiser, encode = parts.unet, prompt_encoder(parts, cfg)
    scheduler, vae = parts.noise_scheduler, parts.vae.config
    flow = FlowMatching() if parts.is_flow else None
    # SD3's T5 stays as initialised: backpropagating through it cost as much as the transformer
    trained = parts.text_encoders[:-1] if parts.is_flow else parts.text_encoders
    params = [p for m in (denoiser, *trained) for p in m.parameters()]
    for m in parts.text_encoders:
        m.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    for m in (denoiser, *trained):
        m.train()
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    rng = random.Random(cfg.seed + 1)
    warmup = max(1, cfg.unet_steps // 20)
    start = time.time()
    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=gen)
        captions = [
            ""
            if rng.random() < cfg.caption_dropout
            else world.caption(world.noisy_scene(scenes[i], rng, cfg.p_color, cfg.p_shape))
            for i in idx.tolist()
        ]
        latents = DiagonalGaussianDistribution(moments[idx]).sample(generator=gen)
        latents = (latents - (vae.shift_factor or 0.0)) * vae.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        cond = encode(captions)
        if flow is None:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
            noisy = scheduler.add_noise(latents, noise, t)
            pred = denoiser(noisy, t, encoder_hidden_states=cond.embeds).sample
            target = diffusion_target(cfg.prediction_type, latents, noise, t, scheduler)
        else:
            t = flow.sample_timesteps(scheduler, len(idx), gen)
            noisy = flow.noisy(latents, noise, t, scheduler)
            pred = transformer_forward(parts.family, denoiser, noisy, t, cond)
            target = noise - latents
        loss = F.mse_loss(pred, target)
        lr = (
            cfg.unet_lr
            * min(1.0, step / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.unet_steps)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _progress(parts.denoiser_name, step, cfg.unet_steps, loss.item(), start)
    for m in (denoiser, *parts.text_encoders):
        m.eval().requires_grad_(False)


def base_matches(out_dir: str | Path, cfg: BaseConfig) -> bool:
    """Whether ``out_dir`` holds a base trained with ``cfg`` by the current code."""
    meta = Path(out_dir) / META
    if not meta.is_file():
        return False
    saved = json.loads(meta.read_text())
    code = code_fingerprint(cfg.family)
    return saved.get("config") == asdict(cfg) and saved.get("code") == code


def build_base(out_dir: str | Path, cfg: BaseConfig | None = None, force: bool = False) -> Path:
    """Train the base (or reuse ``out_dir`` when the same settings and code trained it);
    returns ``out_dir``."""

    cfg = cfg or BaseConfig()
    if cfg.family not in PRESETS:
        raise ValueError(f"the demo base family must be one of {list(PRESETS)}, got {cfg.family!r}")
    out = Path(out_dir)
    if not force and base_matches(out, cfg):
        log(f"base model: reusing {out}")
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_base(out, cfg)
    finally:
        torch.set_num_threads(threads)


def _train_base(out: Path, cfg: BaseConfig) -> Path:
    from align.models import load_components

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts = load_components(PRESETS[cfg.family], seed=cfg.seed)
    latents = {"latent_channels": cfg.flow_latent_channels} if parts.is_flow else {}
    if latents or cfg.vae_blocks != len(parts.vae.config.block_out_channels):
        parts.vae = demo_vae(cfg.vae_blocks, PRESETS[cfg.family], **latents)
        parts.unet.register_to_config(sample_size=world.SIZE // 2 ** (cfg.vae_blocks - 1))
    if parts.is_flow:
        demo_transformer(parts, cfg)
        schedule = {"shift": cfg.flow_shift}
    else:
        demo_conditioning(parts, cfg)
        schedule = dict(prediction_type=cfg.prediction_type)
        if cfg.zero_terminal_snr:
            schedule.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    parts.noise_scheduler = type(parts.noise_scheduler).from_config(
        parts.noise_scheduler.config, **schedule
    )
    scenes, images = render_dataset(cfg.scenes, cfg.seed, cfg.max_objects)
    log(f"base model: {cfg.scenes} scenes rendered; training the VAE ({cfg.vae_steps} steps)")
    train_vae(parts.vae, images, cfg, gen)
    moments = encode_moments(parts.vae, images)
    means = moments[:, : parts.vae.config.latent_channels]
    # unit-variance latents, as SD's 0.18215 was chosen; flow VAEs also centre them (shift_factor)
    std = float(means.std())
    shift = {"shift_factor": float(means.mean())} if parts.is_flow else {}
    parts.vae.register_to_config(scaling_factor=1.0 / std, **shift)
    t1 = time.time()
    log(
        f"base model: VAE done in {t1 - t0:.0f}s (latent std {std:.3f}); training the "
        f"{parts.denoiser_name} and text encoders ({cfg.unet_steps} steps)"
    )
    train_denoiser(parts, moments, scenes, cfg, gen)
    tmp = out.with_name(out.name + ".tmp")
    parts.save_pretrained(tmp)
    (tmp / META).write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "code": code_fingerprint(cfg.family),
                "seconds": {"vae": t1 - t0, "unet": time.time() - t1},
            },
            indent=2,
        )
        + "\n"
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    log(f"base model: trained in {time.time() - t0:.0f}s -> {out}")
    return out
