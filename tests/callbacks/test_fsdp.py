"""Under FSDP every rank must join each all-gather of a sharded module: what would run the model on
rank 0 alone (images, the reward monitor, the diffusers export) or unevenly across ranks (online
rounds) refuses at start, and the FSDP trainer configs ship a callback list without them."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from align.callbacks import DiffusersExport, RewardMonitor, ValidationImages
from align.data.online import OnlinePreferenceDataModule

ROOT = Path(__file__).resolve().parents[2]
REFUSED = ("ValidationImages", "RewardMonitor", "DiffusersExport")


def callbacks():
    monitor = RewardMonitor(["a red circle"], reward="jpeg-compressibility", gold="aesthetic")
    return [ValidationImages(prompts=["a red circle"]), monitor, DiffusersExport()]


@pytest.mark.parametrize("callback", callbacks(), ids=REFUSED)
def test_rank_zero_model_callbacks_refuse_fsdp_at_start(callback):
    callback.setup(SimpleNamespace(strategy=DDPStrategy()), None, "fit")  # DDP: fine
    with pytest.raises(ValueError, match=f"{type(callback).__name__} uses the model on rank 0"):
        callback.setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")


def test_online_rounds_refuse_fsdp_at_start(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    dm = OnlinePreferenceDataModule(str(prompts), "jpeg-compressibility")
    dm.trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="train the online methods under DDP"):
        dm.setup("fit")


@pytest.mark.parametrize("trainer", ["fsdp_sdxl", "fsdp_flow"])
def test_the_fsdp_trainer_configs_replace_the_callbacks(trainer):
    config = yaml.safe_load((ROOT / f"configs/trainer/{trainer}.yaml").read_text())
    path = ROOT / "configs/trainer" / config["trainer"]["callbacks"]
    names = [c if isinstance(c, str) else c["class_path"] for c in yaml.safe_load(path.read_text())]
    assert names and not [n for n in names if n.rsplit(".", 1)[-1] in REFUSED]
