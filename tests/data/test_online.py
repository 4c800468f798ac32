"""Online rounds: each epoch the policy renders, a reward pairs its images, the round trains on
them; rounds stay on disk and a run resumed at a round boundary reuses them; the reference is
refreshed to the policy; bad settings fail at start."""

import glob
import json
from pathlib import Path

import pytest
import torch

from helpers import online_config_files

from align.callbacks.reference import RefreshReference
from align.data.online import OnlinePreferenceDataModule

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


def fit(*extra):
    from align.cli import main

    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/online/dpo_tiny.yaml"),
            "--data.k",
            "3",
            "--data.steps",
            "2",
            "--data.data",
            '{"batch_size": 2, "resolution": 32, "crop": "center", "flip_prob": 0.0, '
            '"num_workers": 0, "batches_per_epoch": 2}',
            *extra,
        ]
    )


def test_rounds_train_on_their_own_pairs_and_resume_at_a_round_boundary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    online_config_files(tmp_path, PROMPTS)
    fit("--trainer.max_epochs", "1")
    run = Path(glob.glob(str(tmp_path / "logs/align-online/*/"))[0])
    first = run / "rounds/round-000/rank-0"
    assert len(list((first / "images").glob("*.png"))) == 6  # 2 prompts x k = 3
    assert len(list((first / "pairs").glob("*.tar"))) == 1
    scored = (first / "scores.jsonl").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in (first / "images").glob("*.png")}

    fit("--trainer.max_epochs", "2", "--ckpt_path", str(run / "checkpoints/last.ckpt"))
    second = run / "rounds/round-001/rank-0"
    assert (first / "scores.jsonl").read_text() == scored  # round 0 reused, not redone
    assert {p.name: p.stat().st_mtime_ns for p in (first / "images").glob("*.png")} == stamps
    names = {p.name for p in (second / "images").glob("*.png")}
    assert len(names) == 6 and not names & set(stamps)  # round 1's own seeds
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4
    history = json.loads((run / "reward_monitor.json").read_text())["history"]
    assert history[0]["step"] == 0


def test_reference_refresh_copies_the_policy_and_refuses_lora():
    from types import SimpleNamespace

    from align.modules import DPOModule

    module = DPOModule(model="tiny")
    with torch.no_grad():
        next(module.unet.parameters()).add_(1.0)
    callback = RefreshReference()
    trainer = SimpleNamespace(current_epoch=0, global_step=0)
    callback.on_fit_start(trainer, module)
    callback.on_train_epoch_start(trainer, module)  # round 0: the reference is the base
    assert not torch.equal(next(module.unet.parameters()), next(module.ref_unet.parameters()))
    trainer.current_epoch = 1
    callback.on_train_epoch_start(trainer, module)
    for a, b in zip(module.unet.parameters(), module.ref_unet.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="full fine-tuning"):
        callback.on_fit_start(trainer, DPOModule(model="tiny", lora_rank=4))


def test_bad_settings_fail_at_start(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    with pytest.raises(ValueError, match="unknown reward"):
        OnlinePreferenceDataModule(str(prompts), "no-such-reward")
    with pytest.raises(ValueError, match="k must be"):
        OnlinePreferenceDataModule(str(prompts), "jpeg-compressibility", k=1)
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(Exception, match="no prompts|empty"):
        OnlinePreferenceDataModule(str(empty), "jpeg-compressibility")
    dm = OnlinePreferenceDataModule(str(prompts), "jpeg-compressibility")
    from types import SimpleNamespace

    dm.trainer = SimpleNamespace(reload_dataloaders_every_n_epochs=0)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        dm.train_dataloader()


def test_a_batch_size_set_from_outside_data_sets_the_rounds_batch(tmp_path):
    """A trainer config (configs/trainer/fsdp_sdxl.yaml) sets data.init_args.batch_size for every
    method; the online data module passes it to its rounds' data module."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data = {"batch_size": 4, "resolution": 32}
    dm = OnlinePreferenceDataModule(str(prompts), "jpeg-compressibility", data=data, batch_size=2)
    assert dm.batch_size == 2 and dm.data == {"batch_size": 2, "resolution": 32}
    alone = OnlinePreferenceDataModule(str(prompts), "jpeg-compressibility", data=data)
    assert alone.batch_size == 4
