"""Global-batch statistics: single-process behaviour, and a real 2-process gloo group on CPU."""

import math
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from align.objectives.distributed import all_reduce_mean, is_distributed
from align.objectives.kto import kto_loss, kto_reference_point
from align.objectives.reward import DegenerateDirection, common_direction


def test_single_process_is_local_mean():
    assert not is_distributed()
    mean, count = all_reduce_mean(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    torch.testing.assert_close(mean, torch.tensor([2.0, 4.0]))
    assert count.item() == 2


def test_counts_weight_rows():
    mean, count = all_reduce_mean(torch.tensor([1.0, 4.0]), counts=torch.tensor([3.0, 1.0]))
    assert mean.item() == pytest.approx(7.0 / 4.0)
    assert count.item() == 4


def test_empty_gives_zero_not_nan():
    mean, count = all_reduce_mean(torch.zeros(0, 3))
    assert torch.equal(mean, torch.zeros(3)) and count.item() == 0


def test_result_is_detached_and_validated():
    x = torch.rand(4, requires_grad=True)
    assert not all_reduce_mean(x)[0].requires_grad
    with pytest.raises(ValueError):
        all_reduce_mean(torch.tensor(1.0))
    with pytest.raises(ValueError):
        all_reduce_mean(torch.rand(4), counts=torch.ones(3))


# --- two ranks ------------------------------------------------------------------------------------
# Rank 0 holds three samples and rank 1 one: a mean of per-rank means would be wrong, so would a
# local mean. implicit rewards g = ref - policy; global mean 0.7 / 4 = 0.175
RANK_G = {0: [0.4, 0.3, 0.2], 1: [-0.2]}
RANK_TEXT = {0: [[1.0, 0.0]] * 3, 1: [[0.0, 3.0]]}  # global mean (0.75, 0.75) -> (1, 1)/sqrt 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        g = torch.tensor(RANK_G[rank])
        ref = torch.full_like(g, 0.5)
        policy = ref - g
        desirable = torch.ones_like(g, dtype=torch.bool)
        out = {
            "z0": kto_reference_point(policy, ref),
            "kto_z0": kto_loss(policy, ref, desirable).reference_point,
            "direction": common_direction(torch.tensor(RANK_TEXT[rank])),
            # one row per rank: too few locally (min_count 2), enough globally
            "direction_one_each": common_direction(torch.eye(2)[rank : rank + 1]),
            # rank 1 holds no rows at all and must still get the global answer
            "direction_empty_rank": common_direction(
                torch.tensor([[2.0, 0.0], [0.0, 2.0]]) if rank == 0 else torch.zeros(0, 2)
            ),
            "weighted": all_reduce_mean(
                torch.tensor([float(rank + 1)]), counts=torch.tensor([float(rank + 1)])
            )[0],
        }
        try:  # two rows globally: too few for min_count 3, on every rank alike
            common_direction(torch.ones(1, 2), min_count=3)
            out["degenerate_raised"] = False
        except DegenerateDirection:
            out["degenerate_raised"] = True
        torch.save(out, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_batch_statistics_across_two_ranks(tmp_path):
    world_size = 2
    # fork, not spawn: the children inherit the imported torch instead of paying seconds to import
    # it again, and need not re-import this test module by name. Safe here:
    # they set one thread before any op.
    mp.start_processes(
        _worker,
        args=(world_size, _free_port(), str(tmp_path)),
        nprocs=world_size,
        join=True,
        start_method="fork",
    )
    diag = torch.full((2,), 1 / math.sqrt(2))
    for rank in range(world_size):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["z0"].item() == pytest.approx(0.175, abs=1e-6), rank
        assert out["kto_z0"].item() == pytest.approx(0.175, abs=1e-6), rank
        torch.testing.assert_close(out["direction"], diag)
        torch.testing.assert_close(out["direction_one_each"], diag)
        torch.testing.assert_close(out["direction_empty_rank"], diag)
        # count-weighted, not (1 + 2) / 2
        assert out["weighted"].item() == pytest.approx((1 * 1 + 2 * 2) / 3)
        assert out["degenerate_raised"] is True
