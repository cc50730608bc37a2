"""The layout's rules that a reader relies on: imports point inward, one home per vocabulary."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["pipeline", "features"])
def test_library_never_imports_the_orchestration_ring(package):
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n == "flows" or n.startswith("flows."))
                 for p in (ROOT / package).rglob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package}/ must not import flows/: {offenders}"


def test_lower_layers_never_import_stage_modules():
    """core/ and formats/ are the bottom: they import nothing else of the project's."""
    for sub in ("core", "formats"):
        for path in (ROOT / "pipeline" / sub).rglob("*.py"):
            bad = sorted(n for n in _imports(path) if n.startswith(("pipeline.", "features", "flows"))
                         and not n.startswith(("pipeline.core", "pipeline.formats")))
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_shipped_packages_hold_no_test_factories():
    shipped = [p for pkg in ("pipeline", "features", "flows") for p in (ROOT / pkg).rglob("*.py")]
    assert not [p for p in shipped if "testing" in p.stem or "factor" in p.stem]


def test_modality_names_have_one_home():
    """The letter/manifest/table names are written out only in pipeline/core/modalities.py."""
    spelled = ('"audio": "a"', '"acoustic": "audio"', '"a": "acoustic"', '"audio": "acoustic"')
    hits = [str(p.relative_to(ROOT)) for pkg in ("pipeline", "features", "flows") for p in (ROOT / pkg).rglob("*.py")
            if any(s in p.read_text() for s in spelled)]
    assert not hits, f"modality-name tables outside pipeline/core/modalities.py: {hits}"


def test_one_routing_function():
    """Validation, evaluation and serving route through pipeline.methods.routing.route, nobody else codes it."""
    users = {str(p.relative_to(ROOT)) for pkg in ("pipeline", "flows") for p in (ROOT / pkg).rglob("*.py")
             if "routing import" in p.read_text() and "route" in p.read_text()}
    for needed in ("pipeline/training/lit_module.py", "pipeline/evaluate.py"):
        assert needed in users, f"{needed} does not use the routing function"
    serving = ("pipeline/tracking/pyfunc.py", "pipeline/serving/predict.py")  # the served model, directly or via serving
    assert any(s in users for s in serving), "serving does not use the routing function"
    assert not [p for pkg in ("pipeline", "flows") for p in (ROOT / pkg).rglob("*.py")
                if "def predict_routed" in p.read_text()]


def test_no_module_sets_a_process_wide_mlflow_uri():
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ: only the scoped helper may call it."""
    offenders = [str(p.relative_to(ROOT)) for pkg in ("pipeline", "features", "flows") for p in (ROOT / pkg).rglob("*.py")
                 if "set_tracking_uri(" in p.read_text() and p.name != "runs.py"]
    assert not offenders, f"use pipeline.tracking.runs.fluent_uri instead in {offenders}"
