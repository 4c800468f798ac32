"""RFT with a reward that is not CLIP-based (DRaFT / AlignProp style): loss = 1 - mean reward of the
decoded rollout, gradients reach only the new LoRA, a non-finite reward skips the step,
metrics are logged."""

from __future__ import annotations

import torch

from helpers import perturb_lora

from align.demo.soft_judge import SoftJudge
from align.modules.rft import RFTModule
from align.rewards.rft import DirectReward

CAPTIONS = [
    "a red square in the top left.",
    "a blue triangle in the bottom right.",
    "a green square in the top right.",
]


def make(**kw):
    args = dict(model="tiny", lora_rank=4, num_steps=4, grad_steps=1, guidance_scale=4.0)
    args.update(kw)
    return RFTModule(DirectReward("align.demo.soft_judge:shapes-judge"), **args).train()


def record_logs(module, monkeypatch) -> dict:
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    return logged


def test_training_step_maximises_the_reward_directly_and_trains_only_the_lora(monkeypatch):
    torch.manual_seed(0)
    m = make()
    assert isinstance(m.objective.reward, SoftJudge)
    perturb_lora(m)
    decoded = []
    real_decode = m.decode
    monkeypatch.setattr(
        m, "decode", lambda latents: decoded.append(real_decode(latents)) or decoded[-1]
    )
    logged = record_logs(m, monkeypatch)

    loss = m.training_step({"caption": CAPTIONS}, 0)
    assert loss is not None and loss.requires_grad and torch.isfinite(loss)
    (images,) = decoded
    assert images.shape == (3, 3, 32, 32)
    want = 1 - SoftJudge().score(images.detach(), CAPTIONS).mean()
    torch.testing.assert_close(loss.detach(), want)
    assert set(logged) == {"train/loss", "train/reward_mean"}
    torch.testing.assert_close(logged["train/reward_mean"], 1 - want)

    loss.backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert (
        trainable
        and set(grads) == trainable
        and all(".lora_" in n and n.startswith("unet.") for n in grads)
    )
    assert (
        all(torch.isfinite(g).all() for g in grads.values())
        and sum(g.abs().sum() for g in grads.values()) > 0
    )
    for frozen in (m.vae, m.prompt_encoder):
        assert all(p.grad is None for p in frozen.parameters())


def test_nonfinite_reward_skips_the_step_and_validation_logs_the_reward(monkeypatch):
    m = make()
    real = m.objective.reward.forward
    monkeypatch.setattr(
        m.objective.reward, "forward", lambda px, prompts: real(px, prompts) * float("nan")
    )
    assert m.training_step({"caption": CAPTIONS}, 0) is None
    assert m._counts == {"skipped_nonfinite": 1}
    assert all(p.grad is None for p in m.parameters())
    assert m.training_step({"caption": []}, 1) is None and m._counts["skipped_empty_batch"] == 1

    monkeypatch.setattr(m.objective.reward, "forward", real)
    logged = record_logs(m, monkeypatch)
    m.eval()
    m.validation_step({"caption": CAPTIONS[:2]}, 0)
    assert set(logged) == {"val/loss", "val/reward_mean"}
    assert 0.0 <= float(logged["val/reward_mean"]) <= 1.0
    torch.testing.assert_close(logged["val/loss"], 1 - logged["val/reward_mean"])
