"""The package's shape, checked: no import cycle, imports point down, one home per artifact name.

Reads the source with ``ast`` (nothing is imported), so it runs in a second and fails naming the
module and the import that broke a rule.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selectmoe"

# modules that compose stages into runs: they may use reporting (DESIGN: "reporting is imported by
# pipeline/demo, never by the core"); everything else under selectmoe/ but demo/ and reporting/ is core
COMPOSERS = {"selectmoe.pipeline", "selectmoe.sweep", "selectmoe.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every selectmoe module ``name`` imports, at module level or inside functions, with the parent
    packages an import runs (except the importer's own packages, which are initialising already)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for target in targets:
            while target and target not in MODULES:  # `from pkg.mod import attr` -> pkg.mod
                target = target.rpartition(".")[0]
            if not target or target == "selectmoe":
                continue
            found.add(target)
            parent = target.rpartition(".")[0]
            while parent and parent != "selectmoe":
                if parent in MODULES and not name.startswith(parent + "."):
                    found.add(parent)
                parent = parent.rpartition(".")[0]
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_core_imports_neither_the_demo_nor_reporting():
    core = [
        n for n in GRAPH if not in_package(n, "selectmoe.demo") and not in_package(n, "selectmoe.reporting")
    ]
    bad = [
        f"{n} imports {t}"
        for n in core
        for t in GRAPH[n]
        if in_package(t, "selectmoe.demo") or (in_package(t, "selectmoe.reporting") and n not in COMPOSERS)
    ]
    assert not bad, "\n".join(bad)
    reporting = [n for n in GRAPH if in_package(n, "selectmoe.reporting")]
    assert not [t for n in reporting for t in GRAPH[n] if in_package(t, "selectmoe.demo")]


def test_models_and_data_import_no_ray_and_no_stage():
    stages = ("pretrain", "select", "finetune", "evaluate", "training", "pipeline", "sweep")
    for name in GRAPH:
        if not (in_package(name, "selectmoe.models") or in_package(name, "selectmoe.data")):
            continue
        source = MODULES[name].read_text()
        assert not re.search(r"^\s*(import ray|from ray)", source, re.M), f"{name} imports Ray"
        bad = [t for t in GRAPH[name] if any(in_package(t, f"selectmoe.{s}") for s in stages)]
        assert not bad, f"{name} imports {bad}"


def _module_level(name: str) -> tuple[set[str], bool]:
    """(the selectmoe modules ``name`` imports when it is imported, whether that import runs Ray's)."""
    modules, ray = set(), False
    for node in ast.parse(MODULES[name].read_text()).body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        ray = ray or any(t == "ray" or t.startswith("ray.") for t in targets)
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            while target and target != "selectmoe":  # the module and the packages its import runs
                if target in MODULES and not name.startswith(target + "."):
                    modules.add(target)
                target = target.rpartition(".")[0]
    return modules, ray


def test_the_stages_compute_imports_without_ray():
    """The models, the training steps and the scorer import Ray only inside the functions that talk to
    it, so they run where Ray is not installed (``benchmarks/gpu_scale.py`` on a GPU machine without it)."""
    compute = ("selectmoe.pretrain.worker", "selectmoe.finetune.worker", "selectmoe.select.scorer")
    seen, todo, with_ray = set(), list(compute), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        modules, ray = _module_level(name)
        if ray:
            with_ray.append(name)
        todo += modules
    assert not with_ray, f"import Ray at module level: {sorted(with_ray)}"


def test_artifact_names_and_the_ignore_index_have_one_home():
    homes = {
        '"scores"': "selectmoe/layout.py",
        '"selected.jsonl"': "selectmoe/layout.py",
        '"selected.parquet"': "selectmoe/layout.py",
        '"rejects.jsonl"': "selectmoe/layout.py",
        '"manifest.json"': "selectmoe/layout.py",
        '"metrics.jsonl"': "selectmoe/layout.py",
        '"training_ids.parquet"': "selectmoe/layout.py",
        '"stage_2_select"': "selectmoe/layout.py",
        "-100": "selectmoe/data/template.py",
    }
    for literal, home in homes.items():
        where = [
            str(p.relative_to(PACKAGE.parent))
            for p in MODULES.values()
            if literal in p.read_text() and not (literal == "-100" and "evaluate/tasks" in str(p))
        ]
        assert where == [home], f"{literal} appears in {where}, expected only in {home}"
