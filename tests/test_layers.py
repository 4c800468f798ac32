"""Imports point one way: models and objectives at the bottom; rewards; data; modules and eval;
bench and callbacks; the LightningCLI; the demo (it runs `align fit`); commands on top. No module
imports one that (transitively) imports it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "align"
LAYERS = {
    "models": 0,
    "objectives": 0,
    "rewards": 1,
    "data": 2,
    "modules": 3,
    "eval": 3,
    "bench": 4,
    "callbacks": 4,
    "lightning_cli": 5,
    "demo": 6,  # runs `align fit` (lightning_cli) for each of its configs
    "commands": 7,
    "cli": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "data" and parts[2] == "commands":
        return LAYERS["commands"]  # `align data ...` commands
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def imports() -> dict[str, set[str]]:
    """Each align module's imports of other align modules, function-local ones included."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("align"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("align")}
        graph[module_name(path)] = found
    return graph


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in imports().items():
        for target in targets:
            mine, theirs = layer(module), layer(target)
            if mine is None or theirs is None or module.split(".")[1] == target.split(".")[1]:
                continue
            if theirs > mine or (theirs == mine and mine != LAYERS["commands"]):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = imports()
    known = set(graph)

    def resolve(
        target: str,
    ) -> str | None:  # `from align.x import y` may name a module or a package
        return target if target in known else None

    edges = {m: {t for t in map(resolve, ts) if t and t != m} for m, ts in graph.items()}
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"
