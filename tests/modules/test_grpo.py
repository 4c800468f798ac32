"""GRPO: the sampler's stored log-probabilities are the ones the update recomputes; advantages skip
and count groups without one; bad settings fail at start; a tiny `align fit` trains, exports a LoRA
a stock diffusers pipeline loads, and resumes."""

import csv
import glob
import json
from pathlib import Path

import pytest
import torch

from helpers import online_config_files

from align.modules.grpo import GRPOModule
from align.rewards.weighted import WeightedReward, parse_rewards

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


def make(**kw):
    args = dict(model="tiny", lora_rank=4, group_size=2, num_steps=4, train_steps=2, updates=2)
    args.update(kw)
    return GRPOModule(WeightedReward("jpeg-compressibility"), **args)


def test_recomputed_log_probs_equal_the_sampled_ones():
    m = make()
    m.seed_streams("train", 0)
    rollout = m.sample(m.expand(PROMPTS))
    assert rollout["latents"].shape[:2] == (5, 4) and rollout["log_probs"].shape == (4, 4)
    rows = torch.tensor([3, 0])
    for step in range(4):
        log_prob, _ = m.step_log_prob(rollout, step, rows)
        torch.testing.assert_close(log_prob, rollout["log_probs"][step, rows], atol=1e-4, rtol=0)
        assert log_prob.requires_grad
    # the same streams give the same samples: a resumed batch repeats its draws
    m.seed_streams("train", 0)
    torch.testing.assert_close(m.sample(m.expand(PROMPTS))["latents"], rollout["latents"])


def test_reference_is_the_adapter_free_unet_when_kl_is_asked_for():
    m = make(kl_beta=0.1)
    assert m.use_lora_reference and m.ref_unet is None
    m.seed_streams("train", 0)
    rollout = m.sample(m.expand(PROMPTS))
    rows = torch.tensor([0, 1])
    policy = m.step_log_prob(rollout, 1, rows)[1]
    reference = m.step_log_prob(rollout, 1, rows, reference=True)[1]
    torch.testing.assert_close(policy, reference)  # LoRA B starts at zero
    assert not make().use_lora_reference  # kl_beta 0: no reference is run


def test_groups_without_advantage_are_counted_never_nan():
    m = make(group_size=2)
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    adv, valid = m.advantages(torch.tensor([0.3, 0.3, 0.1, float("nan"), 0.2, 0.6]))
    assert valid.tolist() == [False, False, False, False, True, True]
    assert torch.isfinite(adv).all() and adv[:4].abs().sum() == 0
    assert logged["train/groups_without_advantage"] == 2.0
    assert logged["train/nonfinite_rewards"] == 1.0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(group_size=1), "group_size"),
        (dict(eta=0.0), "eta"),
        (dict(train_steps=5), "train_steps"),
        (dict(updates=0), "updates"),
    ],
)
def test_bad_settings_fail_at_start(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_reward_specs():
    assert parse_rewards("pickscore, hps:0.5") == {"pickscore": 1.0, "hps": 0.5}
    assert parse_rewards("align.demo.soft_judge:shapes-judge") == {
        "align.demo.soft_judge:shapes-judge": 1.0
    }
    assert parse_rewards("a.b:c:2") == {"a.b:c": 2.0}
    with pytest.raises(ValueError, match="unknown reward"):
        WeightedReward("no-such-reward")
    with pytest.raises(ValueError, match="no reward"):
        parse_rewards(" , ")
    both = WeightedReward("jpeg-compressibility,jpeg-incompressibility:0.5")
    images = torch.rand(2, 3, 32, 32)
    total, parts = both(images, ["a", "b"])
    torch.testing.assert_close(total, -0.5 * parts["jpeg-incompressibility"])


def test_align_fit_trains_exports_and_resumes(tmp_path, monkeypatch, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    from align.cli import main

    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")
    online_config_files(tmp_path, PROMPTS)
    args = [
        "fit",
        "--config",
        str(ROOT / "configs/grpo/tiny.yaml"),
        "--model.num_steps",
        "4",
        "--model.train_steps",
        "2",
        "--data.prompts",
        str(prompts),
        "--data.val_prompts",
        str(prompts),
        "--data.batch_size",
        "2",
        "--data.val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.val_check_interval",
        "null",
    ]
    main([*args, "--trainer.max_steps", "4"])
    run = Path(glob.glob(str(tmp_path / "logs/align-grpo/*/"))[0])
    lora = run / "export/final"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    rows = list(csv.DictReader(open(next(run.glob("csv/version_0/metrics.csv")))))
    logged = set().union(*(r.keys() for r in rows))
    for name in ("train/loss", "train/reward", "train/ratio", "train/clip_frac", "val/reward"):
        assert name in logged, name
    assert max(int(r["step"]) for r in rows if r.get("train/loss")) >= 1
    monitored = json.loads((run / "reward_monitor.json").read_text())["history"]
    assert monitored[0]["step"] == 0 and "gold/clip" in monitored[0]

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="pt")
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(lora))
    tuned = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.equal(base, tuned)

    # resuming the run continues its optimizer steps (2 per batch)
    main([*args, "--trainer.max_steps", "6", "--ckpt_path", str(run / "checkpoints/last.ckpt")])
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6


def test_timestep_range_limits_the_trained_steps():
    m = make(timestep_range=[500, 1000], train_steps=2)
    assert m.timesteps.tolist() == [999, 749, 499, 249] and m.trainable_steps == [0, 1]
    with pytest.raises(ValueError, match=r"train_steps must be in \[1, 2\]"):
        make(timestep_range=[500, 1000], train_steps=3)
