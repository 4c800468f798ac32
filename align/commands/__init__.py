"""Tool commands of the ``align`` console script besides LightningCLI's fit/validate/test/predict.

Each module here (and each module of ``align.data.commands`` for ``align data <name>``) is one
command: it exposes ``main(argv: list[str]) -> int | None`` and its docstring's first line is its
help. Discovery is by module name (``kto-labels`` -> ``kto_labels``; a trailing underscore avoids a
Python keyword: ``import`` -> ``import_``), so adding a command never edits a shared file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from dataclasses import fields

from align.extras import MissingExtra


def discover(package: str) -> dict[str, str]:
    """Map command names to module paths for every public module of ``package``."""
    pkg = importlib.import_module(package)
    return {
        info.name.rstrip("_").replace("_", "-"): f"{package}.{info.name}"
        for info in pkgutil.iter_modules(pkg.__path__)
        if not info.name.startswith("_")
    }


def doc_summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line: a command's one-line help, however it is
    wrapped."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def doc_details(doc: str | None) -> str:
    """What follows a docstring's first paragraph, its line breaks kept, after an empty line (an
    ``epilog`` for ``RawDescriptionHelpFormatter``)."""
    rest = (doc or "").strip("\n").split("\n\n", 1)[1:]
    return "\n".join(["", *rest[0].splitlines()]) if rest else ""


def tool_parser(prog: str, doc: str | None, details: bool = False) -> argparse.ArgumentParser:
    """A command's parser, described by its docstring's first paragraph; ``details``: the rest of
    the docstring below the options, line breaks kept."""
    if not details:
        return argparse.ArgumentParser(prog=prog, description=doc_summary(doc))
    return argparse.ArgumentParser(
        prog=prog,
        description=doc_summary(doc),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc_details(doc),
    )


def options_of(config_class, args) -> dict:
    """The parsed options named as ``config_class``'s dataclass fields (by their dest)."""
    return {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}


def summary(module_path: str) -> str:
    """The help line of a command module (its docstring's first paragraph), read without importing
    it (imports are heavy)."""
    import ast

    spec = importlib.util.find_spec(module_path)
    doc = ast.get_docstring(ast.parse(open(spec.origin, encoding="utf-8").read())) or ""
    return doc_summary(doc)


def dispatch(package: str, argv: list[str], prog: str) -> int:
    """Run ``<prog> <name> ...`` from the commands found in ``package``; ``--help`` lists them."""
    commands = discover(package)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} <command> [args]\n\ncommands:")
        for name, path in sorted(commands.items()):
            print(f"  {name:<16} {summary(path)}")
        return 0 if argv else 2
    name = argv[0]
    if name not in commands:
        known = ", ".join(sorted(commands))
        print(f"{prog}: unknown command {name!r}; known: {known}", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(commands[name]).main(argv[1:]) or 0)
    except MissingExtra as err:  # an optional package the command needs: one line, no traceback
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
