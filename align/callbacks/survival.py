"""What keeps a long run honest: a diverged run stops, a pre-empted run saves itself, checkpoints
stay whole.

``AlignCLI`` adds ``NonFiniteGuard``, ``Preemption`` and ``ResumeGuard`` to every run (a config that
lists one keeps its own settings) and saves checkpoints through ``AtomicCheckpointIO``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from align.callbacks.run_dir import logger_dir

log = logging.getLogger(__name__)


class RunRefused(RuntimeError):
    """A run stopped on purpose, with a message for the user (``align`` exits 1 with it)."""


class NonFiniteError(RunRefused):
    """The run diverged."""


class ResumeMismatch(RunRefused):
    """A resume whose settings differ from the checkpoint's where a change is not sound."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """One fused norm per device group: finite iff every element of every tensor is."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    devices = {n.device for n in norms}  # one host sync per device
    return all(
        bool(torch.isfinite(torch.stack([n.float() for n in norms if n.device == d])).all())
        for d in devices
    )


def assert_finite_weights(module: torch.nn.Module, what: str) -> None:
    if not all_finite([p for p in module.parameters() if p.requires_grad]):
        raise NonFiniteError(f"refusing to write {what}: the trainable weights are not finite")


class NonFiniteGuard(L.Callback):
    """Skips an optimizer step whose gradients are not finite and stops the run after ``patience``
    such steps in a row (1: at the first), naming the step; the weights stay those of the last
    finite step, and no checkpoint or export is written from non-finite weights. Under fp16 loss
    scaling an overflow is the scaler's business (it skips the step and halves the scale) until the
    scale has fallen below 1: a run whose gradients overflow even then has diverged."""

    def __init__(self, patience: int = 1):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.in_a_row = patience, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        finite = all_finite(grads)
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None:  # every rank decides alike (FSDP shards differ): none left waiting
            finite = strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.in_a_row = 0
            return
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and scaler.get_scale() >= 1.0:
            return  # fp16 loss scaling finds its scale by overflowing: the scaler skips and halves
        self.in_a_row += 1
        loss = trainer.callback_metrics.get("train/loss")
        where = f"step {trainer.global_step}" + (
            f" (train/loss {float(loss):.4g})" if loss is not None else ""
        )
        if self.in_a_row >= self.patience:
            raise NonFiniteError(
                f"non-finite gradients at {where}, {self.in_a_row} step(s) in a row: the run "
                "diverged. Likely causes: a learning rate or beta too large, fp16 overflow without "
                "loss scaling, or bad inputs. The weights are those of the last finite step; the "
                "newest checkpoint is the last good one."
            )
        log.warning(
            "non-finite gradients at %s: step skipped (%d of %d allowed in a row)",
            where,
            self.in_a_row,
            self.patience,
        )
        optimizer.zero_grad(set_to_none=True)  # no update at all: AdamW skips grad-less params

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        assert_finite_weights(pl_module, f"a checkpoint at step {trainer.global_step}")


class Preemption(L.Callback):
    """On SIGTERM (SLURM's pre-emption signal) or Ctrl-C during fit: a resumable ``last.ckpt`` in
    the run's checkpoint folder. The ``align`` command then exits 143 (SIGTERM) or 1 (Ctrl-C),
    naming it, instead of Lightning's exit 0 on SIGTERM."""

    def __init__(self):
        self.saved: Path | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        stopped = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
        if not stopped or trainer.state.fn != TrainerFn.FITTING:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved = path
        log.warning(
            "pre-empted at step %d: saved %s (resume with --ckpt_path %s)",
            trainer.global_step,
            path,
            path,
        )

    @staticmethod
    def checkpoint_path(trainer) -> Path:
        """The checkpoint callback's folder, else ``<run dir>/checkpoints`` (never the working
        directory). Computed locally: no collective while ranks are being stopped."""
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if folder is None and trainer.loggers:
            folder = os.path.join(logger_dir(trainer), "checkpoints")
        return Path(folder or trainer.default_root_dir) / "last.ckpt"


# module settings a resume may change: they change speed or memory, not what is computed
SOUND_TO_CHANGE = {
    "gradient_checkpointing",
    "channels_last",
    "compile_unet",
    "compile_reference",
    "compile_mode",
    "reference_inference_mode",
}


def refuse_resume(diffs: list[str]) -> None:
    if diffs:
        raise ResumeMismatch(
            "this resume changes settings the checkpoint fixed: "
            + "; ".join(diffs)
            + ". Resume with the checkpoint's settings (its run's config.yaml), or start a new run "
            "from the exported weights"
        )


def setting_differences(saved: dict, now: dict) -> list[str]:
    """``model.<key>: checkpoint <a>, now <b>`` for each module setting a resume may not change."""
    keys = sorted(set(saved) - SOUND_TO_CHANGE - {"_instantiator", "_class_path"})
    return [
        f"model.{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
        for k in keys
        if as_saved(saved.get(k)) != as_saved(now.get(k))
    ]


def as_saved(value):
    """``value`` as a checkpoint stores it: tuples become lists (``timestep_range: [0, 500]``
    parses to a tuple and comes back from the checkpoint as a list)."""
    if isinstance(value, (list, tuple)):
        return [as_saved(v) for v in value]
    if isinstance(value, dict):
        return {k: as_saved(v) for k, v in value.items()}
    return value


class ResumeGuard(L.Callback):
    """Refuses at start a resume whose learning rate differs from the checkpoint's (its optimizer
    state would silently win). ``AlignCLI`` checks module settings before the module is built."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        factory = getattr(pl_module, "optimizer_factory", None)
        groups = [
            g for state in checkpoint.get("optimizer_states") or [] for g in state["param_groups"]
        ]
        if trainer.state.fn != TrainerFn.FITTING or factory is None or not groups:
            return  # validate/test read the weights only
        configured = factory([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"]
        resumed = groups[0].get("initial_lr", groups[0]["lr"])
        if not math.isclose(configured, resumed, rel_tol=1e-9):
            refuse_resume([f"learning rate: checkpoint {resumed:g}, now {configured:g}"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary name in its destination folder, fsyncs it, renames it over
    the old one and fsyncs the folder: a crash at any point leaves the previous file whole
    (Lightning's own save goes through a temporary file that may sit on another filesystem, where
    the rename degrades to an in-place copy)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(checkpoint, f))


def write_atomic(path: Path, write) -> None:
    """``write(file)`` into ``.<name>.tmp-<pid>`` beside ``path``; fsync; rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir_atomically(path: Path, write) -> None:
    """``write(folder)`` fills a temporary folder beside ``path``; its files are fsynced and it
    takes ``path``'s place by rename. A crash leaves the old folder or the new one whole (between
    the two renames: both, under their temporary names), never a half-written one at ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
