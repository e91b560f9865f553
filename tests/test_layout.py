"""The package's layers, read from its source: one direction of imports, no cycle, no private
name crossing a module, and no work done at import time."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# The import name of each source folder, as pyproject.toml's package-dir maps it.
ROOTS = {"ckptflow": REPO / "tasks", "ckptflow.flows": REPO / "flows"}
# What each layer may import of ckptflow; anything else is a violation. Listed bottom up.
ALLOWED = {
    "ckptflow.core": {"ckptflow.core"},
    "ckptflow.config": {"ckptflow.core"},
    "ckptflow.tutorial": {"ckptflow.core", "ckptflow.tutorial"},
    "ckptflow.orchestration": {"ckptflow.core", "ckptflow.config", "ckptflow.orchestration"},
    "ckptflow.stages": {"ckptflow.core", "ckptflow.config", "ckptflow.tutorial",
                        "ckptflow.orchestration", "ckptflow.stages", "ckptflow.training"},
    "ckptflow.training": {"ckptflow.core", "ckptflow.config", "ckptflow.tutorial",
                          "ckptflow.orchestration", "ckptflow.training"},
}
NO_PREFECT = ("ckptflow.core", "ckptflow.config", "ckptflow.tutorial")


def modules() -> dict[str, Path]:
    """Every module of the package by its import name."""
    found = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import in a file, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def layer_of(module: str) -> str | None:
    return next((layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")),
                None)


def test_the_package_maps_every_source_file():
    names = modules()
    assert "ckptflow.core.checkpoints" in names and "ckptflow.flows.cli" in names
    assert "ckptflow.training.state" in names and "ckptflow.tutorial.model" in names


def test_imports_go_one_way_with_no_cycle_and_no_private_name_across_modules():
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    problems = []
    for module, path in known.items():
        layer = layer_of(module)
        for target, names, line in imports(path):
            where = f"{path.relative_to(REPO)}:{line}"
            if target.split(".")[0] == "prefect" and layer in NO_PREFECT:
                problems.append(f"{where}: {module} imports Prefect")
            if not target.startswith("ckptflow"):
                continue
            for name in names:
                if name.startswith("_"):
                    problems.append(f"{where}: imports the private name {target}.{name}")
            imported = [f"{target}.{n}" if f"{target}.{n}" in known else target for n in names] \
                or [target]
            for dependency in imported:
                if dependency not in known:
                    problems.append(f"{where}: imports {dependency}, which does not exist")
                    continue
                graph[module].add(dependency)
                allowed = ALLOWED.get(layer)
                if allowed is not None and layer_of(dependency) not in allowed \
                        and not dependency == "ckptflow":
                    problems.append(f"{where}: {module} ({layer}) imports {dependency}")
    assert not problems, "\n".join(problems)
    assert not find_cycles(graph), find_cycles(graph)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first walk (each as the modules on it)."""
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dependency in sorted(graph.get(node, ())):
            if state.get(dependency) == "open":
                cycles.append(stack[stack.index(dependency):] + [dependency])
            elif dependency not in state:
                visit(dependency, [*stack, dependency])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.timeout(300)
def test_importing_the_library_changes_no_environment_variable_and_no_logger():
    """Only the entry points (the CLI, the flow modules) set environment defaults and log levels."""
    library = sorted(m for m in modules() if not m.startswith(("ckptflow.flows", "ckptflow.__main__")))
    code = (
        "import importlib, json, logging, os, sys\n"
        "import keras, pandas, prefect, tensorflow  # what they set themselves is theirs\n"
        "before = dict(os.environ)\n"
        f"for name in {library!r}:\n"
        "    importlib.import_module(name)\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "ours, theirs = logging.getLogger('ckptflow'), logging.getLogger('tensorflow')\n"
        "loggers = {'ckptflow': [ours.level, len(ours.handlers)], 'tensorflow': theirs.level}\n"
        "print(json.dumps({'changed': changed, 'loggers': loggers}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["changed"] == []
    assert report["loggers"] == {"ckptflow": [logging.NOTSET, 0], "tensorflow": logging.NOTSET}


# Stages share through core, not through each other; only these run other stages in order.
STAGE_RUNNERS = {"ckptflow.stages.prepare", "ckptflow.stages.sweep"}


def test_no_stage_imports_another_stage():
    known = modules()
    problems = []
    for module, path in known.items():
        if layer_of(module) != "ckptflow.stages" or module in STAGE_RUNNERS:
            continue
        for target, names, line in imports(path):
            imported = [f"{target}.{n}" for n in names if f"{target}.{n}" in known] or [target]
            problems += [f"{path.relative_to(REPO)}:{line}: {module} imports {dependency}"
                         for dependency in imported
                         if layer_of(dependency) == "ckptflow.stages" and dependency != module
                         and dependency != "ckptflow.stages"]
    assert not problems, "\n".join(problems)
