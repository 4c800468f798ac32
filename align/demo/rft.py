"""Reward fine-tuning (RFT) in the shapes world: the base's new LoRA trained to maximise a reward of its own samples.

With ``reward="shapes-judge"`` the reward is the judge's differentiable relaxation (``align.demo.soft_judge``),
maximised directly through the sampling chain (``RFTModule``'s direct-reward path); the exact judge stays the
evaluator (the callbacks sample ``module.unet`` and judge). Training goes through the real ``RFTModule`` and
``PromptDataModule`` with a Lightning ``Trainer``, as the other methods' runs (``align.demo.methods.fit``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch

from align.demo import soft_judge  # noqa: F401  registers the "shapes-judge" reward


def train_rft(base_dir: str | Path, prompts: list[str], reward: str, reward_source: str | None, seed: int, steps: int,
              lr: float, batch_size: int, callbacks: list, run_dir: str | Path, num_steps: int = 10,
              grad_steps: int = 2, guidance: float = 4.0, lora_rank: int = 8, reward_options: dict | None = None,
              accelerator: str = "cpu"):
    """Train a new LoRA of rank ``lora_rank`` on the base at ``base_dir`` for ``steps`` optimiser steps of
    ``batch_size`` prompts drawn from ``prompts`` (reshuffled each pass); returns the ``RFTModule``.

    Each step samples with DDIM (``num_steps`` steps, CFG ``guidance``), keeps gradients through ``grad_steps``
    of them and maximises ``reward`` (a registry name; ``reward_source`` where its weights are, ``reward_options``
    its factory options, e.g. the soft judge's ``tau``) of the decoded images. AdamW at ``lr`` (no weight
    decay), gradients clipped at norm 1, CSV metrics under ``run_dir``, no checkpoints. ``callbacks`` are
    Lightning callbacks; they receive the module (``module.unet`` is the LoRA-wrapped policy UNet).
    """
    from align.data.prompts import PromptDataModule
    from align.modules.rft import RFTModule

    L.seed_everything(seed, workers=True, verbose=False)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prompt_file = run_dir / f"rft-prompts-seed{seed}.txt"
    prompt_file.write_text("".join(p.replace("\n", " ").strip() + "\n" for p in prompts), encoding="utf-8")
    module = RFTModule(model=str(base_dir), lora_rank=lora_rank, reward=reward, reward_source=reward_source,
                       reward_options=reward_options, num_steps=num_steps, grad_steps=grad_steps,
                       guidance_scale=guidance, seed=seed,
                       optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0))
    data = PromptDataModule(str(prompt_file), batch_size=batch_size, batches_per_epoch=steps, seed=seed)
    logger = L.pytorch.loggers.CSVLogger(str(run_dir), name=f"rft-{reward}", version=f"seed{seed}")
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=logger,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, callbacks=list(callbacks),
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    return module
