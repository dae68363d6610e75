"""Layering rules of the package, checked on the source with ``ast`` (nothing is imported).

* ``autoddl/formulations/`` never imports torch (at any level, functions included);
* under ``autoddl/engine/`` only the capture side (``capture.py``, ``normalize.py``, ``models.py``,
  ``moe.py``, ``zoo.py``) imports torch;
* only modules under ``autoddl/runtime/`` import ``torch.distributed``;
* solver packages (pulp, highspy, ortools) are imported by the backends only inside functions.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import autoddl

PKG = Path(autoddl.__file__).resolve().parent
ROOT = PKG.parent
SOLVER_PACKAGES = ("pulp", "highspy", "ortools")
ENGINE_TORCH_OK = {"capture.py", "models.py", "moe.py", "normalize.py", "zoo.py"}


@dataclass(frozen=True)
class Import:
    module: str  # the absolute module imported ("torch.nn", "torch.distributed", ...)
    line: int
    top_level: bool  # not inside a function (module body, class body, if/try at module level)


def _resolve_from(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]  # c.py or __init__.py
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(path: Path) -> list[Import]:
    """Every import in the file, with the modules it names (``from a import b`` names ``a.b``
    as well as ``a``, so ``from torch import distributed`` counts as ``torch.distributed``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            top = not in_function
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(alias.name, child.lineno, top))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve_from(child, path)
                found.append(Import(base, child.lineno, top))
                for alias in child.names:
                    if alias.name != "*":
                        found.append(Import(f"{base}.{alias.name}", child.lineno, top))
            elif isinstance(child, ast.Call) and child.args \
                    and isinstance(child.args[0], ast.Constant) \
                    and isinstance(child.args[0].value, str):
                # importlib.import_module("torch.x") / __import__("torch.x") with a literal name
                f = child.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("import_module", "__import__"):
                    found.append(Import(child.args[0].value, child.lineno, top))
            visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _is(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _modules() -> list[Path]:
    files = sorted(PKG.rglob("*.py"))
    assert files, f"no modules found under {PKG}"
    return files


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _report(broken: list[str], rule: str) -> str:
    return f"layering rule broken: {rule}\n  " + "\n  ".join(broken)


def test_parser_sees_imports():
    """Self-check of the scanner on the modules known to import torch."""
    mods = {i.module for i in imports_of(PKG / "engine" / "models.py")}
    assert "torch" in mods and "torch.nn" in mods
    rel = {i.module for i in imports_of(PKG / "engine" / "planner.py")}
    assert "autoddl.engine.cluster" in rel


def test_scanner_catches_hidden_imports(tmp_path):
    """Imports inside functions, ``from torch import distributed`` and ``import_module``."""
    src = tmp_path / "mod.py"
    src.write_text(
        "import importlib\n"
        "class C:\n"
        "    import pulp\n"
        "def f():\n"
        "    from torch import distributed as dist\n"
        "    import highspy\n"
        "    return importlib.import_module('torch.nn')\n"
        "try:\n"
        "    from ortools.sat.python import cp_model\n"
        "except ImportError:\n"
        "    pass\n"
    )
    got = {(i.module, i.top_level) for i in imports_of(src)}
    assert ("pulp", True) in got
    assert ("torch.distributed", False) in got
    assert ("highspy", False) in got
    assert ("torch.nn", False) in got
    assert ("ortools.sat.python.cp_model", True) in got


def test_formulations_never_import_torch():
    broken = [
        f"{_rel(p)}:{i.line} imports {i.module}"
        for p in _modules() if _rel(p).startswith("autoddl/formulations/")
        for i in imports_of(p) if _is(i.module, "torch")
    ]
    assert not broken, _report(broken, "nothing under autoddl/formulations/ imports torch")


def test_engine_torch_only_in_capture_and_models():
    broken = [
        f"{_rel(p)}:{i.line} imports {i.module}"
        for p in _modules()
        if _rel(p).startswith("autoddl/engine/") and p.name not in ENGINE_TORCH_OK
        for i in imports_of(p) if _is(i.module, "torch")
    ]
    assert not broken, _report(
        broken, "under autoddl/engine/ only capture.py, normalize.py, models.py and zoo.py "
                "import torch")


def test_torch_distributed_only_in_runtime():
    broken = [
        f"{_rel(p)}:{i.line} imports {i.module}"
        for p in _modules() if not _rel(p).startswith("autoddl/runtime/")
        for i in imports_of(p) if _is(i.module, "torch.distributed")
    ]
    assert not broken, _report(
        broken, "only modules under autoddl/runtime/ import torch.distributed")


def test_backends_import_solvers_lazily():
    backends = [p for p in _modules() if _rel(p).startswith("autoddl/formulations/backends/")]
    assert backends, "no backend modules found"
    broken = [
        f"{_rel(p)}:{i.line} imports {i.module} at module level"
        for p in backends
        for i in imports_of(p)
        if i.top_level and any(_is(i.module, s) for s in SOLVER_PACKAGES)
    ]
    assert not broken, _report(
        broken, "backends import pulp/highspy/ortools only inside functions")
