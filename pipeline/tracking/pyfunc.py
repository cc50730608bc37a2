"""MLflow pyfunc wrapper: serve any registered method's network from its `model.pt` artifact.

Input: a pandas DataFrame, one row per utterance, with per modality m in (a, t, v)
the columns `{m}_features` (flattened (T, d_m) float list, row-major; an empty list is
fine where the modality is absent), `{m}_length` (valid steps) and `{m}_present`
(natural presence). Each row is routed to its true combination (natural missingness,
per-sample adapters). Rows with no modality get the training prior, as in `evaluate`.
Output: classification -> `label` + `prob_<class>` columns; regression -> `score`;
both with `combination` (the adapter set used, or "none").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from pipeline.core.modalities import COMBINATIONS, MODALITY_ORDER
from pipeline.methods.routing import route

SERVING_FILE = "serving.json"


def frame_from_arrays(
    features: dict[str, np.ndarray], lengths: dict[str, np.ndarray], present: np.ndarray
) -> pd.DataFrame:
    """Build the serving input frame from (N, T, d) arrays, (N,) lengths and (N, 3) presence."""
    present = np.asarray(present, dtype=bool)
    cols: dict[str, Any] = {}
    for j, m in enumerate(MODALITY_ORDER):
        x = np.asarray(features[m], dtype=np.float32)
        flat = x.reshape(x.shape[0], -1)  # (N, T*d)
        cols[f"{m}_features"] = [row.astype(np.float64).tolist() if p else [] for row, p in zip(flat, present[:, j])]
        cols[f"{m}_length"] = np.where(present[:, j], np.asarray(lengths[m]), 0).astype(np.int64)
        cols[f"{m}_present"] = present[:, j]
    return pd.DataFrame(cols)


def predict_frame(model: torch.nn.Module, frame: pd.DataFrame, serving: dict[str, Any]) -> pd.DataFrame:
    """Run `model` on a serving frame; the same routing `evaluate` uses for natural missingness."""
    cfg = model.config
    n = len(frame)
    absent = [f"{m}_{k}" for m in MODALITY_ORDER for k in ("features", "length", "present")
              if f"{m}_{k}" not in frame.columns]
    if absent:
        raise ValueError(f"serving input: missing columns {absent}")
    present = np.stack([_bool_column(frame, f"{m}_present") for m in MODALITY_ORDER], axis=1)  # (N, 3)
    feats, lens = {}, {}
    for j, m in enumerate(MODALITY_ORDER):
        t, d = cfg.seq_lens[m], cfg.input_dims[m]
        x = np.zeros((n, t * d), dtype=np.float32)  # (N, T*d)
        for i, row in enumerate(frame[f"{m}_features"]):
            if present[i, j] and row is not None and len(row):
                if len(row) != t * d:
                    raise ValueError(f"row {i}: {m}_features has {len(row)} values, expected T*d = {t}*{d}")
                x[i] = np.asarray(row, dtype=np.float32)
        feats[m] = torch.from_numpy(x.reshape(n, t, d))  # (N, T, d)
        lens[m] = torch.as_tensor(np.where(present[:, j], frame[f"{m}_length"].to_numpy(), 0), dtype=torch.long)
    routed = route(model, feats, lens, present, np.ones(3, dtype=bool), serving["prior"])
    return output_frame(routed.output, routed.combination, serving)


def output_frame(out: np.ndarray, comb: np.ndarray, serving: dict[str, Any]) -> pd.DataFrame:
    names = [COMBINATIONS[c] if c >= 0 else "none" for c in comb]
    if serving["task"] == "classification":
        classes = list(serving["classes"])
        frame = pd.DataFrame({f"prob_{c}": out[:, k] for k, c in enumerate(classes)})
        frame.insert(0, "label", [classes[k] for k in out.argmax(axis=1)])
    else:
        frame = pd.DataFrame({"score": out[:, 0]})
    frame["combination"] = names
    return frame


class MCULoRAPyfunc(mlflow.pyfunc.PythonModel):
    """Loads `model.pt` + `serving.json` (task, classes, prior) from the logged artifacts."""

    def load_context(self, context: Any) -> None:
        from pipeline.methods.checkpoint import load_model

        self.model, _ = load_model(context.artifacts["model"])
        self.model.eval()
        self.serving = json.loads(Path(context.artifacts["serving"]).read_text())

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return predict_frame(self.model, model_input, self.serving)


def log_pyfunc_model(
    model_path: str | Path,
    serving: dict[str, Any],
    input_example: pd.DataFrame,
    workdir: str | Path,
    name: str = "model",
) -> Any:
    """Log the pyfunc into the active run; the signature comes from running the real model on the example."""
    from mlflow.models import infer_signature

    from pipeline.methods.checkpoint import load_model

    model, _ = load_model(model_path)
    model.eval()
    output = predict_frame(model, input_example, serving)
    serving_path = Path(workdir) / SERVING_FILE
    serving_path.write_text(json.dumps(serving, indent=2, sort_keys=True))
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=MCULoRAPyfunc(),
        artifacts={"model": str(model_path), "serving": str(serving_path)},
        signature=infer_signature(input_example, output),
        input_example=input_example,
        # Explicit pins: inferring them would load the model in a subprocess (slow) for nothing.
        pip_requirements=[f"torch=={torch.__version__}", f"mlflow=={mlflow.__version__}",
                          f"numpy=={np.__version__}", f"pandas=={pd.__version__}"],
    )


def _bool_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        raise ValueError(f"serving input: missing column {name!r}")
    return frame[name].fillna(False).to_numpy(dtype=bool)
