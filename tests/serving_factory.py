"""A tiny model trained on REAL extracted features of a tiny generated corpus, for prediction tests.

corpus -> ingest -> extract x3 -> splits -> train (2 epochs), each with its stage's
`run_stage` and tmp paths, so the model's input dims and recipes are the real extractors'.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.corpus_factory import make_tiny_corpus

TRAIN_FAST: dict[str, Any] = {"seed": 3, "max_epochs": 2, "patience": 2, "batch_size": 16, "num_threads": 1,
                              "model": {"d_model": 16, "d_fusion": 32, "n_heads": 2}, "dpft": {"monitor_size": 32}}


def train_tiny_model(root: Path, n: int = 24, mlflow_uri: str | None = None) -> dict[str, Path]:
    """Run the real stages under `root`; returns the paths of the corpus, features and model."""
    from features import stage_acoustic, stage_textual, stage_visual
    from pipeline import ingest, splits, train

    listing = make_tiny_corpus(root / "corpus", n=n, dialogue_turns=1)  # lone utterances: by_speaker splits hold
    manifest, features = root / "manifest.parquet", root / "features"
    ingest.run_stage({"listing": str(listing), "out": str(manifest), "classes": ["neutral", "happy", "sad", "angry"]})
    for name, stage in (("acoustic", stage_acoustic), ("visual", stage_visual), ("textual", stage_textual)):
        stage.run_stage({"manifest": str(manifest), "out": str(features / f"{name}.arrow"), "cache_dir": None,
                         "workers": 1, "progress": False, "max_failure_share": 1.0})
    splits.run_stage({"manifest": str(manifest), "features_dir": str(features), "out_dir": str(root / "splits"),
                      "seed": 1, "strategy": "by_speaker"})
    mlflow = ({"enabled": True, "tracking_uri": mlflow_uri, "artifact_root": str(root / "mlartifacts")}
              if mlflow_uri else {"enabled": False})
    train.run_stage({**TRAIN_FAST, "manifest": str(manifest), "features_dir": str(features),
                     "splits_dir": str(root / "splits"), "out_dir": str(root / "out"), "mlflow": mlflow})
    return {"listing": listing, "corpus": listing.parent, "manifest": manifest, "features": features,
            "model": root / "out" / "models" / "model.pt", "root": root}


def shared_tiny_model(tmp_path_factory: Any) -> dict[str, Path]:
    """`train_tiny_model` once per pytest session (both prediction test modules reuse it)."""
    root = tmp_path_factory.getbasetemp() / "tiny_serving_model"
    done = root / "done"
    if not done.exists():
        train_tiny_model(root)
        done.write_text("ok")
    listing = root / "corpus" / "listing.parquet"
    return {"listing": listing, "corpus": listing.parent, "manifest": root / "manifest.parquet",
            "features": root / "features", "model": root / "out" / "models" / "model.pt", "root": root}


def clip_files(paths: dict[str, Path], index: int = 0) -> dict[str, Path]:
    """The wav / mp4 / txt of the corpus's `index`-th utterance."""
    import pyarrow.parquet as pq

    row = pq.read_table(paths["listing"]).to_pylist()[index]
    return {f: paths["corpus"] / row[f"{f}_path"] for f in ("audio", "video", "text")}


def log_tiny_model(tiny: dict[str, Path], root: Path, name: str) -> dict[str, Any]:
    """Log the tiny model (`log_pyfunc_model`) into a fresh SQLite store under `root`, register it as champion."""
    import tempfile

    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from pipeline.methods.checkpoint import load_model
    from pipeline.methods.routing import serving_info
    from pipeline.serving.predict import frame_from_arrays
    from pipeline.tracking.pyfunc import log_pyfunc_model
    from pipeline.tracking.runs import fluent_uri

    uri = f"sqlite:///{root / 'mlflow.db'}"
    model, extra = load_model(tiny["model"])
    cfg = model.config
    feats = {m: np.random.default_rng(0).normal(size=(2, cfg.seq_lens[m], cfg.input_dims[m])) for m in "atv"}
    example = frame_from_arrays(feats, {m: np.array([3, 2]) for m in "atv"}, np.array([[1, 1, 1], [0, 1, 0]], bool))
    serving = serving_info(extra["task"], extra["classes"], extra["prior"])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("serving", artifact_location=str(root / "artifacts"))
    with fluent_uri(uri):
        with mlflow.start_run(experiment_id=exp) as run, tempfile.TemporaryDirectory() as tmp:
            info = log_pyfunc_model(tiny["model"], serving, example, tmp, features_dir=tiny["features"])
        client.create_registered_model(name)
        version = client.create_model_version(name, info.model_uri, run.info.run_id)
        client.set_registered_model_alias(name, "champion", version.version)
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root / "model_copy")))
    return {"uri": uri, "model_uri": info.model_uri, "local": local, "example": example}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, payload: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def serve(model_uri: str, tracking_uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow models serve` in its own process group, answering on 127.0.0.1:`port` (waits for /ping)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise TimeoutError(f"mlflow models serve not up after 180 s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """End the server we started: its own process group (the CLI and its uvicorn child), by pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
