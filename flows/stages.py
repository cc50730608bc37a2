"""The stage registry: one place that maps a stage name to its module.

Each stage module exposes `SECTION` (its params.yaml section) and
`run_stage(params: dict) -> dict` (resolve paths, call the stage's pure function,
return a JSON-able summary). The CLI, the DVC commands and the Prefect flows all go
through `run_stage`, so there is exactly one code path per stage.
"""
from __future__ import annotations

import importlib
from types import ModuleType

STAGE_MODULES: dict[str, str] = {
    "corpus": "pipeline.corpus.stage",
    "ingest": "pipeline.ingest",
    "extract_acoustic": "features.stage_acoustic",
    "extract_visual": "features.stage_visual",
    "extract_textual": "features.stage_textual",
    "feature_report": "pipeline.feature_report",
    "import": "pipeline.importers.stage",
    "splits": "pipeline.splits",
    "train": "pipeline.train",
    "evaluate": "pipeline.evaluate",
    "register": "pipeline.register",
    "adapt": "pipeline.adapt",
    "report": "pipeline.report",
}


def stage_module(name: str) -> ModuleType:
    """Import the module of stage `name`, with a clear error for unknown names."""
    if name not in STAGE_MODULES:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name])


def run_named_stage(name: str, params_path: str = "params.yaml") -> dict:
    """Run stage `name` with its own params section, without Prefect (the bare stage function)."""
    from pipeline.core.params import load_params

    module = stage_module(name)
    return module.run_stage(load_params(module.SECTION, params_path))
