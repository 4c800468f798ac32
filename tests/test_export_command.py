"""`align export`: a run's checkpoint as a diffusers folder with a card, pushed or ready to push."""

from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.lightning_cli import run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, pair_shards):
    cwd = tmp_path_factory.mktemp("export-run")
    mp = pytest.MonkeyPatch()
    mp.chdir(cwd)
    run_lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs/dpo/tiny.yaml"),
            "--data.train_shards",
            str(pair_shards),
            "--data.val_shards",
            "null",
            "--data.num_workers",
            "0",
            "--data.batch_size",
            "2",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "null",
            "--trainer.check_val_every_n_epoch",  # Lightning's default checkpoint: at epoch end
            "1",
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            "logs",
            "--trainer.callbacks",
            "[]",
        ]
    )
    mp.undo()
    return next((cwd / "logs").glob("align-dpo/*"))  # the run directory


def test_a_run_exports_in_fp16_with_a_card_a_stock_pipeline_loads(run, tmp_path, capsys):
    import torch
    from diffusers import StableDiffusionPipeline

    assert (
        main(
            ["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp"), "--dtype", "fp16"]
        )
        == 0
    )
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "exp"), torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and type(pipe.scheduler).__name__ == "PNDMScheduler"
    card = (tmp_path / "exp/README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tiny" and "Diffusion-DPO" in meta["tags"]
    assert "beta: 50" in card  # the resolved config
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("offline,why", [("1", "HF_HUB_OFFLINE=1"), ("0", "no Hugging Face token")])
def test_push_without_network_or_token_leaves_the_folder_ready(
    run, tmp_path, capsys, monkeypatch, offline, why
):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    code = main(
        [
            "export",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "exp"),
            "--push-to-hub",
            "me/dpo-tiny",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and why in err and "ready to push" in err and "hf upload me/dpo-tiny" in err
    assert (tmp_path / "exp/model_index.json").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dtype", "fp8"], "unknown export dtype 'fp8'"),
        (["--checkpoint", "/nowhere/run"], "checkpoint /nowhere/run does not exist"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(run, tmp_path, capsys, args, message):
    argv = ["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp"), *args]
    assert main(argv) == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()
