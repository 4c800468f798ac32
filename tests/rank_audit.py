"""What each DDP rank saw and holds: the keys of the samples it trained on, a fingerprint of its
random stream at each step, a checksum of its weights, and how many broadcasts it made (a rank
that makes one the others do not leaves them out of step: NCCL hangs, gloo pairs the wrong calls).

A test fixture (tests/test_ddp.py): the two-process run names it by class path, with tests/ on
PYTHONPATH.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class RankAudit(L.Callback):
    """Writes ``<out_dir>/rank<R>.json`` at fit end: ``keys`` (samples trained on), ``streams`` (per
    batch, a draw from a copy of the module's noise/timestep generator as the batch left it) and
    ``weight_sum`` and ``broadcasts`` (the strategy's, from setup on)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.keys: list[str] = []
        self.streams: list[float] = []
        self.broadcasts = 0

    def setup(self, trainer, pl_module, stage) -> None:
        broadcast = trainer.strategy.broadcast

        def counted(*args, **kwargs):
            self.broadcasts += 1
            return broadcast(*args, **kwargs)

        trainer.strategy.broadcast = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.extend(batch.get("key", []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        generator = getattr(pl_module, "generator", None)
        if generator is not None:
            copy = torch.Generator(generator.device).set_state(generator.get_state())
            self.streams.append(torch.rand(1, generator=copy, device=generator.device).item())

    def on_fit_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            total = sum(p.double().sum().item() for p in pl_module.parameters() if p.requires_grad)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "keys": self.keys,
            "streams": self.streams,
            "weight_sum": total,
            "global_step": trainer.global_step,
            "broadcasts": self.broadcasts,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
