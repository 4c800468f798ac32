"""Every shipped method config composes with every shipped trainer config, and the tiny ones train
with both CPU trainer configs (one process, two DDP processes with validation) on the data `make`
writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = {
    "configs/kto/sd15_launcher.yaml": "configs/kto/sd15.yaml"
}  # a part composed on its base
METHODS = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "configs").glob("*/*.yaml")
    if p.parent.name not in ("trainer", "optim", "perf")
    and str(p.relative_to(ROOT)) not in OVERLAYS
)
TRAINERS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/trainer").glob("*.yaml"))
# trainer configs written for one kind of model: full-parameter FSDP of a flow transformer sets
# the diffusion module's lora_rank and frozen_dtype, which the CLIP preference model does not have
NOT_FOR = {
    "configs/trainer/fsdp_flow.yaml": {
        "configs/demo/preference_model.yaml",
        "configs/longalign/denscore_clip_h.yaml",
        "configs/longalign/denscore_tiny.yaml",
    }
}
TINY = [m for m in METHODS if Path(m).stem.endswith("tiny")]
DATA = [
    ["data", "synthetic", "pickapic", "--out", "data/synthetic/pickapic"],
    ["data", "synthetic", "kto", "--out", "data/synthetic/kto"],
    ["data", "synthetic", "longcaption", "--out", "data/synthetic/longcaption"],
    ["data", "synthetic", "longpairs", "--out", "data/synthetic/longpairs"],
]
REWARDS = "artifacts/tiny-rewards"  # the monitors' gold rewards (`make train-grpo`)


def align(*args, cwd, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, "-m", "align.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_method_config_composes_with_every_trainer_config(trainer, capsys):
    from align.cli import main

    for method in METHODS + list(OVERLAYS):
        if method in NOT_FOR.get(trainer, ()):
            continue
        parts = [OVERLAYS[method], method] if method in OVERLAYS else [method]
        with pytest.raises(SystemExit) as done:
            main(
                [
                    "fit",
                    *[a for part in parts for a in ("--config", str(ROOT / part))],
                    "--config",
                    str(ROOT / trainer),
                    "--print_config",
                ]
            )
        assert done.value.code in (0, None), (method, trainer, capsys.readouterr().err[-2000:])
        callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"] or []
        if "fsdp" in trainer:  # none that refuses FSDP (tests/callbacks/test_fsdp.py)
            names = {c["class_path"].rsplit(".", 1)[-1] for c in callbacks}
            assert not names & {"ValidationImages", "RewardMonitor", "DiffusersExport"}, method


@pytest.fixture(scope="module")
def made_data(tmp_path_factory):
    """The synthetic sets, tiny Denscore and tiny rewards `make train-*` writes, in a scratch
    directory."""
    cwd = tmp_path_factory.mktemp("matrix")
    for args in DATA:
        done = align(*args, cwd=cwd)
        assert done.returncode == 0, done.stderr[-2000:]
    for args in (("tiny-denscore", "data/synthetic/tiny-denscore"), ("tiny-rewards", REWARDS)):
        done = align("data", *args, cwd=cwd)
        assert done.returncode == 0, done.stderr[-2000:]
    (cwd / "configs/eval").mkdir(parents=True)  # the GRPO and online configs' prompts
    (cwd / "configs/eval/prompts-tiny.txt").write_text(
        (ROOT / "configs/eval/prompts-tiny.txt").read_text()
    )
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["configs/trainer/cpu.yaml", "configs/trainer/ddp_cpu2.yaml"])
@pytest.mark.parametrize("method", TINY)
def test_tiny_configs_train_with_the_cpu_trainer_configs(method, trainer, made_data):
    done = align(
        "fit",
        "--config",
        str(ROOT / method),
        "--config",
        str(ROOT / trainer),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
        cwd=made_data,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", TINY)
def test_tiny_configs_run_whole_on_two_ranks(method, made_data, tmp_path):
    """Each tiny config as shipped (its loggers, images, exports, monitors) on two DDP ranks, with
    a checkpoint and export at every step: every rank makes the same broadcasts (one that does not
    leaves the other waiting: NCCL hangs)."""
    audit = tmp_path / "audit"
    tests = str(ROOT / "tests")  # the rank audit is a test fixture
    done = align(
        "fit",
        *("--config", str(ROOT / method), "--config", str(ROOT / "configs/trainer/ddp_cpu2.yaml")),
        *("--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path)),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        *("--trainer.callbacks.every_n_train_steps", "1"),
        *("--trainer.callbacks.dirpath", str(tmp_path / "every-step")),
        *("--trainer.callbacks+=rank_audit.RankAudit", "--trainer.callbacks.out_dir", str(audit)),
        cwd=made_data,
        timeout=300,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((audit / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["broadcasts"] == ranks[1]["broadcasts"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", ["configs/parts/model/tiny_sd3.yaml", "configs/parts/model/tiny_flux.yaml"]
)
@pytest.mark.parametrize(
    "method", ["configs/dpo/tiny.yaml", "configs/kto/tiny.yaml", "configs/grpo/tiny.yaml"]
)
@pytest.mark.parametrize("trainer", ["configs/trainer/cpu.yaml", "configs/trainer/ddp_cpu2.yaml"])
def test_tiny_configs_train_the_flow_presets(method, model, trainer, made_data, tmp_path):
    """The same method configs on SD3- and FLUX-shaped models, exported where `align sample` reads
    them (the flow sampler, the family's pipeline)."""
    export = "[{class_path: align.callbacks.DiffusersExport, init_args: {dirpath: %s}}]" % (
        tmp_path / "export"
    )
    done = align(
        "fit",
        *("--config", str(ROOT / method), "--config", str(ROOT / model)),
        *("--config", str(ROOT / trainer)),
        *("--trainer.max_steps", "2", "--trainer.val_check_interval", "2"),
        *("--trainer.logger", "false", "--trainer.enable_checkpointing", "false"),
        *("--trainer.callbacks", export),
        cwd=made_data,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp_path / "p.txt").write_text("a red circle\n")
    done = align(
        "sample",
        "--checkpoint",
        str(tmp_path / "export" / "final"),
        "--prompts",
        str(tmp_path / "p.txt"),
        "--out",
        str(tmp_path / "images"),
        "--steps",
        "2",
        cwd=made_data,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "images/meta.json").read_text())["scheduler"] == "flow-euler"


@pytest.mark.slow
def test_a_flow_run_resumes_at_its_step_with_its_weights(made_data, tmp_path):
    """GRPO on the FLUX-shaped preset (LoRA): stopped at step 2, resumed to 4 from last.ckpt."""
    import torch

    args = [
        *("fit", "--config", str(ROOT / "configs/grpo/tiny.yaml")),
        *("--config", str(ROOT / "configs/parts/model/tiny_flux.yaml")),
        *("--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)),
        *("--trainer.callbacks", "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "),
    ]
    args[-1] += f"init_args: {{dirpath: {tmp_path / 'ckpt'}, save_last: true}}}}]"
    assert align(*args, "--trainer.max_steps", "2", cwd=made_data).returncode == 0
    first = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    done = align(
        *args,
        "--trainer.max_steps",
        "4",
        "--ckpt_path",
        str(tmp_path / "ckpt/last.ckpt"),
        cwd=made_data,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    second = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    assert (first["global_step"], second["global_step"]) == (2, 4)
    lora = [k for k in first["state_dict"] if "lora_" in k]
    assert lora and set(second["state_dict"]) == set(first["state_dict"])  # trainable weights only
    assert any(not torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in lora)
