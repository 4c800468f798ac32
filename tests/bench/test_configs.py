"""The switch configs compose with the method configs and resolve to what they claim
(parsed by LightningCLI)."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from align.cli import main

ROOT = Path(__file__).resolve().parents[2]


def printed_config(capsys, *configs) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", str(ROOT / c))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    "name,cls,check",
    [
        ("adamw", "torch.optim.AdamW", lambda a: a["fused"] is False and a["foreach"] is True),
        ("adamw_fused", "torch.optim.AdamW", lambda a: a["fused"] is True),
        (
            "adafactor",
            "Adafactor",
            lambda a: a["eps"] == [1e-30, 1e-3] and a["relative_step"] is False,
        ),
        ("adamw8bit", "bitsandbytes.optim.AdamW8bit", lambda a: True),
    ],
)
def test_optimizer_configs_swap_the_optimizer_but_keep_the_method_lr(capsys, name, cls, check):
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        # optional: without it the CLI names what is missing
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "fit",
                    "--config",
                    str(ROOT / "configs/dpo/tiny.yaml"),
                    "--config",
                    str(ROOT / "configs/optim/adamw8bit.yaml"),
                    "--print_config",
                ]
            )
        said = str(exit_info.value.code) + capsys.readouterr().err
        assert exit_info.value.code != 0 and "align[8bit]" in said
        return
    cfg = printed_config(capsys, "configs/dpo/tiny.yaml", f"configs/optim/{name}.yaml")
    opt = cfg["model"]["init_args"]["optimizer"]
    assert opt["class_path"].endswith(cls) and check(opt["init_args"])
    method = printed_config(capsys, "configs/dpo/tiny.yaml")["model"]["init_args"]["optimizer"]
    assert opt["init_args"]["lr"] == method["init_args"]["lr"]  # the method's, not the group's


def test_perf_configs_set_their_switches(capsys):
    fast = printed_config(capsys, "configs/dpo/tiny.yaml", "configs/perf/fast.yaml")
    assert fast["trainer"]["precision"] == "bf16-mixed"
    assert (
        fast["model"]["init_args"]["channels_last"] and fast["model"]["init_args"]["compile_unet"]
    )
    low = printed_config(
        capsys, "configs/dpo/tiny.yaml", "configs/perf/lowmem.yaml", "configs/perf/lora.yaml"
    )
    args = low["model"]["init_args"]
    assert (
        args["gradient_checkpointing"]
        and args["reference_inference_mode"]
        and args["lora_rank"] == 64
    )


def built_strategy(cfg: dict):
    """The trainer's strategy of a printed config, instantiated as LightningCLI does."""
    import jsonargparse
    from lightning.pytorch.strategies import Strategy

    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy_cfg = {"strategy": cfg["trainer"]["strategy"]}
    return parser.instantiate_classes(parser.parse_object(strategy_cfg)).strategy


def test_fsdp_sdxl_config_parses_and_builds_the_strategy(capsys):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = printed_config(capsys, "configs/dpo/sdxl.yaml", "configs/trainer/fsdp_sdxl.yaml")
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    # FSDP checkpoints the blocks instead
    assert cfg["model"]["init_args"]["gradient_checkpointing"] is False
    strategy = built_strategy(cfg)
    assert isinstance(strategy, FSDPStrategy)
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert {BasicTransformerBlock, ResnetBlock2D} <= set(wrap._module_classes)
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.sharding_strategy.name == "FULL_SHARD"


@pytest.mark.parametrize("method", ["configs/dpo/flux.yaml", "configs/kto/sd35.yaml"])
def test_fsdp_flow_config_turns_a_flow_lora_config_into_sharded_full_fine_tuning(capsys, method):
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.t5.modeling_t5 import T5Block

    cfg = printed_config(capsys, method, "configs/trainer/fsdp_flow.yaml")
    model = cfg["model"]["init_args"]
    assert model["lora_rank"] is None and model["frozen_dtype"] is None
    assert model["gradient_checkpointing"] is False  # FSDP checkpoints the blocks instead
    strategy = built_strategy(cfg)
    assert isinstance(strategy, FSDPStrategy)
    blocks = {JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock}
    assert blocks | {T5Block} <= set(strategy.kwargs["auto_wrap_policy"]._module_classes)
    assert strategy.sharding_strategy.name == "FULL_SHARD"
