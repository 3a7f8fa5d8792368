"""The package's import structure: no cycle, no upward import, no library import in a function.

The imports of every module of ``moshi_ttt`` are read with ``ast`` (nothing is imported). Each
module belongs to a *unit* (a subpackage or a top-level module, ``LAYERS``); units sit in layers,
lowest first. A module may import its own unit and any unit of a lower layer, never a unit of its
own layer or a higher one. Imports inside functions are allowed only in the CLI (its lazy imports
of heavy modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import moshi_ttt

PACKAGE = Path(moshi_ttt.__file__).parent

# Lowest first. A unit is a top-level module or subpackage of moshi_ttt; "" is the package root
# (its re-exports).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "schema", "outputs", "format"),  # small utilities and the stream format's facts
    ("token_weights",),  # how much each scored token counts (the outer and inner losses)
    ("ttt",),  # TTT math, plain torch (no Moshi import; test_ttt_ops checks that)
    ("layer",),  # TTTLayer: the math as a streaming module
    ("integration",),  # TTT inside Moshi's transformer
    ("",),  # the package root re-exports the layers
    ("models", "data", "recipes", "generate"),  # spec -> module, data format, inference
    ("train", "eval", "serve"),  # what is done with a model
    ("demo",),  # the benchmarks a user runs
    ("cli",),  # the command line
)
UNIT_LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
LAZY_IMPORTS_ALLOWED = ("cli",)  # units whose functions may import library modules


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported moshi_ttt module, line, inside a function)`` of every import in ``path``."""
    tree = ast.parse(path.read_text())
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            if target != "moshi_ttt" and not target.startswith("moshi_ttt."):
                continue
            while target not in known:  # an attribute of a module -> the module
                target = target.rpartition(".")[0]
            found.append((target, node.lineno, id(node) in in_function))
    return found


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool]]]]:
    mods = modules()
    return mods, {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_unit_has_a_layer():
    mods, _ = graph()
    missing = sorted({unit_of(m) for m in mods} - set(UNIT_LAYER))
    assert not missing, f"add these to LAYERS in tests/test_imports.py: {missing}"


def test_no_import_inside_a_function_outside_the_cli():
    mods, edges = graph()
    bad = [
        f"{mods[name].relative_to(PACKAGE.parent)}:{line} imports {target}"
        for name, found in edges.items()
        if unit_of(name) not in LAZY_IMPORTS_ALLOWED
        for target, line, lazy in found
        if lazy
    ]
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def test_no_import_of_the_same_or_a_higher_layer():
    mods, edges = graph()
    bad = []
    for name, found in edges.items():
        unit = unit_of(name)
        for target, line, _ in found:
            other = unit_of(target)
            if other == unit or (unit == "" and target == "moshi_ttt"):
                continue
            if UNIT_LAYER[other] >= UNIT_LAYER[unit]:
                where = mods[name].relative_to(PACKAGE.parent)
                bad.append(f"{where}:{line}: {unit or 'moshi_ttt'} (layer {UNIT_LAYER[unit]}) "
                           f"imports {target} (layer {UNIT_LAYER[other]})")  # fmt: skip
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    _, edges = graph()
    succ = {name: sorted({t for t, _, _ in found if t != name}) for name, found in edges.items()}
    # Tarjan's strongly connected components; any component of 2+ modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_what_it_must(tmp_path):
    """The walker finds relative, absolute and lazy imports (a checker that sees nothing would
    pass every test above)."""
    mods, edges = graph()
    found = {t for t, _, _ in edges["moshi_ttt.models.load"]}
    assert {"moshi_ttt.models.runs", "moshi_ttt.integration.tiny"} <= found
    lazy = [t for t, _, is_lazy in edges["moshi_ttt.cli.common"] if is_lazy]
    assert lazy, "the CLI's lazy imports are not seen"
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from .sibling import x\n    import moshi_ttt.train\n")
    got = imports("moshi_ttt.models.probe", probe, {*mods, "moshi_ttt.models.sibling"})
    assert got == [("moshi_ttt.models.sibling", 2, True), ("moshi_ttt.train", 3, True)]
