"""LightningCLI for every objective:
``align fit --config a.yaml --config b.yaml --model.beta 2000``.

The omegaconf parser mode lets configs interpolate (``${model.init_args.beta}``); later ``--config``
files and dotted flags override earlier ones. The resolved config of every run is saved next to its
checkpoints.
A model or data source that does not exist stops the run at start with one line that names it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from align.callbacks.run_dir import run_dir
from align.callbacks.survival import (
    SOUND_TO_CHANGE,
    AtomicCheckpointIO,
    NonFiniteGuard,
    Preemption,
    ResumeGuard,
    RunRefused,
    refuse_resume,
    setting_differences,
)
from align.data.batching import apply_global_batch
from align.models.loader import ModelSourceError

STARTUP_ERRORS = (ModelSourceError, FileNotFoundError)


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``<run dir>/config.yaml``
    (one per run, beside its checkpoints)."""

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # run_dir broadcasts: every rank must call it,
        # and Lightning calls save_config on rank 0 only
        self._run_dir = run_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = self._run_dir / self.config_filename
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, str(path), skip_none=False, overwrite=True, multifile=False
            )


def startup_error(exc: BaseException) -> BaseException | None:
    """The missing-model / missing-data error behind ``exc`` (jsonargparse wraps it),
    if there is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, STARTUP_ERRORS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class AlignCLI(LightningCLI):
    def _instantiate_trainer(self, config: dict, callbacks: list):
        """Every run gets the survival kit (``align.callbacks.survival``) unless its config sets its
        own."""
        trainer = super()._instantiate_trainer(config, callbacks)
        for kind in (NonFiniteGuard, Preemption, ResumeGuard):
            if not any(isinstance(c, kind) for c in trainer.callbacks):
                trainer.callbacks.insert(
                    0, kind()
                )  # first: the guard checks before anything is written
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _parse_ckpt_path(self) -> None:
        """LightningCLI rebuilds the module from the checkpoint's settings, silently over the
        command line's: a fit resume that changes one is refused instead, naming each (performance
        switches may change and are kept)."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if sub != "fit" or not path or not Path(path).is_file():
            return super()._parse_ckpt_path()
        args = self.config[sub]["model"]["init_args"]
        now = args.as_dict() if hasattr(args, "as_dict") else dict(args)
        saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True).get(
            "hyper_parameters", {}
        )
        try:
            refuse_resume(setting_differences(saved, now))
        except RunRefused as err:
            sys.exit(f"align: error: {err}")
        super()._parse_ckpt_path()
        for key in SOUND_TO_CHANGE & now.keys():
            self.config[sub]["model"]["init_args"][key] = now[key]

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as exc:
            cause = startup_error(exc)
            if cause is None:
                raise
            sys.exit(f"align: error: {cause}")

    def before_fit(self) -> None:
        """Accumulation from ``data.global_batch_size`` and the world size (before any compute)."""
        configured = self.config[self.subcommand]["trainer"].get("accumulate_grad_batches", 1)
        try:
            apply_global_batch(self.trainer, self.datamodule, configured)
        except ValueError as err:
            sys.exit(f"align: error: {err}")


def run_lightning_cli(argv: list[str]) -> LightningCLI:
    try:
        return _run(argv)
    except RunRefused as err:
        sys.exit(f"align: error: {err}")
    except SIGTERMException:
        sys.stderr.write(
            "align: stopped by SIGTERM; the checkpoint to resume from is named above\n"
        )
        sys.exit(143)  # 128 + SIGTERM: what a job script expects from a terminated job


def _run(argv: list[str]) -> LightningCLI:
    return AlignCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
        args=None if argv == sys.argv[1:] else argv,
    )
