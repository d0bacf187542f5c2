"""The shape of the code base: layers, no import loops, one DeepSpeed module, files of one job.

Imports are read from the source (module level and inside functions alike), so an import hidden in a
function to dodge a loop is still a loop here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("data", "pretrain")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        out.update(name for name in names if name in modules)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_import_loop_anywhere():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loop = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import loop: " + " -> ".join(loop))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_layers():
    graph = _graph()
    for name, imports in graph.items():
        if name.startswith("data"):
            assert not [i for i in imports if i.startswith("pretrain")], f"{name} imports {imports}"
    importers_of_app = sorted(name for name, imports in graph.items() if "pretrain.app" in imports)
    assert importers_of_app == ["pretrain.__main__"]


def _deepspeed_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "deepspeed")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed":
            out.add(node.module)
    return out


# The training engine, and what our math assumes of DeepSpeed (its version, the gradient-scale probe, the
# checked reads of its internals that the engine's repairs need).
DEEPSPEED_MODULES = ("pretrain.engine", "pretrain.versions")


def test_deepspeed_engine_and_config_live_in_one_module():
    """Only the engine module (and its version contract) use DeepSpeed's engine; others its checkpoint
    utilities only."""
    for name, path in _modules().items():
        imports = _deepspeed_imports(path)
        if name in DEEPSPEED_MODULES:
            assert "deepspeed" in imports
            continue
        assert all(i.startswith(("deepspeed.utils", "deepspeed.checkpoint")) for i in imports), (
            name,
            imports,
        )
    assert not _deepspeed_imports(ROOT / "pretrain" / "model.py")


def test_files_have_one_job_and_explain_themselves():
    for path in _modules().values():
        text = path.read_text()
        assert len(text.splitlines()) <= MAX_LINES, f"{path} has {len(text.splitlines())} lines"
        for phrase in ("DESIGN", "the issue", "../shared"):
            assert phrase not in text, f"{path} points outside the repository ({phrase!r})"
