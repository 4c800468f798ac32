"""Optional dependencies: a missing one stops the command that needs it with one line naming the
extra to install (``pip install 'align[eval]'``), never a traceback deep in a run.

Extras (setup.cfg): ``data`` (parquet conversion), ``rewards`` (reward models), ``eval`` (FID,
plots), ``tensorboard``, ``8bit`` (bitsandbytes optimizers), ``demo``, ``dev``, ``all``.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional package is not installed; the message says which extra brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming ``extra`` and what needed it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(
            f"{purpose} needs the Python package `{module.split('.')[0]}`, which is not installed: "
            f"pip install 'align[{extra}]'"
        ) from err
