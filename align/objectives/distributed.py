"""Batch statistics over the *global* batch, for the few objectives that need one.

KTO's reference point and LongAlign's common text direction are means over the whole batch, and
under DDP a "batch" is spread over ranks, possibly unevenly (the last batch of an epoch, a shard
that ran dry, bad samples skipped). Averaging per-rank means would weight a rank holding 1 sample
like one holding 64, so we all-reduce *sums and counts* and divide once. When ``torch.distributed``
is not initialised every function here is the plain local computation, so objectives stay usable
(and testable) in a single process.

Statistics only: the all-reduce is not differentiable and the results are detached.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group exists (and so collectives must be called on every
    rank)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(
    values: torch.Tensor, counts: torch.Tensor | None = None, across_ranks: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count-weighted mean over dim 0 of ``values`` across every rank, and the global count.

    ``values`` has shape (N, *F): N rows held by this rank (N may be 0). ``counts`` (N,) weights
    each row; None means every row counts once. Returns ``(mean, count)``: ``mean`` of shape F
    (float32, detached) is sum_ranks sum_rows counts * values / sum_ranks sum_rows counts, and
    ``count`` is that denominator as a float32 scalar. When the global count is 0 the mean is zeros
    rather than NaN: callers that need a minimum count (e.g.
    :func:`align.objectives.reward.common_direction`) check ``count`` themselves.

    Every rank must call this (it is a collective), even one holding no rows; ``across_ranks=False``
    keeps it to this process's rows. Sums and counts travel
    in one float64 all-reduce: one collective, and no float32 rounding in sums of many rows.
    """
    if values.ndim < 1:
        raise ValueError(
            "values must have a leading batch dimension, got a scalar of shape "
            f"{tuple(values.shape)}"
        )
    values = values.detach().double()
    if counts is None:
        counts = torch.ones(values.shape[0], dtype=torch.float64, device=values.device)
    else:
        if counts.shape != values.shape[:1]:
            raise ValueError(
                f"counts must have shape ({values.shape[0]},), got {tuple(counts.shape)}"
            )
        counts = counts.detach().to(device=values.device, dtype=torch.float64)
    weights = counts.view(-1, *([1] * (values.ndim - 1)))
    total = (values * weights).sum(dim=0)
    packed = torch.cat([total.flatten(), counts.sum().view(1)])
    if across_ranks and is_distributed():
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    total, count = packed[:-1].view(values.shape[1:]), packed[-1]
    nonempty = count > 0  # a tensor, not a Python bool: no host sync on GPU
    mean = torch.where(
        nonempty,
        total / torch.where(nonempty, count, torch.ones_like(count)),
        torch.zeros_like(total),
    )
    return mean.float(), count.float()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any (a collective under DDP: a decision every rank
    must take together, e.g. skipping a step, or one rank would wait for the others forever)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
