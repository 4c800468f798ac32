"""The global batch as a config's unit: accumulation follows from the world size at start."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def accumulation_for(global_batch_size: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(accumulation, the global batch it gives): the nearest whole number of micro-batches per GPU.

    A global batch smaller than one micro-batch on every GPU cannot be reached:
    an error naming the numbers.
    """
    per_window = micro_batch * world_size
    if global_batch_size < 1 or global_batch_size < per_window:
        raise ValueError(
            f"global_batch_size {global_batch_size} cannot be reached: one micro-batch on every "
            f"GPU is already {world_size} x {micro_batch} = {per_window} samples. Lower "
            "data.batch_size, use fewer GPUs or raise global_batch_size"
        )
    accumulation = max(1, round(global_batch_size / per_window))
    return accumulation, accumulation * per_window


def apply_global_batch(trainer, datamodule, configured_accumulation: int = 1) -> int | None:
    """Set ``trainer.accumulate_grad_batches`` from ``datamodule.global_batch_size`` (when it has
    one) and return the global batch; a hand-set accumulation that disagrees is an error naming
    both."""
    target = getattr(datamodule, "global_batch_size", None)
    if target is None:
        return None
    world = trainer.num_devices * trainer.num_nodes
    accumulation, actual = accumulation_for(target, datamodule.batch_size, world)
    if configured_accumulation not in (1, accumulation):
        raise ValueError(
            f"trainer.accumulate_grad_batches {configured_accumulation} disagrees with "
            f"data.global_batch_size {target} ({world} GPUs x {datamodule.batch_size} per "
            f"micro-batch needs {accumulation}): set one of them"
        )
    if actual != target:
        log.warning(
            "global batch %d is not reachable on %d GPUs x %d per micro-batch: using %d "
            "(accumulation %d)",
            target,
            world,
            datamodule.batch_size,
            actual,
            accumulation,
        )
    trainer.accumulate_grad_batches = accumulation
    return actual
