"""`imer demo`: a local web page to try a model on your own clips, served on 127.0.0.1 only.

Upload (or record) audio, upload a video and/or type a transcript; the page shows the
emotion (or the score of a regression model), the class probabilities and, per modality,
whether it was used or why not. The page posts the files as base64 to `/api/predict`,
which calls `predict_one`: the same `Predictor` as `imer predict` (pipeline/serving/),
extractors rebuilt from the model's recipes, the same routing rule and missing reasons.
The model options are `imer predict`'s (`--model models/model.pt`, or the registry).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

HOST = "127.0.0.1"  # never reachable from another machine: the demo has no authentication
FAMILIES = ("audio", "video", "text")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imer demo</title>
<style>
 body{font-family:sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem}
 label{display:block;margin:.8rem 0 .2rem;font-weight:bold} textarea{width:100%;height:4rem}
 #emotion{font-size:2rem;margin:.5rem 0} table{border-collapse:collapse} td{padding:.15rem .5rem}
 .bar{background:#4a7;height:.8rem} .used{color:#070} .missing{color:#a00}
</style></head><body>
<h1>imer: which emotion?</h1>
<p>Give any of the three: the model uses what is there and says which modalities it used.</p>
<label for="audio">Audio (.wav)</label><input id="audio" type="file" accept="audio/*">
<button id="record" type="button">Record</button> <span id="recstate"></span>
<label for="video">Video (.mp4)</label><input id="video" type="file" accept="video/*">
<label for="text">Transcript</label><textarea id="text" placeholder="what was said"></textarea>
<p><button id="predict" type="button">Predict</button> <span id="status"></span></p>
<div id="result" hidden>
 <div id="emotion"></div><div id="combination"></div>
 <table id="probs"></table><h3>Modalities</h3><ul id="modalities"></ul>
</div>
<script>
let recorded = null;
const b64 = blob => new Promise((ok, fail) => { const r = new FileReader();
  r.onload = () => ok(r.result.split(",")[1]); r.onerror = fail; r.readAsDataURL(blob); });
function wav(buffer) {  // mono 16-bit PCM WAV from an AudioBuffer (what the audio extractor reads)
  const x = buffer.getChannelData(0), n = x.length, out = new DataView(new ArrayBuffer(44 + 2 * n));
  const s = (o, t) => [...t].forEach((c, i) => out.setUint8(o + i, c.charCodeAt(0)));
  s(0, "RIFF"); out.setUint32(4, 36 + 2 * n, true); s(8, "WAVEfmt "); out.setUint32(16, 16, true);
  out.setUint16(20, 1, true); out.setUint16(22, 1, true); out.setUint32(24, buffer.sampleRate, true);
  out.setUint32(28, 2 * buffer.sampleRate, true); out.setUint16(32, 2, true); out.setUint16(34, 16, true);
  s(36, "data"); out.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) out.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, x[i])) * 32767, true);
  return new Blob([out], {type: "audio/wav"});
}
document.getElementById("record").onclick = async () => {
  const state = document.getElementById("recstate");
  const stream = await navigator.mediaDevices.getUserMedia({audio: true});
  const rec = new MediaRecorder(stream), chunks = [];
  rec.ondataavailable = e => chunks.push(e.data);
  rec.onstop = async () => { stream.getTracks().forEach(t => t.stop());
    const raw = await new Blob(chunks).arrayBuffer();
    recorded = wav(await new AudioContext().decodeAudioData(raw)); state.textContent = "recorded"; };
  rec.start(); state.textContent = "recording (4 s)"; setTimeout(() => rec.stop(), 4000);
};
function show(r) {
  document.getElementById("result").hidden = false;
  document.getElementById("emotion").textContent = r.label !== undefined ? r.label : "score " + r.score.toFixed(3);
  document.getElementById("combination").textContent = r.used_prior ?
    "nothing usable: the training prior answered" : "modalities used: " + r.combination;
  const probs = document.getElementById("probs"); probs.innerHTML = "";
  for (const [c, p] of Object.entries(r.probabilities || {})) {
    const row = probs.insertRow(); row.className = "prob"; row.dataset.cls = c;
    row.insertCell().textContent = c; row.insertCell().textContent = p.toFixed(3);
    row.insertCell().innerHTML = `<div class="bar" style="width:${Math.round(200 * p)}px"></div>`;
  }
  const mods = document.getElementById("modalities"); mods.innerHTML = "";
  for (const [m, s] of Object.entries(r.modalities)) {
    const li = document.createElement("li"); li.id = "mod-" + m;
    li.className = s.status === "present" ? "used" : "missing";
    li.textContent = s.status === "present" ? `${m}: used` : `${m}: not used (${s.status}${s.detail ? ": " + s.detail : ""})`;
    mods.appendChild(li);
  }
}
document.getElementById("predict").onclick = async () => {
  const status = document.getElementById("status"), body = {};
  const audio = document.getElementById("audio").files[0] || recorded, video = document.getElementById("video").files[0];
  if (audio) body.audio_b64 = await b64(audio);
  if (video) body.video_b64 = await b64(video);
  const text = document.getElementById("text").value;
  if (text.trim()) body.text = text;
  status.textContent = "predicting...";
  const res = await fetch("api/predict", {method: "POST", headers: {"Content-Type": "application/json"},
                                           body: JSON.stringify(body)});
  const r = await res.json();
  if (!res.ok) { status.textContent = "error: " + r.detail; return; }
  status.textContent = "done"; show(r);
};
</script></body></html>
"""


def predict_one(predictor: Any, payload: Mapping[str, Any]) -> dict[str, Any]:
    """One utterance from the page (`audio_b64`, `video_b64`, `text`) -> label, probabilities, modalities."""
    import pandas as pd

    row = {k: payload.get(k) for k in ("audio_b64", "video_b64", "text")}
    row["utterance_id"] = "demo"
    out = predictor.predict_media_frame(pd.DataFrame([row])).iloc[0]
    result: dict[str, Any] = {"combination": str(out["combination"]), "used_prior": bool(out["used_prior"]),
                              "modalities": {f: {"status": str(out[f"{f}_status"]),
                                                 "detail": "" if pd.isna(out[f"{f}_detail"]) else str(out[f"{f}_detail"])}
                                             for f in FAMILIES}}
    if "label" in out.index:
        result["label"] = str(out["label"])
        result["probabilities"] = {c.removeprefix("prob_"): float(out[c]) for c in out.index if c.startswith("prob_")}
    else:
        result["score"] = float(out["score"])
    return result


def make_app(predict: Callable[[Mapping[str, Any]], dict[str, Any]]) -> Any:
    """The FastAPI app: the page at `/`, `POST /api/predict`, `GET /healthz`."""
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import HTMLResponse

    app = FastAPI(title="imer demo", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/healthz")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/predict")
    def api_predict(payload: dict = Body(...)) -> dict[str, Any]:  # sync: FastAPI runs it in a worker thread
        unknown = sorted(set(payload) - {"audio_b64", "video_b64", "text"})
        if unknown:
            raise HTTPException(status_code=400, detail=f"unknown fields {unknown}")
        try:
            return predict(payload)
        except ValueError as exc:  # bad input the predictor refused (e.g. unknown columns)
            raise HTTPException(status_code=400, detail=str(exc)) from exc

    return app


def parser() -> argparse.ArgumentParser:
    from flows.predict import add_model_arguments

    p = argparse.ArgumentParser(prog="imer demo", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default: %(default)s)")
    mod = p.add_argument_group("which model (as in `imer predict`)")
    add_model_arguments(mod)
    mod.add_argument("--params", default="params.yaml", help="params file for the default model name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from flows.predict import load_predictor
    import uvicorn

    predictor = load_predictor(args)  # a recipe mismatch or a missing model fails here, before serving
    app = make_app(lambda payload: predict_one(predictor, payload))
    print(f"imer demo: http://{HOST}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
