"""dvc.yaml's dependencies are true: every Python file a stage's command imports (its import
closure within this project, lazy imports included) lies under one of that stage's deps, so
editing any of them makes `dvc repro` rerun the stage instead of saying "up to date"."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OURS = ("tuneoff", "stages", "flows")


def module_file(name: str) -> Path | None:
    """The file of module `name` (a package's __init__.py), or None if it is not one of ours."""
    if name.split(".")[0] not in OURS:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def with_parents(name: str) -> list[str]:
    """`a.b.c` runs a/__init__.py and a/b/__init__.py before a/b/c.py."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def closure(modules: list[str]) -> set[Path]:
    """The project files that importing `modules` can execute."""
    seen: set[Path] = set()
    todo = [m for name in modules for m in with_parents(name)]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(m for name in imported(path) for m in with_parents(name))
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def command_modules(cmd: str) -> list[str]:
    """The modules a stage command runs: `python -m a.b c.d x y` runs a.b, which runs c.d."""
    words = cmd.split()
    assert words[:2] == ["python", "-m"], f"stage command {cmd!r} is not `python -m <module> ...`"
    return [w for w in words[2:] if module_file(w)]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


@pytest.mark.parametrize("name", sorted(stages()))
def test_each_stage_depends_on_every_file_it_imports(name):
    body = stages()[name]
    body = body.get("do", body)  # foreach stages keep their body under `do`
    missing = sorted(str(p.relative_to(ROOT)) for p in closure(command_modules(body["cmd"]))
                     if not covered(p, body["deps"]))
    assert not missing, f"dvc.yaml stage {name!r} imports {missing}, which its deps do not cover"


def test_the_closure_follows_lazy_imports():
    """A check that cannot miss what it checks: the train stage reaches the CPU attention kernel
    through the loop, and evaluate reaches the lineage module W&B tracking imports inside a function
    (and, reading each prompt once, no longer the training loop)."""
    train = {str(p.relative_to(ROOT)) for p in closure(["tuneoff.training.launch", "stages.train"])}
    assert {"tuneoff/training/attention.py", "tuneoff/training/loop.py", "tuneoff/__init__.py"} <= train
    evaluate = {str(p.relative_to(ROOT)) for p in closure(["stages.evaluate"])}
    assert "tuneoff/core/lineage.py" in evaluate and "tuneoff/training/loop.py" not in evaluate


def test_the_library_never_imports_stages_flows_or_the_cli():
    library = [p for p in (ROOT / "tuneoff").rglob("*.py") if p.name != "cli.py"]
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imported(p)
                                                  if n.split(".")[0] in ("stages", "flows") or n == "tuneoff.cli")
                 for p in library}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_circle_among_the_projects_modules():
    """No module reaches itself through the imports of ours it makes (function-level imports too): a
    circle makes the import order matter and a move break the other side (flows/publish.py once took
    `sh` from flows/bakeoff.py, which imports publish)."""
    files = [p for top in OURS for p in (ROOT / top).rglob("*.py")]
    edges = {p: {module_file(m) for name in imported(p) for m in with_parents(name)} - {None, p} for p in files}
    path: list[Path] = []

    def visit(p: Path, done: set[Path]) -> None:
        assert p not in path, "import circle: " + " -> ".join(str(q.relative_to(ROOT)) for q in path[path.index(p):] + [p])
        if p in done:
            return
        path.append(p)
        for q in edges.get(p, ()):
            visit(q, done)
        path.pop()
        done.add(p)

    done: set[Path] = set()
    for p in files:
        visit(p, done)
