"""The registered pyfunc: logged from code, takes raw media and feature rows, served for real, portable.

Real parts only: a SQLite MLflow store in tmp, the tiny model trained on real features
(tests/serving_factory.py), a real `mlflow models serve` process (slow) and a separate
virtualenv built from the logged model's own requirements.txt (slow).
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from pipeline.methods.checkpoint import load_model
from pipeline.methods.routing import serving_info
from pipeline.serving.predict import Predictor
from pipeline.serving.recipes import model_recipes
from tests.serving_factory import clip_files, free_port, log_tiny_model, post, serve, shared_tiny_model, stop

NAME = "imer-tiny"


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The tiny model logged with `log_pyfunc_model` into a fresh store and registered as champion."""
    tiny = shared_tiny_model(tmp_path_factory)
    store = log_tiny_model(tiny, tmp_path_factory.mktemp("store"), NAME)
    model, extra = load_model(tiny["model"])
    direct = Predictor(model, serving_info(extra["task"], extra["classes"], extra["prior"]),
                       model_recipes(extra, tiny["features"]), extra["feature_config_hashes"])
    return {**tiny, **store, "direct": direct, "classes": extra["classes"]}


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


@pytest.mark.slow  # starts a real server (~30-60 s on the shared box)
def test_mlflow_models_serve_answers_a_raw_media_post(logged, tmp_path):
    port = free_port()
    proc = serve(f"models:/{NAME}@champion", logged["uri"], port, tmp_path / "serve.log")
    try:
        clips = clip_files(logged, 6)
        media = _media_rows(clips).iloc[:2]
        got = post(port, {"dataframe_records": json.loads(media.to_json(orient="records"))})["predictions"]
        assert [p["combination"] for p in got] == ["at", "v"]
        assert got[0]["label"] in logged["classes"] and got[0]["audio_status"] == "present"
        feats = post(port, {"dataframe_split": json.loads(logged["example"].to_json(orient="split"))})["predictions"]
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
