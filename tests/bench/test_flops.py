"""FLOP counts from torch's FLOP counter: positive, linear in the batch, complete (backward and
reference included), and computable for full-size presets on the meta device without allocating
their weights."""

import psutil
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from align.bench.flops import count_step_flops
from align.bench.memory import activation_memory, static_memory
from align.bench.step import BareStep, StepConfig, build_module, make_batch


@pytest.mark.parametrize("meta", [True, False])
def test_flop_count_is_positive_and_linear_in_the_batch(meta):
    one = count_step_flops(StepConfig(batch=1), meta=meta)
    three = count_step_flops(StepConfig(batch=3), meta=meta)
    assert one.unet > 0 and one.total >= one.unet
    assert three.unet == 3 * one.unet
    # cached latents and embeddings: only the UNets count
    assert three.images == 6 and one.other == 0


def test_step_counts_policy_forward_backward_and_reference_forward():
    cfg = StepConfig(batch=2)
    step = count_step_flops(cfg)
    module = build_module(cfg, meta=True)
    c, h, w = module.components.vae.config.latent_channels, 16, 16
    cond = module.prompt_embeds(make_batch(module, cfg.replace(cached_text=False))).repeat(2)
    with FlopCounterMode(display=False) as counter:
        module.unet(
            torch.empty(4, c, h, w, device="meta"),
            torch.zeros(4, dtype=torch.long, device="meta"),
            encoder_hidden_states=cond.embeds,
        )
    forward = counter.get_total_flops()
    # policy forward (1) + backward (2: input and weight gradients) + reference forward (1); the
    # first convolution needs no input gradient, so slightly under 4
    assert 3.9 * forward < step.unet <= 4 * forward
    lora = count_step_flops(cfg.replace(lora_rank=4))
    assert lora.unet < 0.85 * step.unet  # frozen base weights get no weight gradients


def test_pixels_add_the_vae_encoder_and_captions_the_text_encoder():
    cached = count_step_flops(StepConfig(batch=1))
    raw = count_step_flops(StepConfig(batch=1, cached_latents=False, cached_text=False))
    assert raw.unet == cached.unet and cached.text == 0 and raw.text > 0 and raw.other > 0


def test_sd15_arch_counts_on_the_meta_device_without_allocating():
    rss = psutil.Process().memory_info().rss
    flops = count_step_flops(StepConfig(preset="sd15-arch", batch=1))
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 512 * 2**20  # two float32 SD1.5 UNets alone would be 6.4 GiB
    # one pair at 512 px: 2 images x (forward + backward + reference forward) of ~0.8 TFLOP per
    # forward
    assert 5e12 < flops.unet < 8e12


def test_memory_estimate_of_tiny_matches_its_parameters():
    cfg = StepConfig(batch=1, optimizer="adamw")
    est = static_memory(cfg)
    module = build_module(cfg)
    n_unet = sum(p.numel() for p in module.unet.parameters())
    assert est.trainable_params == est.policy_unet_params == est.reference_unet_params == n_unet
    assert est.weights == est.gradients == 4 * n_unet and est.optimizer_state == 8 * n_unet
    for name in ("adamw", "adafactor"):  # the estimate is what the real optimizer allocates
        step = BareStep(build_module(cfg.replace(optimizer=name)), cfg.replace(optimizer=name))
        step(make_batch(step.module, cfg), 0)
        real = sum(
            v.numel() * v.element_size()
            for state in step.optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.ndim > 0
        )
        assert static_memory(cfg.replace(optimizer=name)).optimizer_state == real
    plain, checkpointed = (
        activation_memory(cfg),
        activation_memory(cfg.replace(gradient_checkpointing=True)),
    )
    assert plain.largest_block == 0 and 0 < checkpointed.largest_block < plain.saved
    assert 0 < checkpointed.saved < checkpointed.peak < plain.saved
    assert activation_memory(cfg, torch.bfloat16).saved < plain.saved
