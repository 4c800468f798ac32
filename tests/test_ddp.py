"""Two CPU processes (gloo) under Lightning's DDP strategy, with a logger and the config saver on:
disjoint shards per rank, each rank its own noise and timesteps, identical weights after, and no
rank left waiting on a broadcast."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit_on_two_ranks(tmp_path, pair_shards, *args: str) -> None:
    """``align fit`` of the tiny DPO config on two gloo ranks with a CSV logger under
    ``tmp_path/logs``; a rank left waiting on a collective fails by the timeout."""
    cmd = [
        sys.executable,
        "-m",
        "align.cli",
        "fit",
        "--config",
        str(ROOT / "configs/dpo/tiny.yaml"),
        "--config",
        str(ROOT / "configs/trainer/ddp_cpu2.yaml"),
        "--data.train_shards",
        str(pair_shards),
        "--data.val_shards",
        "null",
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "2",
        "--trainer.val_check_interval",
        "null",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "logs"),
        *args,
    ]
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}  # the rank audit is a test fixture
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_rank_ddp_reads_disjoint_shards_and_stays_in_sync(tmp_path, pair_shards):
    audit = tmp_path / "audit"
    fit_on_two_ranks(
        tmp_path,
        pair_shards,
        "--trainer.max_steps",
        "3",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        "rank_audit.RankAudit",
        "--trainer.callbacks.out_dir",
        str(audit),
    )
    ranks = [json.loads((audit / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [
        3,
        3,
    ]
    # the fixture writes 16 pairs per shard
    shards = [{int(k) // 16 for k in r["keys"]} for r in ranks]
    assert shards[0] and shards[1] and shards[0].isdisjoint(shards[1])
    streams = [r["streams"] for r in ranks]
    assert len(streams[0]) == len(streams[1]) == 3 and all(a != b for a, b in zip(*streams))
    assert len(set(streams[0])) == 3  # and a new draw at every step
    assert ranks[0]["weight_sum"] == ranks[1]["weight_sum"]
    assert ranks[0]["broadcasts"] == ranks[1]["broadcasts"]
    # saved once, no rank hung; both ranks in one run directory (launched ranks inherit the name)
    assert len(list((tmp_path / "logs").glob("align-dpo/*/config.yaml"))) == 1
    assert len(list((tmp_path / "logs").glob("*/*"))) == 1


def test_checkpoint_exports_under_ddp_leave_no_rank_waiting(tmp_path, pair_shards):
    """The shipped callback lists export at each checkpoint into the run directory, which rank 0
    broadcasts: every rank must make the same broadcasts (pruning old exports on rank 0 alone used
    to hang the run at its first checkpoint)."""
    audit = tmp_path / "audit"
    fit_on_two_ranks(
        tmp_path,
        pair_shards,
        "--trainer.max_steps",
        "2",
        "--trainer.callbacks",
        "rank_audit.RankAudit",
        "--trainer.callbacks.out_dir",
        str(audit),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps",
        "1",
        "--trainer.callbacks+=align.callbacks.DiffusersExport",
        "--trainer.callbacks.keep",
        "1",
    )
    ranks = [json.loads((audit / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["broadcasts"] == ranks[1]["broadcasts"]
    exports = (tmp_path / "logs").glob("*/*/export/*")
    assert sorted(p.name for p in exports) == ["final"]  # step-1 pruned, step-2 renamed


def test_a_two_rank_run_resumed_mid_epoch_continues_exactly(tmp_path, pair_shards):
    """Stopped at step 2 of a 3-batch epoch and resumed to step 4 (into the next epoch): each rank
    trains on the same samples with the same random draws and ends with the same weights as the
    run that went through."""

    def run(audit: str, *args: str) -> list[dict]:
        fit_on_two_ranks(
            tmp_path,
            pair_shards,
            *("--trainer.max_steps", "4", "--data.batches_per_epoch", "3"),
            *("--trainer.callbacks", "rank_audit.RankAudit"),
            *("--trainer.callbacks.out_dir", str(tmp_path / audit)),
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            *("--trainer.callbacks.every_n_train_steps", "2"),
            *("--trainer.callbacks.save_top_k", "-1"),
            *("--trainer.callbacks.dirpath", str(tmp_path / audit / "ckpt")),
            *args,
        )
        return [json.loads((tmp_path / audit / f"rank{r}.json").read_text()) for r in range(2)]

    whole = run("whole")
    resumed = run("resumed", "--ckpt_path", str(tmp_path / "whole/ckpt/epoch=0-step=2.ckpt"))
    for full, rest in zip(whole, resumed):
        assert rest["global_step"] == 4 and len(rest["streams"]) == 2
        assert rest["keys"] == full["keys"][len(full["keys"]) // 2 :]
        assert rest["streams"] == full["streams"][2:]
        assert rest["weight_sum"] == full["weight_sum"]
