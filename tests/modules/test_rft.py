"""LongAlign reward fine-tuning: gradients reach only the new LoRA and flow through exactly the
chosen sampling steps; bad input (no segments, a batch of one prompt, a NaN reward) is skipped and
logged; the SFT LoRA is merged under the new one; the prompt data module;
a tiny end-to-end `align fit`."""

import csv
import glob
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import perturb_lora

from align.modules.rft import RFTModule, grad_step_indices
from align.modules.sampling import ddim_timesteps
from align.objectives.reward import rft_loss
from align.rewards.rft import SegmentPreference

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = [
    "A red circle on a white background. It sits in the top left corner.",
    "A large blue square in the center. The background is grey. Nothing else appears.",
    "Two green triangles. One is above the other. Both have sharp edges.",
]


@pytest.fixture(scope="module")
def denscore_dir(tmp_path_factory):
    from align.rewards.denscore import write_tiny_denscore

    return write_tiny_denscore(tmp_path_factory.mktemp("tiny-denscore") / "denscore")


def make(denscore_dir, objective=None, **kw):
    args = dict(
        model="tiny",
        prompt_encoder="segment",
        lora_rank=4,
        num_steps=4,
        grad_steps=2,
        guidance_scale=7.5,
    )
    args.update(kw)
    objective = objective or SegmentPreference("denscore", str(denscore_dir))
    return RFTModule(objective, **args).train()


def test_schedule_matches_the_official_one():
    ts = ddim_timesteps(1000, 50)
    assert ts.tolist() == list(range(999, 0, -20))  # official: time_all = range(999, 0, -20)
    for offset in range(10):  # official: time_all[rand_start::10], rand_start in [0, 9]
        assert grad_step_indices(50, 5, offset) == list(range(50))[offset::10]
    with pytest.raises(ValueError):
        grad_step_indices(50, 5, 10)
    with pytest.raises(ValueError):
        grad_step_indices(4, 5, 0)


def test_module_needs_a_lora_and_frozen_parts_stay_frozen(denscore_dir):
    with pytest.raises(ValueError, match="lora_rank"):
        RFTModule(SegmentPreference("denscore", str(denscore_dir)), model="tiny", lora_rank=0)
    m = make(denscore_dir)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and n.startswith("unet.") for n in trainable)
    assert not m.vae.training and not m.objective.reward.training and not m.prompt_encoder.training
    opt = m.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in m.parameters() if p.requires_grad
    }
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == set(
        trainable
    )  # the reward, VAE and text encoder never enter checkpoints
    offsets = {tuple(m.grad_indices(step)) for step in range(40)}
    assert offsets == {
        (0, 2),
        (1, 3),
    }  # 4 steps, 2 with gradients: stride 2, random offset in [0, 2)


def rft_objective(m, noise, indices, prompts=CAPTIONS):
    prepared = m.objective.prepare(list(prompts))
    images = m.decode(m.rollout(prepared.prompts, indices, noise=noise))
    out = m.objective.scores(images, prepared, grad=True)
    return rft_loss(out.decomposed.weighted)


def lora_grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def test_gradients_reach_only_lora_and_flow_through_exactly_the_chosen_steps(denscore_dir):
    m = make(denscore_dir)
    perturb_lora(m)
    noise = torch.randn(len(CAPTIONS), 4, 16, 16, generator=torch.Generator().manual_seed(1))

    calls = []
    hook = m.unet.register_forward_pre_hook(lambda mod, args: calls.append(torch.is_grad_enabled()))
    loss = rft_objective(m, noise, [1, 3])
    forward_calls = list(calls)
    hook.remove()
    # one CFG-batched UNet call per DDIM step; grad mode on at exactly the chosen steps
    assert forward_calls == [i in (1, 3) for i in range(4)]
    loss.backward()

    grads = lora_grads(m)
    assert set(grads) == {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in grads) and all(g.abs().sum() > 0 for g in grads.values())
    for frozen in (m.vae, m.prompt_encoder, m.objective):
        assert all(p.grad is None for p in frozen.parameters())

    # every step's contribution is separate and additive: grad({1, 3}) = grad({1}) + grad({3}), each
    # non-zero, so the gradient flows through the chosen UNet calls and through nothing else
    parts = []
    for idx in ([1], [3]):
        m.zero_grad(set_to_none=True)
        rft_objective(m, noise, idx).backward()
        parts.append(lora_grads(m))
    for name, g in grads.items():
        torch.testing.assert_close(g, parts[0][name] + parts[1][name], rtol=1e-4, atol=1e-7)
    assert all(sum(g.abs().sum() for g in p.values()) > 0 for p in parts)
    assert not rft_objective(m, noise, []).requires_grad  # no chosen step: nothing to train


def test_nan_reward_skips_the_step_and_is_logged(denscore_dir, monkeypatch):
    m = make(denscore_dir)
    real = m.objective.reward.image_features
    monkeypatch.setattr(m.objective.reward, "image_features", lambda px: real(px) * float("nan"))
    assert m.training_step({"caption": CAPTIONS}, 0) is None
    assert m._counts == {"skipped_nonfinite": 1}
    assert all(p.grad is None for p in m.parameters())


def test_batch_of_one_prompt_uses_the_saved_direction_or_is_skipped(denscore_dir):
    from align.objectives.reward import load_direction

    m = make(denscore_dir)
    assert m.training_step({"caption": CAPTIONS[:1]}, 0) is None  # degenerate, no fallback: skipped
    assert m._counts == {"skipped_degenerate": 1}

    m.objective.fallback_direction = load_direction(
        denscore_dir / "direction.safetensors"
    )  # fallback
    loss = m.training_step({"caption": CAPTIONS[:1]}, 1)
    assert loss is not None and torch.isfinite(loss) and loss.requires_grad
    assert m._counts == {"skipped_degenerate": 1, "direction_fallback": 1}
    m.training_step({"caption": CAPTIONS[:2]}, 2)  # a real batch estimates its own direction again
    assert m._counts["direction_fallback"] == 1

    o = m.objective
    o.fallback_direction, o.fixed_direction = (
        None,
        o.fallback_direction,
    )  # direction=<file>: fixed v
    assert m.training_step({"caption": CAPTIONS[:1]}, 3) is not None
    assert m._counts == {"skipped_degenerate": 1, "direction_fallback": 1}
    # the constructor arguments set exactly those buffers
    saved = str(denscore_dir / "direction.safetensors")
    o = SegmentPreference("denscore", str(denscore_dir), direction_fallback=saved)
    assert o.fixed_direction is None and torch.allclose(o.fallback_direction, load_direction(saved))


def test_prompts_without_segments_are_dropped_and_counted(denscore_dir, monkeypatch):
    m = make(denscore_dir)
    seen = []
    real = m.rollout
    monkeypatch.setattr(
        m, "rollout", lambda prompts, *a, **k: seen.append(list(prompts)) or real(prompts, *a, **k)
    )
    loss = m.training_step({"caption": ["...", CAPTIONS[0], "   ", CAPTIONS[1]]}, 0)
    assert loss is not None and seen == [[CAPTIONS[0], CAPTIONS[1]]]
    assert m._counts == {"skipped_no_segments": 2}
    assert m.training_step({"caption": ["", "?!"]}, 1) is None
    assert m._counts["skipped_empty_batch"] == 1 and m._counts["skipped_no_segments"] == 4


def test_sft_lora_is_merged_under_the_new_lora(denscore_dir, tmp_path):
    from align.modules.sft import SFTModule

    sft = SFTModule(model="tiny", prompt_encoder="segment", lora_rank=4, lora_alpha=16)  # scale 4
    perturb_lora(sft, seed=3)
    sft.export(tmp_path / "sft")
    m = make(
        denscore_dir, prompt_encoder="clip", prompt_encoder_args={}, init_lora=str(tmp_path / "sft")
    )
    assert m.encoder_kind == "clip"  # explicit encoder arguments win over the export's spec
    m = make(denscore_dir, prompt_encoder="clip", init_lora=str(tmp_path / "sft"))
    assert m.encoder_kind == "segment"  # no explicit args: the SFT export's prompt_encoder.json
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and ".default." in n for n in trainable)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 20])
    cond = sft.encode_prompts(CAPTIONS[:2]).embeds
    with torch.no_grad():
        want = sft.unet(x, t, encoder_hidden_states=cond).sample  # SFT base + its LoRA
        got = m.unet(x, t, encoder_hidden_states=cond).sample  # merged base + the new (zero) LoRA
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    out = m.export(tmp_path / "rft")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "prompt_encoder.json").read_text())["kind"] == "segment"
    assert json.loads((out / "rft.json").read_text())["init_lora"] == str(tmp_path / "sft")
    with pytest.raises(FileNotFoundError):
        make(denscore_dir, init_lora=str(tmp_path / "nowhere"))


def test_prompt_data_module_reads_files_and_shards_and_skips_empty_prompts(tmp_path):
    from align.data.prompts import PromptDataModule, read_prompt_sources
    from align.data.synthetic_long import write_synthetic_longcaption

    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join([CAPTIONS[0], "...", "", CAPTIONS[1], CAPTIONS[2]]) + "\n")
    dm = PromptDataModule(str(txt), batch_size=2, batches_per_epoch=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(len(b["caption"]) == 2 for b in batches)
    assert {c for b in batches for c in b["caption"]} == set(CAPTIONS)
    # "..." (blank lines are not prompts) is skipped in each of the 2 passes, its place refilled
    assert sum(b["skipped"].get("no_segments", 0) for b in batches) == 2

    shards = tmp_path / "shards"
    write_synthetic_longcaption(shards, samples=6, shards=2, resolution=16)
    got = read_prompt_sources(str(shards))
    assert len(got) == 6 and all(len(p.split(". ")) > 3 for p in got)
    dm = PromptDataModule(str(shards), batch_size=3, batches_per_epoch=2, shuffle=False)
    assert [len(b["caption"]) for b in dm.train_dataloader()] == [3, 3]
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        PromptDataModule(str(tmp_path / "nowhere.txt"))


def test_align_fit_end_to_end_on_the_tiny_default(denscore_dir, tmp_path, monkeypatch):
    from align.cli import main

    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAPTIONS) + "\n")
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/longalign/rft_tiny.yaml"),
            "--model.objective.init_args.source",
            str(denscore_dir),
            "--model.objective.init_args.direction_fallback",
            str(denscore_dir / "direction.safetensors"),
            "--model.num_steps",
            "4",
            "--model.grad_steps",
            "2",
            "--data.prompts",
            str(prompts),
            "--data.val_prompts",
            "null",
            "--data.batch_size",
            "2",
            "--data.num_workers",
            "0",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "null",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    run = Path(glob.glob(str(tmp_path / "logs/align-longalign-rft/*/"))[0])
    assert (run / "export/final/pytorch_lora_weights.safetensors").is_file()
    assert (run / "export/final/rft.json").is_file() and (run / "checkpoints/last.ckpt").is_file()
    rows = list(
        csv.DictReader(open(glob.glob(str(tmp_path / "logs/*/*/csv/version_*/metrics.csv"))[0]))
    )
    logged = set().union(*(r.keys() for r in rows))
    for name in (
        "train/loss",
        "train/reward_weighted",
        "train/reward_relevant",
        "train/reward_irrelevant",
        "train/reward_original",
        "train/reward_eta",
        "train/grad_norm",
    ):
        assert name in logged, name
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(0.0 <= x <= 1.0 for x in losses)
    assert os.path.exists(run / "config.yaml") and "RFTModule" in (run / "config.yaml").read_text()

    # the injected objective is part of the run: align export rebuilds it,
    # a resume may not change it
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp")]) == 0
    info = json.loads((tmp_path / "exp/rft.json").read_text())
    assert info["reward"] == "denscore" and info["w"] == 0.3
    with pytest.raises(SystemExit, match="model.objective"):
        main(
            [
                "fit",
                "--config",
                str(run / "config.yaml"),
                "--model.objective.init_args.w",
                "0.5",
                "--ckpt_path",
                str(run / "checkpoints/last.ckpt"),
            ]
        )
