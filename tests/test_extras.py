"""Installs by need: every optional package is imported through ``align.extras.require`` with an
extra of setup.cfg that brings it, and a missing one stops its command with one line naming that
extra."""

from __future__ import annotations

import ast
import configparser
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from align.cli import main
from align.extras import MissingExtra, check_run_extras, require

ROOT = Path(__file__).resolve().parents[1]


def setup_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(the core distributions, each extra's distributions with the extras it names expanded),
    canonical names, read from setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def requirements(text: str) -> list[Requirement]:
        return [Requirement(line) for line in text.split("\n") if line.strip()]

    core = {canonicalize_name(r.name) for r in requirements(cfg["options"]["install_requires"])}
    raw = {name: requirements(text) for name, text in cfg["options.extras_require"].items()}

    def expand(name: str) -> set[str]:
        out = set()
        for req in raw[name]:
            if req.name == "align":
                out |= {dist for extra in req.extras for dist in expand(extra)}
            else:
                out.add(canonicalize_name(req.name))
        return out

    return core, {name: expand(name) for name in raw}


CORE, EXTRAS = setup_requirements()
OPTIONAL = set().union(*EXTRAS.values()) - CORE
DISTRIBUTIONS = metadata.packages_distributions()


def distributions(module: str) -> set[str]:
    """The distributions that provide the top-level package of ``module`` (a package not installed
    here is taken to be its own distribution: bitsandbytes, tensorboard)."""
    top = module.split(".")[0]
    return {canonicalize_name(d) for d in DISTRIBUTIONS.get(top, [top])}


def require_calls(tree: ast.AST):
    """(line, module, extra) of each ``require("module", "extra", ...)`` call."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or len(node.args) < 2:
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name == "require" and all(isinstance(a, ast.Constant) for a in node.args[:2]):
            yield node.lineno, node.args[0].value, node.args[1].value


def bare_imports(tree: ast.AST):
    """(line, module) of each absolute import statement."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module


def uninstall(monkeypatch, *packages: str) -> None:
    """Make every import of ``packages`` and their submodules fail, as if they were not
    installed."""
    for package in packages:
        loaded = [name for name in sys.modules if name.startswith(package + ".")]
        for name in [package, *loaded]:
            monkeypatch.setitem(sys.modules, name, None)


def test_setup_cfg_declares_the_extras_of_the_install_table():
    assert {"data", "rewards", "eval", "tensorboard", "8bit", "demo", "dev", "all"} <= set(EXTRAS)
    runtime = set().union(*(EXTRAS[e] for e in EXTRAS if e not in ("dev", "all")))
    assert EXTRAS["all"] == runtime, "`all` brings every optional package but the test tools"
    # the suite runs with every extra but 8bit (it checks the error without bitsandbytes)
    for extra in ("data", "rewards", "eval", "tensorboard", "demo"):
        assert EXTRAS[extra] <= EXTRAS["dev"], extra
    assert "bitsandbytes" not in EXTRAS["dev"]
    assert not {"pyarrow", "matplotlib", "torch-fidelity", "bitsandbytes"} & CORE


def test_every_optional_import_goes_through_require_with_an_extra_that_brings_it():
    problems, required = [], set()
    for path in sorted((ROOT / "align").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(ROOT)
        for line, module in bare_imports(tree):
            if distributions(module) & OPTIONAL:
                problems.append(f"{where}:{line}: `import {module}` bypasses align.extras.require")
        for line, module, extra in require_calls(tree):
            required.add((module.split(".")[0], extra))
            if extra not in EXTRAS:
                problems.append(f"{where}:{line}: extra {extra!r} is not in setup.cfg")
            elif not distributions(module) <= EXTRAS[extra]:
                problems.append(f"{where}:{line}: align[{extra}] does not bring {module}")
    assert not problems, "\n".join(problems)
    for needed in [("pyarrow", "data"), ("timm", "rewards"), ("bitsandbytes", "8bit")]:
        assert needed in required  # the sites this test exists for are still found
    assert ("matplotlib", "demo") in required


def test_every_third_party_import_is_declared_or_comes_with_the_core():
    """An import of a package setup.cfg does not name (nor a core package depends on) works here
    by accident and fails in a fresh install."""
    brought = set(CORE)
    todo = list(CORE)
    while todo:  # the core's own dependencies, as installed here
        try:
            requires = metadata.requires(todo.pop()) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                name = canonicalize_name(req.name)
                todo += [] if name in brought else [name]
                brought.add(name)
    undeclared = set()
    for path in sorted((ROOT / "align").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = [m for _, m in bare_imports(tree)] + [m for _, m, _ in require_calls(tree)]
        for module in modules:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "align":
                continue
            if not distributions(module) & (brought | OPTIONAL):
                undeclared.add(f"{path.relative_to(ROOT)}: {module}")
    assert not undeclared, sorted(undeclared)


def test_require_names_the_extra_of_a_missing_package(monkeypatch):
    uninstall(monkeypatch, "pyarrow")
    with pytest.raises(MissingExtra) as err:
        require("pyarrow.parquet", "data", "converting parquet")
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ImportError)
    assert "converting parquet" in message and "`pyarrow`" in message
    assert "pip install 'align[data]'" in message
    assert require("json", "data", "never missing").dumps([]) == "[]"


def test_a_command_needing_a_missing_extra_stops_with_one_line(monkeypatch, tmp_path, capsys):
    uninstall(monkeypatch, "pyarrow")
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    out = tmp_path / "shards"
    assert main(["data", "pickapic", "--src", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("align data: error: ") and "pip install 'align[data]'" in err
    assert not out.exists()  # stopped before anything was written


def test_the_demo_stops_at_start_without_matplotlib(monkeypatch, tmp_path, capsys):
    uninstall(monkeypatch, "matplotlib")
    argv = ["demo", "--quick", "--out", str(tmp_path / "report")]
    assert main(argv + ["--artifacts", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'align[demo]'" in err
    assert not (tmp_path / "art").exists()


def test_a_run_config_naming_a_missing_optional_class_is_refused_before_parsing(monkeypatch):
    monkeypatch.chdir(ROOT)
    uninstall(monkeypatch, "bitsandbytes", "tensorboard", "tensorboardX")
    tiny = ["fit", "--config", "configs/dpo/tiny.yaml"]
    check_run_extras(tiny)  # the core configs name nothing optional
    with pytest.raises(MissingExtra, match=r"AdamW8bit .*align\[8bit\]"):
        check_run_extras(tiny + ["--config=configs/optim/adamw8bit.yaml"])
    logger = "{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {}}"
    for flag in (["--trainer.logger", logger], ["--trainer.logger+=TensorBoardLogger"]):
        with pytest.raises(MissingExtra, match=r"TensorBoardLogger .*align\[tensorboard\]"):
            check_run_extras(tiny + flag)


def test_a_config_file_names_a_logger_in_a_file_it_includes(monkeypatch, tmp_path):
    uninstall(monkeypatch, "tensorboard", "tensorboardX")
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "loggers.yaml").write_text(
        "- class_path: lightning.pytorch.loggers.TensorBoardLogger\n  init_args: {save_dir: x}\n"
    )
    (tmp_path / "run.yaml").write_text("trainer:\n  logger: parts/loggers.yaml\n")
    with pytest.raises(MissingExtra, match=r"align\[tensorboard\]"):
        check_run_extras(["fit", "--config", str(tmp_path / "run.yaml")])
