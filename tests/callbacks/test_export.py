"""DiffusersExport: one export per checkpoint step, and the summary names ``final``."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from align.callbacks.export import DiffusersExport
from align.callbacks.survival import NonFiniteError


class RecordingModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.exported = []

    def export(self, out_dir):
        self.exported.append(Path(out_dir).name)
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "weights").write_text(str(len(self.exported)))
        return Path(out_dir)


def test_a_last_checkpoint_after_final_at_the_same_step_exports_nothing(tmp_path):
    """ModelCheckpoint(save_last=True) saves in its on_train_end, after this callback's: at
    max_steps 3 with checkpoints every 2 steps the run used to export step-2, final, then step-3
    (final's weights again), and the end-of-run summary named step-3."""
    cb, module = DiffusersExport(dirpath=str(tmp_path)), RecordingModule()
    trainer = SimpleNamespace(global_step=2, is_global_zero=True)
    cb.on_save_checkpoint(trainer, module, {})
    cb.on_save_checkpoint(trainer, module, {})  # step-2.ckpt and last.ckpt: one export
    trainer.global_step = 3
    cb.on_train_end(trainer, module)
    cb.on_save_checkpoint(trainer, module, {})
    assert len(module.exported) == 2 and sorted(p.name for p in tmp_path.iterdir()) == [
        "final",
        "step-2",
    ]
    assert cb.last_export == tmp_path / "final"


def test_an_export_replaces_the_old_one_whole_or_not_at_all(tmp_path, monkeypatch):
    cb, module = DiffusersExport(dirpath=str(tmp_path)), RecordingModule()
    trainer = SimpleNamespace(global_step=3, is_global_zero=True)
    cb.on_train_end(trainer, module)
    assert (tmp_path / "final/weights").read_text() == "1"

    def crash(out_dir):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "weights").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(module, "export", crash)
    with pytest.raises(OSError, match="disk full"):
        cb.on_train_end(trainer, module)
    assert (tmp_path / "final/weights").read_text() == "1"  # the previous export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary folder left


def test_non_finite_weights_are_never_exported(tmp_path):
    cb, module = DiffusersExport(dirpath=str(tmp_path)), RecordingModule()
    with torch.no_grad():
        module.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match="export final"):
        cb.on_train_end(SimpleNamespace(global_step=3, is_global_zero=True), module)
    assert module.exported == []


def test_step_exports_are_pruned_to_the_newest_k_and_final_reuses_the_last(tmp_path):
    cb, module = DiffusersExport(dirpath=str(tmp_path), keep=2), RecordingModule()
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    for step in (1, 2, 3, 4):
        trainer.global_step = step
        cb.on_save_checkpoint(trainer, module, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
    cb.on_train_end(trainer, module)  # at step 4: the step-4 export is the final one
    assert len(module.exported) == 4 and sorted(p.name for p in tmp_path.iterdir()) == [
        "final",
        "step-3",
    ]
    assert (tmp_path / "final/weights").read_text() == "4" and cb.last_export == tmp_path / "final"


def test_exports_in_fp16_load_in_a_stock_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from align.modules import DPOModule

    with pytest.raises(ValueError, match="unknown export dtype 'fp8'"):
        DiffusersExport(export_dtype="fp8")
    cb = DiffusersExport(dirpath=str(tmp_path), export_dtype="fp16")
    cb.on_train_end(SimpleNamespace(global_step=1, is_global_zero=True), DPOModule(model="tiny"))
    unet_file = next((tmp_path / "final/unet").glob("*.safetensors"))
    with safe_open(str(unet_file), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(
        str(tmp_path / "final"), torch_dtype=torch.float16
    )
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
