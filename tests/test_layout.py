"""The shape of the code base: layers, no import loops, one DeepSpeed module, files of one job.

Imports are read from the source (module level and inside functions alike), so an import hidden in a
function to dodge a loop is still a loop here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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


# The folders of `pretrain/`, lowest first: a folder imports only from folders before it (and from the run's
# definition at the top of `pretrain/`: config, schedule, batching), never from one after it.
FOLDERS = ("model", "checkpoint", "evaluation", "planning", "train")
# The top of `pretrain/`: the run's definition, which the folders build on (it imports only the model) ...
DEFINITION = ("pretrain.config", "pretrain.schedule", "pretrain.batching")
# ... and the commands users type, each a short entry point that nothing imports.
COMMANDS = ("pretrain.__main__", "pretrain.evaluate", "pretrain.export", "pretrain.generate", "pretrain.plan")


def _folder(name: str) -> str | None:
    parts = name.split(".")
    return (
        parts[1]
        if len(parts) > 2 and parts[0] == "pretrain" and parts[1] in FOLDERS
        else (parts[1] if len(parts) == 2 and parts[1] in FOLDERS else None)
    )


def test_layers():
    graph = _graph()
    for name, imports in graph.items():
        if name.startswith("data"):
            assert not [i for i in imports if i.startswith("pretrain")], f"{name} imports {imports}"
    importers_of_app = sorted(name for name, imports in graph.items() if "pretrain.train.app" in imports)
    assert importers_of_app == ["pretrain.__main__"]


def test_pretrain_is_grouped_and_imports_run_one_way_between_its_folders():
    graph = _graph()
    top = {
        name
        for name in graph
        if name.count(".") == 1 and name.startswith("pretrain.") and name.split(".")[1] not in FOLDERS
    }
    assert top == set(DEFINITION) | set(COMMANDS), f"modules at the top of pretrain/: {sorted(top)}"
    for name, imports in graph.items():
        if not name.startswith("pretrain"):
            continue
        assert not [i for i in imports if i in COMMANDS], f"{name} imports a command: {sorted(imports)}"
        if name in DEFINITION:
            allowed = {"model", None}
            assert all(_folder(i) in allowed for i in imports if i.startswith("pretrain")), (name, imports)
        folder = _folder(name)
        if folder is None:
            continue
        for imported in imports:
            other = _folder(imported)
            if other is not None and other != folder:
                assert FOLDERS.index(other) < FOLDERS.index(folder), f"{name} ({folder}/) imports {imported}"
    for name in COMMANDS[1:]:  # an entry point, not a second home of the command's code
        assert len((ROOT / "pretrain" / f"{name.split('.')[1]}.py").read_text().splitlines()) <= 12, name


def test_the_model_imports_only_torch_and_the_standard_library():
    """`import pretrain.model` works with Hydra, DeepSpeed, OmegaConf and `data/` unavailable."""
    blocked = ("hydra", "omegaconf", "deepspeed", "data", "pretrain.config", "wandb", "transformers")
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r} or name in {blocked!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pretrain.model\n"
        "from pretrain.model import ModelConfig, Transformer\n"
        "from pretrain.model import flops, kv_cache, parameter_groups, rope\n"
        "cfg = ModelConfig(name='t', vocab_size=64, dim=16, n_layers=1, n_heads=2, ffn_dim=24, max_seq_len=8)\n"
        "import torch\n"
        "print(Transformer(cfg)(torch.zeros(1, 4, dtype=torch.long)).shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "torch.Size([1, 4, 64])"


def test_the_model_and_the_loader_agree_on_the_ignored_label():
    from data.loader import IGNORE_INDEX as LOADER_IGNORE
    from pretrain.model.transformer import IGNORE_INDEX as MODEL_IGNORE

    assert MODEL_IGNORE == LOADER_IGNORE


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
# The engine (and its version contract), the DeepSpeed optimizers it may build, and Ulysses' groups, attention
# and TiledMLP that sequence parallelism plugs into the model.
DEEPSPEED_MODULES = (
    "pretrain.train.engine",
    "pretrain.train.versions",
    "pretrain.train.optimizer",
    "pretrain.train.sequence_parallel",
)


def test_deepspeed_engine_and_config_live_in_one_module():
    """Only the engine module (and its version contract) use DeepSpeed's engine; others its checkpoint
    utilities only."""
    for name, path in _modules().items():
        imports = _deepspeed_imports(path)
        if name in DEEPSPEED_MODULES:
            assert imports, name
            continue
        assert all(i.startswith(("deepspeed.utils", "deepspeed.checkpoint")) for i in imports), (
            name,
            imports,
        )
    for path in (ROOT / "pretrain" / "model").glob("*.py"):
        assert not _deepspeed_imports(path), path


def test_files_have_one_job_and_explain_themselves():
    for path in _modules().values():
        text = path.read_text()
        assert len(text.splitlines()) <= MAX_LINES, f"{path} has {len(text.splitlines())} lines"
        for phrase in ("DESIGN", "the issue", "../shared"):
            assert phrase not in text, f"{path} points outside the repository ({phrase!r})"
