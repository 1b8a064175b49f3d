"""The folders are layers, each importing only the ones below it, with no circle anywhere.

    runtime  ->  diffusion_core, data (not each other)  ->  evaluation  ->  launch  ->  slurm

Every import counts: at module level or inside a function (a lazy import is still a dependency).
The checker is tested on a planted upward import and a planted circle, so it can fail.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"runtime": 0, "diffusion_core": 1, "data": 1, "evaluation": 2, "launch": 3, "slurm": 4}


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str, known: dict[str, Path]) -> set[str]:
    """Project modules that `module` imports (resolving `from pkg import submodule`)."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in LAYERS and name != module:
                out.add(name)
    return out


def layer_violations(root: Path) -> list[str]:
    """Every upward or sideways import between the layers, and every circle among the modules."""
    known = _modules(root)
    graph = {m: _imports(p, m, known) for m, p in known.items()}
    problems = []
    for module, targets in sorted(graph.items()):
        mine = module.split(".")[0]
        for target in sorted(targets):
            theirs = target.split(".")[0]
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                problems.append(f"{module} imports {target}: {mine} may only use layers below it")
    # Circles: a depth-first search that reports each back edge's cycle once.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                problems.append("import circle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return problems


def test_the_tree_keeps_its_layers():
    assert layer_violations(REPO) == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in LAYERS:
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_check_fails_on_an_upward_import(tmp_path):
    root = _plant(tmp_path, {"launch/job.py": "x = 1\n",
                             "diffusion_core/maths.py": "def f():\n    from launch.job import x\n    return x\n",
                             "data/reader.py": "import diffusion_core.maths\n",
                             "evaluation/score.py": "from launch import job\n"})
    found = layer_violations(root)
    assert any(p.startswith("diffusion_core.maths imports launch.job") for p in found), found
    assert any(p.startswith("data.reader imports diffusion_core.maths") for p in found), found
    assert any(p.startswith("evaluation.score imports launch.job") for p in found), found


def test_the_check_fails_on_a_circle(tmp_path):
    root = _plant(tmp_path, {"launch/a.py": "from launch import b\n", "launch/b.py": "def g():\n    import launch.a\n"})
    assert layer_violations(root) == ["import circle: launch.a -> launch.b -> launch.a"]
