"""Iterative DPO/KTO: the reference becomes the policy at the start of every round.

Each round (epoch) of an online run trains on pairs the policy drew at the round's start
(``align.data.online``); with this callback the reference is that same policy, so every round is
one DPO step away from the model that made its data (iterative / on-policy DPO). Full fine-tuning
only: with LoRA the reference is the adapter-free UNet, which a refresh cannot move (use
``lora_rank: 0`` or leave the reference fixed). A resumed run refreshes again at its first epoch
start: exact at a round boundary; resumed inside a round, the reference is the policy at the
resume (warned).
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class RefreshReference(L.Callback):
    def __init__(self, every_n_epochs: int = 1):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self._resumed = False

    def on_fit_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "ref_unet", None) is None:
            raise ValueError(
                "RefreshReference needs a reference copy to refresh: full fine-tuning "
                "(lora_rank: 0; with LoRA the reference is the adapter-free UNet)"
            )
        self._resumed = trainer.global_step > 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if self._resumed:
            self._resumed = False
            if trainer.fit_loop.epoch_loop.batch_progress.current.processed:
                log.warning("resumed inside round %d: the reference is the policy now", epoch)
            if epoch % self.every_n_epochs:
                return
        elif epoch == 0 or epoch % self.every_n_epochs:
            return
        policy = getattr(pl_module.unet, "_orig_mod", pl_module.unet)
        reference = getattr(pl_module.ref_unet, "_orig_mod", pl_module.ref_unet)
        with torch.no_grad():
            for ref, new in zip(reference.parameters(), policy.parameters(), strict=True):
                ref.copy_(new.to(ref.dtype))
        log.info("round %d: the reference is now the policy", epoch)
