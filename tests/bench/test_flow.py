"""The bench on the flow families (SD3/SD3.5, FLUX.1) and SDXL: FLOP counts on the meta device equal
the CPU's, the synthetic batch has the prompt encoder's shapes, memory estimates find the blocks the
transformers checkpoint, the full-size presets stay on the meta device, and ``align plan`` names
them."""

import json
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F

from align.bench.flops import count_step_flops
from align.bench.memory import (
    SavedTensors,
    _saved_bytes,
    activation_memory,
    memory_efficient_attention,
    static_memory,
)
from align.bench.plan import preset_of
from align.bench.step import StepConfig, build_module, embedding_shapes, make_batch
from align.cli import main
from align.models.presets import PRESETS

SD15 = str(Path(__file__).resolve().parents[2] / "configs/dpo/sd15.yaml")


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux", "tiny-xl"])
def test_a_dpo_step_counts_the_same_flops_on_the_meta_device_and_the_cpu(preset):
    cfg = StepConfig(preset=preset, batch=2)
    meta, cpu = count_step_flops(cfg, meta=True), count_step_flops(cfg, meta=False)
    assert meta.unet > 0 and meta.images == 4
    # cached latents and embeddings: the denoiser is all of the step, on either device
    assert meta.unet == cpu.unet == meta.total == cpu.total
    lora = count_step_flops(cfg.replace(lora_rank=4))  # the family's default LoRA targets
    assert 0 < lora.unet < meta.unet  # frozen base weights get no weight gradients


@pytest.mark.parametrize(
    "preset,embeds,pooled",
    [
        # SD3: 77 CLIP rows + 256 T5 rows at T5's width; pooled = both CLIPs' projections
        ("tiny-sd3", (77 + 256, 64), 32 + 32),
        # FLUX.1: 512 T5 rows; pooled = CLIP-L's
        ("tiny-flux", (512, 64), 32),
    ],
)
def test_the_cached_batch_has_the_prompt_encoders_shapes(preset, embeds, pooled):
    cfg = StepConfig(preset=preset, batch=3)
    module = build_module(cfg)
    assert embedding_shapes(module) == (embeds, pooled)
    batch = make_batch(module, cfg)
    # 16 latent channels (mean and log-variance): the module packs FLUX's latents itself
    assert batch["latent_moments"].shape == (6, 2 * 16, 16, 16)  # 32 px, VAE factor 2
    assert batch["prompt_embeds"].shape == (3, *embeds)
    assert batch["pooled_embeds"].shape == (3, pooled)
    assert torch.isfinite(module.training_step(batch, 0))


@pytest.mark.parametrize(
    "preset,blocks",
    [
        ("tiny-sd3", {"JointTransformerBlock"}),
        ("tiny-flux", {"FluxTransformerBlock", "FluxSingleTransformerBlock"}),
        ("tiny", {"ResnetBlock2D", "BasicTransformerBlock"}),
    ],
)
def test_memory_estimates_find_the_blocks_the_denoiser_checkpoints(preset, blocks):
    cfg = StepConfig(preset=preset, batch=1, gradient_checkpointing=True)
    assert _saved_bytes(cfg, torch.float32)[2] == blocks
    plain = activation_memory(cfg.replace(gradient_checkpointing=False))
    checkpointed = activation_memory(cfg)
    assert plain.largest_block == 0 and 0 < checkpointed.largest_block < plain.saved
    assert 0 < checkpointed.saved < plain.saved
    static = static_memory(cfg)
    assert static.policy_unet_params == static.reference_unet_params > 0
    assert 0 < static.text_encoder_params < static.frozen_encoder_params


def test_attention_as_diffusers_dispatcher_calls_it_saves_no_score_matrix():
    # FLUX's attention goes through diffusers' dispatcher, which passes enable_gqa=False
    q, k, v = (torch.empty(1, 2, 64, 8, device="meta", requires_grad=True) for _ in range(3))
    with memory_efficient_attention(), SavedTensors() as saved:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=False)
    assert 0 < saved.bytes < 2 * 64 * 64 * 4  # q, k, v, out and the log-sum-exp, no 64 x 64


@pytest.mark.parametrize("preset", ["sd35-arch", "flux-arch"])
def test_full_size_flow_presets_stay_on_the_meta_device(preset):
    rss = psutil.Process().memory_info().rss
    module = build_module(StepConfig(preset=preset, batch=1), meta=True)
    grown = psutil.Process().memory_info().rss - rss
    assert {t.device.type for t in [*module.parameters(), *module.buffers()]} == {"meta"}
    t5 = module.components.text_encoders[-1]
    assert sum(p.numel() for p in t5.parameters()) > 4.7e9  # T5-XXL, built as shapes only
    assert grown < 512 * 2**20  # T5-XXL alone in float32 would be 17.7 GiB


def test_a_local_flow_model_maps_to_its_architecture_preset(tmp_path):
    for name in ("sd35-arch", "flux-arch"):
        folder = tmp_path / name / "transformer"
        folder.mkdir(parents=True)
        config = {"_class_name": "X", **json.loads(json.dumps(PRESETS[name].denoiser))}
        (folder / "config.json").write_text(json.dumps(config))
        assert preset_of(str(tmp_path / name)) == name
    schnell = tmp_path / "schnell" / "transformer"
    schnell.mkdir(parents=True)
    (schnell / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    assert preset_of(str(tmp_path / "schnell")) is None  # not FLUX.1 dev's architecture
    assert preset_of("black-forest-labs/FLUX.1-dev") == "flux-arch"


@pytest.mark.slow  # ~30 s: the full SD3.5 architecture on the meta device
def test_plan_of_an_sd35_dpo_run_estimates_its_memory(capsys):
    args = [
        "plan",
        SD15,
        "--model.init_args.model",
        "stabilityai/stable-diffusion-3.5-medium",
        "--trainer.precision",
        "bf16-mixed",
        "--num-samples",
        "1000",
        "--gpu",
        "h200",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    memory = next(line for line in out.splitlines() if "GiB per GPU" in line)
    assert "(sd35-arch, adamw-fused, checkpointing)" in memory
    low, high = (float(x) for x in memory.split()[1].split("-"))
    # two 2.24 B-parameter transformers (policy with AdamW) and T5-XXL, 1 pair at 512 px
    assert 40 < low <= high < 139.8


def test_align_bench_times_a_flow_step_with_its_flops(tmp_path, capsys):
    path = tmp_path / "bench.jsonl"
    args = ["bench", "--preset", "tiny-flux", "--batch", "1", "--steps", "1", "--warmup", "0"]
    assert main([*args, "--json", str(path)]) == 0
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["mode"] == "lightning" and record["median_step_s"] > 0
    flops = count_step_flops(StepConfig(preset="tiny-flux", batch=1))
    assert record["unet_flops_per_step"] == flops.unet > 0
    assert "tiny-flux" in capsys.readouterr().out
