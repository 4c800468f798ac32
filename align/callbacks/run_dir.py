"""Where a run's artifacts live: the directory Lightning's ModelCheckpoint derives from the first
logger."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L


def run_dir(trainer: L.Trainer) -> Path:
    """``<save_dir>/<name>/<version>`` of the first logger (checkpoints go to
    ``<that>/checkpoints``)."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    path = os.path.join(save_dir, str(logger.name), version)
    return Path(trainer.strategy.broadcast(path))
