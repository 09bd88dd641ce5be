"""The import rules that keep the layout readable (ARCHITECTURE.md), read from the source with ast:

- a pass imports fxq library modules only, never another pass;
- fxq/ir and fxq/quant import no pass, backend, method package, CLI or pipeline;
- fxq/dist (the data-parallel World and its launch) imports nothing of fxq but its errors;
- only the pipeline puts passes in order: no other library module, and no bench script, imports fxq.passes;
- no library module imports the package root (`from fxq import ...`) or the CLI;
- no import cycles, imports inside functions included (type-checking-only imports excepted).
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFIX = {"fxq": "fxq", "passes": "fxq.passes", "kernels": "fxq.kernels"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PREFIX[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for top in PREFIX for p in (ROOT / top).rglob("*.py")}


MODULES = _sources()


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The fxq modules a file imports (a `from a import b` of submodule b counts as a.b)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fxq")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fxq":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for name, path in MODULES.items():
        g.add_node(name)
        g.add_edges_from((name, dep) for dep in imports_of(path, MODULES) if dep in MODULES and dep != name)
    return g


GRAPH = _graph()


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_sources_are_found():
    assert {"fxq.pipeline", "fxq.passes.quantize", "fxq.kernels.lfh_reduce", "fxq.ir.meta"} <= set(MODULES)


def test_every_package_is_shipped_and_tracked():
    """A package folder missing from pyproject's list is left out of a wheel; one that .gitignore hides (a 'dist/'
    rule meant for the packaging output) is missing from every clean clone."""
    packages = {_module_name(p.parent) for p in ROOT.glob("*/**/__init__.py") if p.parts[len(ROOT.parts)] in PREFIX}
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert packages <= listed, f"add {sorted(packages - listed)} to [tool.setuptools] packages in pyproject.toml"
    if (ROOT / ".git").exists():
        sources = [str(p.relative_to(ROOT)) for p in ROOT.glob("*/**/*.py") if p.parts[len(ROOT.parts)] in PREFIX]
        ignored = subprocess.run(
            ["git", "check-ignore", "--no-index", *sources], cwd=ROOT, capture_output=True, text=True
        ).stdout
        assert not ignored.split(), f"sources hidden by .gitignore: {ignored.split()[:5]}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _under(n, "fxq.passes")))
def test_a_pass_imports_no_other_pass(name):
    bad = [d for d in GRAPH.successors(name) if _under(d, "fxq.passes")]
    assert not bad, f"{name} imports {bad}: move the shared code into a library module"


@pytest.mark.parametrize("package", ["fxq.ir", "fxq.quant"])
def test_the_low_layers_import_nothing_above_them(package):
    above = ("fxq.passes", "fxq.backends", "fxq.eptq", "fxq.mp", "fxq.cli", "fxq.pipeline", "fxq.frontend")
    bad = [
        (n, d) for n in MODULES if _under(n, package) for d in GRAPH.successors(n) if any(_under(d, a) for a in above)
    ]
    assert not bad, bad


def test_the_data_parallel_layer_stands_on_the_errors_alone():
    bad = [(n, d) for n in MODULES if _under(n, "fxq.dist") for d in GRAPH.successors(n) if not _under(d, "fxq.dist")]
    assert all(d == "fxq.errors" for _, d in bad), bad


def test_only_the_pipeline_orders_passes():
    users = {n for n in MODULES if not _under(n, "fxq.passes") for d in GRAPH.successors(n) if _under(d, "fxq.passes")}
    assert users == {"fxq.pipeline"}
    bench = [p.name for p in (ROOT / "bench").glob("*.py") if "fxq.passes" in p.read_text()]
    assert not bench, f"bench scripts build their own pass lists: {bench}; ask fxq.pipeline.passes"


def test_no_library_module_imports_the_root_or_the_cli():
    bad = [(n, d) for n in MODULES for d in GRAPH.successors(n) if d == "fxq" and n != "fxq.__main__"]
    bad += [
        (n, d)
        for n in MODULES
        if not _under(n, "fxq.cli") and n not in ("fxq.__main__",)
        for d in GRAPH.successors(n)
        if _under(d, "fxq.cli")
    ]
    assert not bad, bad


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_the_rules_catch_what_they_forbid(tmp_path):
    """A pass importing a pass, seen by the same reader."""
    src = tmp_path / "bad.py"
    src.write_text("from fxq.passes.observe import Calibrate\nif TYPE_CHECKING:\n    from fxq.cli import main\n")
    found = imports_of(src, MODULES)
    assert found == {"fxq.passes.observe"}  # the type-checking import is not counted
    g = nx.DiGraph([("a", "b"), ("b", "a")])
    assert list(nx.simple_cycles(g))
