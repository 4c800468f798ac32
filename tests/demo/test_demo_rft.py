"""The demo's RFT runner: the real RFTModule + PromptDataModule through a Lightning Trainer, with the soft judge as
the reward, on a toy base; callbacks see the module, metrics land in the run's CSV."""

from __future__ import annotations

import csv

import lightning as L
import torch

from align.demo import world
from align.demo.base import BaseConfig, build_base
from align.demo.rft import train_rft


class Seen(L.Callback):
    def __init__(self):
        self.steps, self.unets = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)
        self.unets.append(module.unet)


def test_train_rft_runs_with_the_soft_judge_on_a_toy_base(tmp_path):
    torch.set_num_threads(1)
    base = build_base(tmp_path / "base", BaseConfig(scenes=64, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4))
    prompts = [world.caption(s) for s in world.scenes(6, seed=1, max_objects=1)]
    seen = Seen()
    module = train_rft(base, prompts, reward="shapes-judge", reward_source=None, seed=0, steps=2, lr=1e-4,
                       batch_size=2, callbacks=[seen], run_dir=tmp_path / "runs", num_steps=4, grad_steps=1,
                       lora_rank=4)
    assert seen.steps == [1, 2] and all(u is module.unet for u in seen.unets)
    assert module.direct_reward and module.prediction_type == "v_prediction"
    lora = [p for n, p in module.unet.named_parameters() if "lora_B" in n]
    assert lora and any(float(p.detach().abs().sum()) > 0 for p in lora)  # the LoRA moved off its zero init
    (metrics,) = (tmp_path / "runs").glob("rft-shapes-judge/seed0/metrics.csv")
    rows = list(csv.DictReader(open(metrics)))
    rewards = [float(r["train/reward_mean"]) for r in rows if r.get("train/reward_mean")]
    assert len(rewards) == 2 and all(0.0 <= x <= 1.0 for x in rewards)
