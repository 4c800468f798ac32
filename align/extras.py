"""Optional dependencies: a missing one stops the command that needs it with one line naming the
extra to install (``pip install 'align[eval]'``), never a traceback deep in a run.

Extras (setup.cfg): ``data`` (parquet conversion), ``rewards`` (reward models), ``eval`` (FID,
plots), ``tensorboard``, ``8bit`` (bitsandbytes optimizers), ``demo``, ``dev``, ``all``.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import yaml


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


def class_path_extra(class_path: str) -> tuple[str, str, str] | None:
    """(module, extra, purpose) of the optional package that a class a LightningCLI config names
    needs (``bitsandbytes.optim.AdamW8bit``, ``TensorBoardLogger``), or None."""
    if class_path.split(".")[0] == "bitsandbytes":
        return "bitsandbytes", "8bit", f"the optimizer {class_path}"
    # Lightning's TensorBoardLogger writes through tensorboardX as well
    tensorboard_x = importlib.util.find_spec("tensorboardX") is not None
    if class_path.split(".")[-1] == "TensorBoardLogger" and not tensorboard_x:
        return "tensorboard", "tensorboard", f"the logger {class_path}"
    return None


def config_strings(value, base: Path, seen: set[Path]):
    """Every string of a parsed config value and of the YAML files it names (relative to
    ``base``, as jsonargparse resolves them), each file read once."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from config_strings(item, base, seen)
    elif isinstance(value, str):
        yield value
        if not value.endswith((".yaml", ".yml")):
            return
        path = (base / value).resolve()
        if path in seen or not path.is_file():
            return
        seen.add(path)
        try:
            parsed = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return  # LightningCLI reports an unreadable config itself
        yield from config_strings(parsed, path.parent, seen)


def command_line_values(argv: list[str]):
    """The values of a LightningCLI command line, each parsed as YAML as jsonargparse does
    (``--trainer.logger '{class_path: ...}'``); ``--flag=value`` gives its value."""
    for arg in argv:
        _, has_value, value = arg.partition("=")
        if arg.startswith("-") and not has_value:
            continue
        text = value if arg.startswith("-") else arg
        try:
            yield yaml.safe_load(text)
        except yaml.YAMLError:
            yield text


def check_run_extras(argv: list[str]) -> None:
    """Raise :class:`MissingExtra` if a LightningCLI command line (its ``--config`` files, the
    files they name, its flags) names a class whose optional package is not installed.

    To be called before LightningCLI parses: jsonargparse imports every ``class_path`` while
    parsing and reports a missing package as a page of parser errors."""
    seen: set[Path] = set()
    for value in command_line_values(argv):
        for text in config_strings(value, Path.cwd(), seen):
            needed = class_path_extra(text)
            if needed:
                require(*needed)
