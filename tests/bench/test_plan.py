"""``align plan``: batch, steps, passes, learning rate, memory and time of a config, unrun."""

from pathlib import Path

import pytest

from align.cli import main

ROOT = Path(__file__).resolve().parents[2]
SD15 = str(ROOT / "configs/dpo/sd15.yaml")
TINY = str(ROOT / "configs/dpo/tiny.yaml")
FSDP_SDXL = str(ROOT / "configs/trainer/fsdp_sdxl.yaml")


def plan(capsys, *args) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_paper_dpo_run_on_16_gpus_matches_the_official_launcher(capsys):
    code, out, _ = plan(capsys, SD15, "--devices", "16", "--num-samples", "851293")
    assert code == 0
    assert "16 GPUs x 1 per micro-batch x accumulation 128 = 2,048 pairs per optimizer step" in out
    assert "2,000 optimizer steps; 4,096,000 pairs seen" in out
    assert "4.81 per pair" in out  # 4,096,000 / 851,293
    # an epoch: 851,293 // (16 GPUs x 8 workers) = 6,650 batches per worker, x 8, cut to whole
    # windows of 128
    assert "53,120 micro-batches per GPU = 415 steps" in out
    assert (
        "step 0: 4.096e-08" in out and "step 500: 2.048e-05" in out
    )  # linear warm-up, then constant
    memory = next(line for line in out.splitlines() if "GiB per GPU" in line)
    low, high = (float(x) for x in memory.split()[1].split("-"))
    assert 10 < low <= high < 30  # the meta-device estimate for SD1.5, 1 pair, checkpointing, AdamW
    assert " h on 16 x NVIDIA H100" in out and "MFU" in out
    table = out.split("vs the official launcher")[1]
    for setting in ("global batch", "learning rate", "warm-up steps", "steps", "beta", "precision"):
        assert any(line.split()[0] == setting.split()[0] for line in table.splitlines()[2:])
    assert "differs" not in table  # on 16 GPUs every setting is the official one


def test_six_gpus_use_the_nearest_global_batch_and_say_why(capsys):
    code, out, _ = plan(capsys, SD15, "--devices", "6", "--num-samples", "851293", "--no-estimate")
    assert code == 0
    assert "6 GPUs x 1 per micro-batch x accumulation 341 = 2,046 pairs" in out
    assert "2048 is not reachable on 6 GPUs x 1: 2046 is used" in out
    global_row = next(line for line in out.splitlines() if line.strip().startswith("global batch"))
    assert "not reachable" in global_row


def test_the_epoch_comes_from_the_shards_and_matches_the_loader(capsys, pair_shards):
    from align.data import PickAPicDataModule

    args = [
        TINY,
        "--data.init_args.train_shards",
        str(pair_shards),
        "--data.init_args.batches_per_epoch",
        "null",
        "--data.init_args.val_shards",
        "null",
        "--trainer.max_steps",
        "-1",
        "--trainer.max_epochs",
        "3",
        "--no-estimate",
    ]
    code, out, _ = plan(capsys, *args)
    assert code == 0
    assert "64 pairs (from the shards)" in out
    loader = PickAPicDataModule(
        train_shards=str(pair_shards), batch_size=4, num_workers=1
    ).train_dataloader()
    assert f"{len(loader)} micro-batches per GPU" in out  # 64 pairs / 4 = 16
    assert "48 optimizer steps" in out and "3.00 per pair" in out


def test_a_plan_that_cannot_fit_is_refused_with_the_number(capsys):
    code, out, err = plan(
        capsys,
        SD15,
        "--num-samples",
        "851293",
        "--gpu",
        "l40s",
        "--data.init_args.batch_size",
        "64",
        "--model.init_args.gradient_checkpointing",
        "false",
    )
    assert code == 1
    assert "needs at least" in err and "GiB per GPU" in err and "44.4 GiB" in err
    assert "time " not in out  # refused before the FLOPs are counted


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu", "b200"], "unknown GPU 'b200'"),
        (["--devices", "4096"], "global_batch_size 2048 cannot be reached"),
    ],
)
def test_bad_input_is_named_before_any_work(capsys, args, message):
    code, _, err = plan(capsys, SD15, "--no-estimate", *args)
    assert code == 2 and message in err


def test_missing_shards_leave_the_data_unknown(capsys, tmp_path):
    code, out, _ = plan(
        capsys, SD15, "--data.init_args.train_shards", str(tmp_path / "nope"), "--no-estimate"
    )
    assert code == 0
    assert "data        unknown" in out and "--num-samples" in out


def test_fsdp_shards_the_static_memory_over_the_gpus_that_share_it(capsys):
    from align.bench import plan as P
    from align.commands.plan import resolve

    fsdp = {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}
    full = {**fsdp, "init_args": {"activation_checkpointing_policy": ["Block"]}}
    assert P.fsdp_shards({"strategy": full, "num_nodes": 2}, 16) == (16, True)
    hybrid = {**fsdp, "init_args": {"sharding_strategy": "HYBRID_SHARD"}}
    assert P.fsdp_shards({"strategy": hybrid, "num_nodes": 2}, 16) == (8, False)
    grad_op = {**fsdp, "init_args": {"sharding_strategy": "SHARD_GRAD_OP"}}
    assert P.fsdp_shards({"strategy": grad_op}, 8) is None
    assert P.fsdp_shards({"strategy": "ddp"}, 8) is None

    step = P.step_config(resolve([TINY], []), "tiny")
    record = P.memory_record(step)
    static = record["static_fp32_frozen_gib"]
    whole, quarter = P.memory_gib(step), P.memory_gib(step, shards=4)
    for w, q in zip(whole, quarter):
        assert q == pytest.approx(w - 0.75 * static)
    code, out, _ = plan(capsys, TINY, "--config", FSDP_SDXL, "--num-samples", "1000")
    assert code == 0 and "checkpointing, FSDP: static memory / 4)" in out


def test_an_online_config_plans_its_round_batch(capsys):
    """The online module holds its rounds' batch in its ``data`` dict (it crashed the plan)."""
    online = str(ROOT / "configs/online/dpo_sd15.yaml")
    code, out, _ = plan(capsys, online, "--no-estimate")
    assert code == 0
    assert "8 GPUs x 1 per micro-batch x accumulation 32 = 256 pairs per optimizer step" in out
    assert "OnlinePreferenceDataModule does not stream data epochs" in out
