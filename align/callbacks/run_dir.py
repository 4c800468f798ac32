"""Where a run's artifacts live, and what the run is called.

``align fit`` gives every run one directory, ``<logs>/<project>/<run name>/``, holding everything it
writes: ``config.yaml``, ``checkpoints/``, ``export/``, ``images/``, ``csv/version_<n>/metrics.csv``
(one per start of the run) and ``wandb/``. The run name is ``<method>-<model>-<time>`` (or the
logger's ``name``); it is also the wandb run id, so a resume from ``<run dir>/checkpoints/*.ckpt``
continues the same directory and the same wandb run. Trainers built outside the CLI keep
Lightning's layout (``<save_dir>/<name>/<version>`` of the first logger).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

RUN_NAME_ENV = "ALIGN_RUN_NAME"  # inherited by the ranks Lightning launches: one name for all


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory (every rank gets rank 0's: it broadcasts, so every rank must call it)."""
    explicit = getattr(trainer, "_align_run_dir", None)
    if explicit is not None:
        return Path(trainer.strategy.broadcast(str(explicit)))
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    return Path(trainer.strategy.broadcast(logger_dir(trainer)))


def broadcast(trainer: L.Trainer, obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself without a strategy, e.g. in unit tests)."""
    strategy = getattr(trainer, "strategy", None)
    return obj if strategy is None else strategy.broadcast(obj)


def refuse_fsdp(trainer: L.Trainer, callback: L.Callback) -> None:
    """Fail at start: under FSDP every rank must join each all-gather of a sharded module, and
    ``callback`` runs the model (or reads its full weights) on rank 0 alone, which would hang."""
    if isinstance(getattr(trainer, "strategy", None), FSDPStrategy):
        raise ValueError(
            f"{type(callback).__name__} uses the model on rank 0 alone, which FSDP's sharded "
            "modules cannot do (every rank must join each all-gather): leave it out under FSDP "
            "(configs/trainer/fsdp_*.yaml set callbacks without it)"
        )


def logger_dir(trainer: L.Trainer) -> str:
    """Lightning's ``<save_dir>/<name>/<version>`` of the first logger, on this rank alone."""
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def set_run_dir(trainer: L.Trainer, path: Path) -> None:
    trainer._align_run_dir = Path(path)


def method_name(class_path: str) -> str:
    """``align.modules.DPOModule`` -> ``dpo``; ``PreferenceModelModule`` -> ``preference-model``."""
    name = class_path.rsplit(".", 1)[-1].removesuffix("Module") or "run"
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "-", name).lower()


def model_label(source: str | None) -> str:
    """A preset name, or the last part of a hub id or directory:
    ``stabilityai/sdxl-base-1.0`` -> ``sdxl-base-1.0``."""
    label = Path(str(source or "model").rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label) or "model"


def new_run_name(method: str, model: str) -> str:
    """``<method>-<model>-<YYYYmmdd-HHMMSS>``, or ``$ALIGN_RUN_NAME`` when set (a launcher's)."""
    return os.environ.get(RUN_NAME_ENV) or f"{method}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class RunPlan:
    root: Path  # <logs>
    project: str
    name: str  # the directory name and the wandb run id
    resumed: bool

    @property
    def directory(self) -> Path:
        return self.root / self.project / self.name


def resumed_run(ckpt_path: str | None) -> RunPlan | None:
    """The run a checkpoint belongs to, when it lies in ``<run dir>/checkpoints/``
    of a run directory (one with ``config.yaml``)."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    directory = Path(ckpt_path).resolve().parent.parent
    if Path(ckpt_path).parent.name != "checkpoints" or not (directory / "config.yaml").is_file():
        return None
    return RunPlan(directory.parent.parent, directory.parent.name, directory.name, resumed=True)


def plan_run(
    method: str, model: str, project: str | None, name: str | None, root: str, ckpt_path=None
) -> RunPlan:
    """The run directory of a new run, or of the run a resume continues.

    A resume whose configured project differs from the checkpoint's run (a wandb run id belongs
    to one project) is refused, naming both.
    """
    resumed = resumed_run(ckpt_path)
    if resumed is not None:
        if project and project != resumed.project:
            raise ValueError(
                f"the checkpoint {ckpt_path} belongs to run {resumed.name} of project "
                f"{resumed.project!r}, but this config logs to project {project!r}: pass "
                f"--trainer.logger.init_args.project {resumed.project} to continue that run, "
                "or start a new run without --ckpt_path"
            )
        return resumed
    plan = RunPlan(
        Path(root), project or f"align-{method}", name or new_run_name(method, model), False
    )
    base = plan.name
    if name is None and RUN_NAME_ENV not in os.environ:  # two runs started in the same second
        for n in itertools.count(2):
            if not plan.directory.exists():
                break
            plan = RunPlan(plan.root, plan.project, f"{base}-{n}", False)
    return plan
