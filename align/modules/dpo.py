"""Diffusion-DPO as a LightningModule: pairs in, ``dpo_loss`` out (see ``align.objectives.dpo``)."""

from __future__ import annotations

from align.modules.base import DiffusionModule
from align.objectives.dpo import dpo_loss


def check_no_ties(datamodule) -> None:
    """DPO reads a pair as (winner, loser) and ignores its label, so a 0.5/0.5 pair would train as a
    win for image 0. The official code drops ties; a data module set to keep them fails here,
    before the first step."""
    if datamodule is not None and getattr(datamodule, "drop_ties", True) is False:
        raise ValueError(
            "DPO needs a winner in every pair, but the data module keeps ties (drop_ties: false); "
            "set data.init_args.drop_ties: true, as the official code does"
        )


class DPOModule(DiffusionModule):
    """Diffusion-DPO on batches of 2B images (winners first);
    winner and loser share noise and timestep.

    Args:
        beta: the KL strength in the official convention (with the 0.5 factor):
            5000 for SD1.5 and SDXL.
        Everything else: see ``DiffusionModule``.
    """

    def __init__(self, beta: float = 5000.0, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta

    def on_fit_start(self) -> None:
        check_no_ties(getattr(self.trainer, "datamodule", None))

    def pair_errors(self, batch: dict):
        # one caption per pair, shared by winner and loser
        cond = self.prompt_embeds(batch).repeat(2)
        latents = self.encode_latents(batch)
        noise, t = self.sample_noise(latents, group=2)
        time_ids = self.time_ids(batch, latents.shape[0])
        policy = self.unet_errors(latents, noise, t, cond, time_ids)
        ref = self.unet_errors(latents, noise, t, cond, time_ids, reference=True)
        return policy, ref

    def objective_output(self, batch: dict):
        return dpo_loss(*self.pair_errors(batch), beta=self.beta)
