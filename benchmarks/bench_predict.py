"""Prediction on new clips: `imer predict` latency and the served model's throughput.

Prints figures only (no asserts), with the load average next to them (the box is shared).
- cold: one utterance with audio + video + transcript, `imer predict` in a fresh interpreter
  (imports, model load, extractor set-up, extraction, prediction), from a checkpoint and
  from the registry (`models:/...@champion`);
- warm: per utterance over a folder of 100 utterances in one process (model and
  extractors loaded once), and one utterance at a time once loaded;
- served: `mlflow models serve` on 127.0.0.1, one client sending sequential requests of
  one utterance: raw media (base64 wav + mp4 + transcript text) and feature rows.
The model is the tests' tiny one, trained on real features of a generated corpus.

    python -m benchmarks.bench_predict [--root DIR] [--media-requests 30] [--feature-requests 200]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "imer-bench"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def cold(args: list[str], runs: int = 3) -> float:
    """Median wall seconds of `imer predict ARGS` in a fresh interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.predict", *args], env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def warm(tiny: dict, folder: Path) -> dict:
    from pipeline.methods.checkpoint import load_model
    from pipeline.methods.routing import serving_info
    from pipeline.serving.media import items_from_folder
    from pipeline.serving.predict import Predictor
    from pipeline.serving.recipes import model_recipes

    model, extra = load_model(tiny["model"])
    pred = Predictor(model, serving_info(extra["task"], extra["classes"], extra["prior"]),
                     model_recipes(extra, tiny["features"]), extra["feature_config_hashes"])
    items = items_from_folder(folder)
    pred.predict_items(items[:1])  # set-up paid here
    t = time.perf_counter()
    pred.predict_items(items)
    batch_s = (time.perf_counter() - t) / len(items)
    one = []
    for item in items[:20]:
        t = time.perf_counter()
        pred.predict_items([item])
        one.append(time.perf_counter() - t)
    return {"folder_per_utt_s": batch_s, "one_p50_s": _pct(one, 0.5), "one_p95_s": _pct(one, 0.95)}


def throughput(port: int, payload: dict, n: int) -> dict:
    from tests.serving_factory import post

    post(port, payload)  # first request pays lazy set-up
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        post(port, payload)
        lat.append(time.perf_counter() - t)
    return {"rps": n / (time.perf_counter() - t0), "p50_ms": 1000 * _pct(lat, 0.5), "p95_ms": 1000 * _pct(lat, 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="work dir (default: a temp dir, removed after)")
    parser.add_argument("--media-requests", type=int, default=30)
    parser.add_argument("--feature-requests", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import torch

    torch.set_num_threads(1)
    from tests.serving_factory import clip_files, free_port, log_tiny_model, serve, stop, train_tiny_model

    root = args.root or Path(tempfile.mkdtemp(prefix="bench-predict-"))
    t = time.perf_counter()
    tiny = train_tiny_model(root / "tiny") if not (root / "tiny" / "out" / "models" / "model.pt").exists() else \
        {"model": root / "tiny/out/models/model.pt", "features": root / "tiny/features",
         "listing": root / "tiny/corpus/listing.parquet", "corpus": root / "tiny/corpus"}
    store = log_tiny_model(tiny, Path(tempfile.mkdtemp(dir=root)), NAME)
    print(f"set-up (tiny model, logged + registered): {time.perf_counter() - t:.0f} s; load average {os.getloadavg()}")

    clips = clip_files(tiny, 0)
    files = ["--audio", str(clips["audio"]), "--video", str(clips["video"]), "--text", str(clips["text"])]
    ckpt = cold(["--model", str(tiny["model"]), "--features-dir", str(tiny["features"]), *files])
    reg = cold(["--tracking-uri", store["uri"], "--model-name", NAME, *files])
    print(f"imer predict, 1 utterance a+v+t, cold (fresh interpreter, median of 3): checkpoint {ckpt:.2f} s, "
          f"registry {reg:.2f} s; load average {os.getloadavg()}")

    folder = root / "folder100"
    folder.mkdir(exist_ok=True)
    for i in range(100):
        src = clip_files(tiny, i % 20)
        for f, p in src.items():
            shutil.copy(p, folder / f"u{i:03d}{p.suffix}")
    w = warm(tiny, folder)
    print(f"imer predict, warm: {1000 * w['folder_per_utt_s']:.0f} ms per utterance over a folder of 100; "
          f"one at a time p50 {1000 * w['one_p50_s']:.0f} ms, p95 {1000 * w['one_p95_s']:.0f} ms; "
          f"load average {os.getloadavg()}")

    port = free_port()
    proc = serve(f"models:/{NAME}@champion", store["uri"], port, root / "serve.log")
    try:
        media = {"dataframe_records": [{"audio_b64": base64.b64encode(clips["audio"].read_bytes()).decode(),
                                        "video_b64": base64.b64encode(clips["video"].read_bytes()).decode(),
                                        "text": clips["text"].read_text()}]}
        feats = {"dataframe_split": json.loads(store["example"].iloc[:1].to_json(orient="split"))}
        for label, payload, n in (("raw media (a+v+t)", media, args.media_requests),
                                  ("feature rows (a+v+t)", feats, args.feature_requests)):
            r = throughput(port, payload, n)
            print(f"served, {label}, {n} sequential requests of 1 utterance: {r['rps']:.1f} req/s, "
                  f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms; load average {os.getloadavg()}")
    finally:
        stop(proc)
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
