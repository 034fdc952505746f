"""The architecture as tests: which package may import which, no type name defined twice, no
function longer than a screen, no formatter escapes (docs/architecture.md explains the layers).

    cli  →  demo  →  rollout  →  serving | eval  →  common

A package imports only itself and the packages to its right; `serving` and `eval` never import
each other; nothing but `cli` imports the demo. Every import counts, also those inside
functions (they run all the same).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cli", "demo", "rollout", "serving", "eval", "common")
# What each package may import besides itself (the layers above).
ALLOWED: dict[str, frozenset[str]] = {
    "cli": frozenset({"demo", "rollout", "serving", "eval", "common"}),
    "demo": frozenset({"rollout", "serving", "eval", "common"}),
    "rollout": frozenset({"serving", "eval", "common"}),
    "serving": frozenset({"common"}),
    "eval": frozenset({"common"}),
    "common": frozenset(),
}
MAX_FUNCTION_LINES = 80


def product_modules() -> dict[str, Path]:
    """Dotted name (without the `stillhouse.` prefix) -> file, for every product module."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_packages(source: str, module: str) -> set[str]:
    """The top-level Stillhouse packages `source` (module `module`) imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[: -node.level]
                names = [".".join(["stillhouse", *base, *(node.module or "").split(".")])]
            elif node.module == "stillhouse":
                names = [f"stillhouse.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "stillhouse" and len(parts) > 1 and parts[1] in PACKAGES:
                found.add(parts[1])
    return found


def violations(imports: Mapping[str, Iterable[str]]) -> list[str]:
    """`module imports package` lines that break the layering, for {module: packages}."""
    out = []
    for module, packages in sorted(imports.items()):
        own = module.split(".")[0]
        for package in sorted(set(packages) - {own}):
            if package not in ALLOWED[own]:
                out.append(f"{module} imports {package}")
    return out


@pytest.mark.parametrize(
    ("imports", "expected"),
    [
        ({"rollout.distill.pipeline": ["demo"]}, ["rollout.distill.pipeline imports demo"]),
        ({"serving.gateway.app": ["eval"]}, ["serving.gateway.app imports eval"]),
        ({"eval.judging": ["serving"]}, ["eval.judging imports serving"]),
        ({"common.config": ["rollout"]}, ["common.config imports rollout"]),
        ({"eval.window": ["rollout"]}, ["eval.window imports rollout"]),
        ({"demo.run": ["cli"]}, ["demo.run imports cli"]),
        ({"cli.main": ["demo", "rollout", "serving", "eval", "common"]}, []),
        ({"demo.run": ["rollout", "serving", "eval", "common", "demo"]}, []),
        ({"rollout.gates": ["eval", "common"], "serving.serve": ["common", "serving"]}, []),
    ],
)
def test_the_layering_rule_names_each_upward_or_sideways_import(imports, expected):
    assert violations(imports) == expected


def test_imports_are_found_inside_functions_and_in_every_form():
    source = (
        "import stillhouse.common.config\n"
        "from stillhouse import eval\n"
        "from stillhouse.serving.gateway import app\n"
        "def f():\n"
        "    from stillhouse.demo.build import build_demo_world\n"
        "    from .data import load\n"
    )
    found = imported_packages(source, "rollout.distill.pipeline")
    assert found == {"common", "eval", "serving", "demo", "rollout"}


def test_no_module_imports_against_the_layers():
    modules = product_modules()
    assert len(modules) > 60 and "rollout.distill.pipeline" in modules
    imports = {m: imported_packages(p.read_text(), m) for m, p in modules.items()}
    assert violations(imports) == []


def test_only_the_cli_imports_the_demo():
    modules = product_modules()
    importers = {
        m
        for m, p in modules.items()
        if "demo" in imported_packages(p.read_text(), m) and not m.startswith("demo")
    }
    assert importers <= {m for m in modules if m.startswith("cli")}, importers


def _top_level_types(tree: ast.Module) -> Iterable[str]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            yield node.name
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            is_alias = isinstance(value, ast.Subscript | ast.BinOp) or (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.annotation, ast.Name)
                and node.annotation.id == "TypeAlias"
            )
            for target in targets:
                # CONSTANT = a[b] is a value, not a type
                name = target.id if isinstance(target, ast.Name) else ""
                if is_alias and name[:1].isupper() and not name.isupper():
                    yield name


def test_no_type_name_is_defined_twice_in_the_product():
    where: dict[str, list[str]] = defaultdict(list)
    for module, path in product_modules().items():
        for name in _top_level_types(ast.parse(path.read_text())):
            where[name].append(module)
    assert {n: ms for n, ms in where.items() if len(ms) > 1} == {}


def test_no_function_is_longer_than_a_screen():
    long = []
    for module, path in product_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == []


def test_the_product_code_has_no_formatter_escapes():
    escaped = [m for m, p in product_modules().items() if "# fmt: skip" in p.read_text()]
    assert escaped == []
