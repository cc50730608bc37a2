"""The registered pyfunc: logged from code, takes raw media and feature rows, served for real, portable.

Real parts only: a SQLite MLflow store in tmp, the tiny model trained on real features
(tests/serving_factory.py), a real `mlflow models serve` process (slow) and a separate
virtualenv built from the logged model's own requirements.txt (slow).
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.methods.checkpoint import load_model
from pipeline.methods.routing import serving_info
from pipeline.serving.predict import Predictor, frame_from_arrays
from pipeline.serving.recipes import model_recipes
from tests.serving_factory import clip_files, shared_tiny_model

NAME = "imer-tiny"


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The tiny model logged with `log_pyfunc_model` into a fresh store and registered as champion."""
    from mlflow import MlflowClient

    from pipeline.tracking.pyfunc import log_pyfunc_model
    from pipeline.tracking.runs import fluent_uri

    tiny = shared_tiny_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model, extra = load_model(tiny["model"])
    cfg = model.config
    feats = {m: np.random.default_rng(0).normal(size=(2, cfg.seq_lens[m], cfg.input_dims[m])) for m in "atv"}
    example = frame_from_arrays(feats, {m: np.array([3, 2]) for m in "atv"}, np.array([[1, 1, 1], [0, 1, 0]], bool))
    serving = serving_info(extra["task"], extra["classes"], extra["prior"])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("serving", artifact_location=str(root / "artifacts"))
    with fluent_uri(uri), mlflow.start_run(experiment_id=exp) as run, tempfile.TemporaryDirectory() as tmp:
        info = log_pyfunc_model(tiny["model"], serving, example, tmp, features_dir=tiny["features"])
    version = client.create_model_version(NAME, info.model_uri, run.info.run_id) \
        if client.search_registered_models(f"name='{NAME}'") else None
    if version is None:
        client.create_registered_model(NAME)
        version = client.create_model_version(NAME, info.model_uri, run.info.run_id)
    client.set_registered_model_alias(NAME, "champion", version.version)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root / "model_copy"),
                                                     tracking_uri=uri))
    direct = Predictor(model, serving, model_recipes(extra, tiny["features"]), extra["feature_config_hashes"])
    return {**tiny, "uri": uri, "model_uri": info.model_uri, "local": local, "example": example,
            "direct": direct, "classes": extra["classes"]}


def _media_rows(clips: dict[str, Path]) -> pd.DataFrame:
    return pd.DataFrame({
        "utterance_id": ["b64_audio_and_text", "video_path_only", "bad_b64"],
        "audio_b64": [base64.b64encode(clips["audio"].read_bytes()).decode(), None, "%%not base64%%"],
        "text": ["I cannot believe how wonderful this is", None, None],
        "video_path": [None, str(clips["video"]), None],
    })


def test_model_is_logged_from_code_with_installable_requirements(logged):
    mlmodel = yaml.safe_load((logged["local"] / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # no pickle of project classes
    assert {"pipeline", "features"} <= {p.name for p in (logged["local"] / flavor["code"]).iterdir()}
    assert {"model.pt", "serving.json", "extractors.json"} <= {p.name for p in (logged["local"] / "artifacts").iterdir()}
    reqs = (logged["local"] / "requirements.txt").read_text().split()
    assert reqs and not [r for r in reqs if "+" in r], reqs  # no local version labels (2.13.0+cpu)
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("opensmile==") for r in reqs)
    names = {c["name"]: c for c in json.loads(mlmodel["signature"]["inputs"])}
    assert not names["a_features"]["required"] and names["audio_b64"]["type"] == "string"


def test_loaded_model_answers_media_rows_like_imer_predict_and_keeps_feature_rows(logged):
    served = mlflow.pyfunc.load_model(str(logged["local"]))
    clips = clip_files(logged, 4)
    got = served.predict(_media_rows(clips)).set_index("utterance_id")
    assert got.loc["b64_audio_and_text", "combination"] == "at"
    assert got.loc["video_path_only", "combination"] == "v"
    assert got.loc["bad_b64", "used_prior"] and got.loc["bad_b64", "audio_status"] == "invalid_base64"
    from pipeline.serving.media import MediaItem

    ref = logged["direct"].predict_items([MediaItem("x", {"audio": clips["audio"], "video": clips["video"]})])
    via_paths = served.predict(pd.DataFrame({"audio_path": [str(clips["audio"])], "video_path": [str(clips["video"])]}))
    cols = [f"prob_{c}" for c in logged["classes"]]
    assert via_paths[cols].to_numpy() == pytest.approx(ref[cols].to_numpy(), abs=1e-6)
    rows = served.predict(logged["example"])
    assert rows["combination"].tolist() == ["atv", "t"]
    assert rows[cols].to_numpy() == pytest.approx(logged["direct"].predict_features(logged["example"])[cols].to_numpy())


def test_imer_predict_defaults_to_the_registered_champion(logged, tmp_path):
    from flows.predict import main

    out = tmp_path / "p.json"
    clips = clip_files(logged, 5)
    assert main(["--tracking-uri", logged["uri"], "--model-name", NAME, "--text", str(clips["text"]),
                 "--audio", str(clips["audio"]), "--out", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    assert row["combination"] == "at" and row["video_status"] == "no_path"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload: dict, timeout: float = 120) -> dict:
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


@pytest.mark.slow  # starts a real server (~30-60 s on the shared box)
def test_mlflow_models_serve_answers_a_raw_media_post(logged, tmp_path):
    port = _free_port()
    proc = serve(f"models:/{NAME}@champion", logged["uri"], port, tmp_path / "serve.log")
    try:
        clips = clip_files(logged, 6)
        media = _media_rows(clips).iloc[:2]
        got = _post(port, {"dataframe_records": json.loads(media.to_json(orient="records"))})["predictions"]
        assert [p["combination"] for p in got] == ["at", "v"]
        assert got[0]["label"] in logged["classes"] and got[0]["audio_status"] == "present"
        feats = _post(port, {"dataframe_split": json.loads(logged["example"].to_json(orient="split"))})["predictions"]
        assert [p["combination"] for p in feats] == ["atv", "t"]
    finally:
        stop(proc)
    assert proc.returncode is not None


@pytest.mark.slow  # builds a virtualenv from the model's requirements.txt (pip's configured indexes and /opt/wheels)
def test_model_loads_and_predicts_in_a_clean_virtualenv(logged, tmp_path):
    venv = tmp_path / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(logged["local"] / "requirements.txt")],
                         capture_output=True, text=True, timeout=1800)
    assert pip.returncode == 0, pip.stderr[-3000:]
    build_s = time.monotonic() - started
    print(f"clean virtualenv built in {build_s:.0f} s")
    clips = clip_files(logged, 7)
    script = tmp_path / "outside" / "load.py"
    script.parent.mkdir()
    script.write_text(
        "import json, sys\nimport mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import pipeline\nassert not pipeline.__file__.startswith(sys.argv[3]), pipeline.__file__\n"
        "out = m.predict(pd.DataFrame({'audio_path': [sys.argv[2]], 'text': ['this is great']}))\n"
        "print(json.dumps(out.to_dict(orient='records')))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(venv / "bin" / "python"), str(script), str(logged["local"]), str(clips["audio"]),
                           str(Path(__file__).resolve().parents[1])],
                          cwd=script.parent, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])[0]
    assert row["combination"] == "at" and row["label"] in logged["classes"]
