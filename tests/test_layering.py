"""The package's layering stays as designed: every import (module-level or inside a function) goes to
the same or a lower layer, and no modules import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deepssim"

# Lowest first. A module may import its own layer's and lower layers' packages only.
LAYERS = [
    {"errors", "registry", "progress", "_version", "labels", "seeds", "extras", "hardware", "settings"},
    {"io"},
    {"execution"},  # engines, search, merging: below the metrics and the scan
    {"ssim"},
    {"embedding"},
    {"metrics"},
    {"training"},
    {"scanning"},
    {"evaluation", "labelling", "monitor"},
    {"experiments"},
    {"cli"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("deepssim", *parts)).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """deepssim modules imported anywhere in the file, except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for child in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepssim"):
            # "from deepssim.cli import scan" imports the submodule deepssim.cli.scan if there is one
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if _exists(submodule) else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("deepssim"))
    return found


def _exists(module: str) -> bool:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return (
        path.with_suffix(".py").is_file()
        or (path / "__init__.py").is_file()
        or any(path.parent.glob(path.name + ".*.so"))
    )


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_package_has_a_layer():
    packages = {_package(module) for module in _graph()} - {""}
    assert packages <= set(RANK), f"give these packages a layer: {sorted(packages - set(RANK))}"


def test_no_import_goes_up_a_layer_or_to_the_package_root():
    wrong = []
    for module, imported in _graph().items():
        for target in imported:
            if target == "deepssim" and module != "deepssim":
                wrong.append(f"{module} imports the package root (import the defining module instead)")
            elif _package(module) and _package(target) and RANK[_package(target)] > RANK[_package(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    modules = set(graph)

    def targets(module):  # "from deepssim.metrics import x" imports the package's __init__
        return {t for t in graph[module] if t in modules}

    visiting, done, cycles = set(), set(), []

    def visit(module, path):
        visiting.add(module)
        for target in targets(module):
            if target in visiting:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in done:
                visit(target, [*path, target])
        visiting.discard(module)
        done.add(module)

    for module in sorted(modules):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layering_test_catches_a_violation(tmp_path):
    """The checks above are not vacuous: an execution module importing the scan is caught."""
    fake = tmp_path / "deepssim"
    (fake / "execution").mkdir(parents=True)
    (fake / "scanning").mkdir()
    (fake / "execution" / "bad.py").write_text("from deepssim.scanning.scan import scan\n")
    (fake / "scanning" / "scan.py").write_text("from deepssim.execution.bad import x\n")
    global PACKAGE
    real, PACKAGE = PACKAGE, fake
    try:
        graph = _graph()
        assert graph["deepssim.execution.bad"] == {"deepssim.scanning.scan"}
        try:
            test_no_import_goes_up_a_layer_or_to_the_package_root()
        except AssertionError as error:
            assert "deepssim.execution.bad -> deepssim.scanning.scan" in str(error)
        else:
            raise AssertionError("an upward import was not caught")
        try:
            test_no_import_cycles()
        except AssertionError as error:
            assert "import cycles" in str(error)
        else:
            raise AssertionError("a cycle was not caught")
    finally:
        PACKAGE = real
