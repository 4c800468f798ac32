"""LightningCLI for every objective:
``align fit --config a.yaml --config b.yaml --model.beta 2000``.

The omegaconf parser mode lets configs interpolate (``${model.init_args.beta}``); later ``--config``
files and dotted flags override earlier ones. ``align fit`` names each run and gives it one
directory for everything it writes (``align.callbacks.run_dir``); a resume continues it. A model,
data source or optional package that is missing stops the run at start with one line that names it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import diffusers
import lightning as L
import torch
import transformers
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

import align.data  # noqa: F401  (imported: `--data PickAPicDataModule` resolves by short name)
import align.modules  # noqa: F401  (and `--model DPOModule`)
from align.callbacks.progress import StepProgressBar
from align.callbacks.run_dir import (
    RUN_NAME_ENV,
    RunPlan,
    method_name,
    model_label,
    plan_run,
    run_dir,
    set_run_dir,
)
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
from align.extras import MissingExtra, check_run_extras
from align.models.loader import ModelSourceError

STARTUP_ERRORS = (ModelSourceError, FileNotFoundError, MissingExtra)
# how `align fit` and `align plan` resolve a config
CLI_KWARGS = dict(
    model_class=L.LightningModule,
    datamodule_class=L.LightningDataModule,
    subclass_mode_model=True,
    subclass_mode_data=True,
    parser_kwargs={"parser_mode": "omegaconf"},
    auto_configure_optimizers=False,
)


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``<run dir>/config.yaml``
    (one per run, beside its checkpoints)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # run_dir broadcasts: every rank must call it,
        # and Lightning calls save_config on rank 0 only
        self._run_dir = run_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = self._run_dir / self.config_filename
        if not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
        # the whole resolved config (optimizer, scheduler, data, trainer), not only the module's
        # arguments, in every logger's hyperparameters; config.yaml itself attached to wandb
        settings = self.config.clone()
        settings.pop("config", None)  # the list of --config files, not a setting
        for logger in trainer.loggers:
            logger.log_hyperparams(settings.as_dict())
            if isinstance(logger, WandbLogger):
                # as files/<run name>/config.yaml: wandb keeps its own files/config.yaml
                logger.experiment.save(str(path), base_path=str(path.parent.parent), policy="now")


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


def logger_entries(trainer_config) -> list:
    """The configured loggers as a list of ``class_path``/``init_args`` namespaces
    (none for ``logger: false`` or Lightning's default)."""
    loggers = trainer_config.get("logger")
    entries = loggers if isinstance(loggers, list) else [loggers]
    return [e for e in entries if getattr(e, "class_path", None)]


def place_run(config) -> RunPlan | None:
    """Name the run and point every logger and the trainer at its directory
    (``align.callbacks.run_dir``); ``None`` when the config leaves that to Lightning."""
    entries = logger_entries(config.trainer)
    wandb = next((e for e in entries if e.class_path.endswith("WandbLogger")), None)
    if not entries or (wandb is None and entries[0].init_args.get("version") is not None):
        return None  # no logger, or a directory chosen by name and version: Lightning's layout
    init = (wandb or entries[0]).init_args
    model = config.model.init_args.get("model") if config.model.get("init_args") else None
    plan = plan_run(
        method_name(config.model.class_path),
        model_label(model),
        project=wandb.init_args.get("project") if wandb else None,
        name=wandb.init_args.get("name") if wandb else None,
        root=init.get("save_dir") or "logs",
        ckpt_path=config.get("ckpt_path"),
    )
    for entry in entries:
        args = entry.init_args
        args.save_dir = str(plan.directory)
        if entry is wandb:
            args.project, args.name = plan.project, args.get("name") or plan.name
            args.id = args.get("id") or plan.name
        elif "name" in args or "version" in args:  # CSV, TensorBoard: one version per start
            kind = entry.class_path.rsplit(".", 1)[-1].removesuffix("Logger").lower()
            args.name, args.version = kind, None
    config.trainer.default_root_dir = str(plan.directory)
    return plan


class AlignCLI(LightningCLI):
    run_plan: RunPlan | None = None

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate``: no module implements ``test_step`` or ``predict_step``
        (sampling is ``align sample``, evaluation ``align eval``)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        try:
            self.run_plan = place_run(self.config.fit)
        except ValueError as err:
            sys.exit(f"align: error: {err}")
        if self.run_plan is not None:  # the ranks Lightning launches inherit it: one name for all
            os.environ.setdefault(RUN_NAME_ENV, self.run_plan.name)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """Every run gets the survival kit (``align.callbacks.survival``) unless its config sets its
        own, a progress bar in steps, and (``align fit``) its run directory."""
        trainer = super()._instantiate_trainer(config, callbacks)
        if self.run_plan is not None:
            set_run_dir(trainer, self.run_plan.directory)
            for cb in trainer.checkpoint_callbacks:
                if getattr(cb, "dirpath", None) is None:
                    # absolute, as ModelCheckpoint makes its own: a resume compares the two
                    cb.dirpath = os.path.realpath(self.run_plan.directory / "checkpoints")
        for i, cb in enumerate(trainer.callbacks):
            if type(cb) in (TQDMProgressBar, RichProgressBar):  # Lightning's default
                trainer.callbacks[i] = StepProgressBar()
        for logger in trainer.loggers:
            # WandbLogger passes anonymous=None, which wandb >= 0.19 warns about on every start
            init = getattr(logger, "_wandb_init", {})
            if isinstance(logger, WandbLogger) and init.get("anonymous", 0) is None:
                del init["anonymous"]
        for kind in (NonFiniteGuard, Preemption, ResumeGuard):
            if not any(isinstance(c, kind) for c in trainer.callbacks):
                # first: the guard checks before anything is written
                trainer.callbacks.insert(0, kind())
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
        checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        saved = checkpoint.get("hyper_parameters", {})
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


def quiet_library_noise() -> None:
    """Silence what other libraries print because of choices align makes on purpose, so that
    what is left on screen is the run's own."""
    # advertisements on every start
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(ad in record.getMessage() for ad in ("litlogger", "litmodels"))
    )
    for message in (
        # the frozen reference, VAE and text encoders are in eval mode by design
        r"Found \d+ module\(s\) in eval mode",
        # align.data.epochs sizes each worker's share of an epoch itself
        r"Your `IterableDataset` has `__len__` defined",
        # inside Lightning's own pytree helper (torch >= 2.10), nothing a user can change
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message)
    # "Writing model shards" bars of every export (the export's path is printed instead)
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    # wandb's banner and sync hint: the end-of-run summary names the run and how to upload it
    os.environ.setdefault("WANDB_SILENT", "true")


def run_lightning_cli(argv: list[str]) -> LightningCLI:
    quiet_library_noise()
    named = RUN_NAME_ENV in os.environ  # by a launcher: keep it; ours lasts one run
    try:
        check_run_extras(argv)  # before parsing: jsonargparse imports every class_path it reads
        return AlignCLI(
            **CLI_KWARGS,
            save_config_callback=SaveRunConfig,
            # beside the run's checkpoints (SaveRunConfig.save_config), not in Lightning's log_dir
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            # align.callbacks.ArtifactSummary's start line, not a table whose FLOPs read 0
            trainer_defaults={"enable_model_summary": False},
            args=None if argv == sys.argv[1:] else argv,
        )
    except (RunRefused, MissingExtra) as err:
        sys.exit(f"align: error: {err}")
    except SIGTERMException:
        sys.stderr.write(
            "align: stopped by SIGTERM; the checkpoint to resume from is named above\n"
        )
        sys.exit(143)  # 128 + SIGTERM: what a job script expects from a terminated job
    finally:
        if not named:
            os.environ.pop(RUN_NAME_ENV, None)
