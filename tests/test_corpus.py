"""The embedded corpus: real files, deterministic bytes, faithful breakage ground truth."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from pipeline.corpus import CorpusConfig, generate_corpus
from pipeline.core.params import load_params
from pipeline.corpus.breakage import CODES, wav_data_sizes
from pipeline.corpus.profiles import DEFAULT_PROFILE, KNOBS, PROFILES
from tests.corpus_factory import make_tiny_corpus, tiny_config

CASCADE = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _read_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_corpus(tmp_path_factory.mktemp("clean"), n=24, seed=11)


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # share 0.5 of 24 clips = 12 broken, so every one of the 6 codes appears at least once
    return make_tiny_corpus(tmp_path_factory.mktemp("broken"), n=24, seed=12, breakage_share=0.5)


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path) -> None:
    make_tiny_corpus(tmp_path / "a", n=12, seed=5, breakage_share=0.5)
    make_tiny_corpus(tmp_path / "b", n=12, seed=5, breakage_share=0.5, workers=2)
    make_tiny_corpus(tmp_path / "c", n=12, seed=6, breakage_share=0.5)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert any(name.endswith(".mp4") for name in a)
    changed = [k for k in a if k in c and a[k] != c[k] and k.startswith(("audio/", "video/", "text/"))]
    assert len(changed) >= len([k for k in a if k.startswith("audio/")])


def test_listing_columns_and_relative_paths(clean: Path) -> None:
    table = pq.read_table(clean).to_pandas()
    for col in ("utterance_id", "session", "speaker", "dialogue", "turn", "label", "audio_path", "video_path", "text_path", "domain",
                "gt_broken_modality", "gt_breakage", "gt_face_intensity", "gt_audio_intensity", "gt_snr_db"):
        assert col in table.columns, col
    assert table.utterance_id.is_unique
    assert set(table.label) == {"neutral", "happy", "sad", "angry"}
    assert table.label.value_counts().max() - table.label.value_counts().min() <= 1 * table.speaker.nunique()
    assert set(table.domain) == {"source"}
    assert table.gt_breakage.isna().all()
    for _, row in table.iterrows():
        assert row.utterance_id.startswith(row.speaker + "_") and row.speaker.startswith(row.session + "_")
        for col in ("audio_path", "video_path", "text_path"):
            assert not Path(row[col]).is_absolute()
            assert (clean.parent / row[col]).is_file()


def test_audio_is_real_16k_mono_with_planned_duration(clean: Path) -> None:
    table = pq.read_table(clean).to_pandas()
    for _, row in table.iterrows():
        samples, sr = sf.read(clean.parent / row.audio_path, dtype="float32")
        assert sr == 16000 and samples.ndim == 1
        assert abs(len(samples) / sr - row.gt_duration_s) < 1e-3
        assert 1.5 - 1e-6 <= len(samples) / sr <= 4.0
        assert np.sqrt(np.mean(samples**2)) > 1e-3  # not silent


def test_video_frames_128_and_haar_finds_the_face(clean: Path) -> None:
    table = pq.read_table(clean).to_pandas()
    found = total = 0
    for _, row in table.iterrows():
        frames = _read_frames(clean.parent / row.video_path)
        assert abs(len(frames) - row.gt_duration_s * 12) <= 1
        assert frames[0].shape == (128, 128, 3)
        for frame in frames[::4]:
            grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            found += len(CASCADE.detectMultiScale(grey, 1.1, 3, minSize=(30, 30))) > 0
            total += 1
    assert found / total > 0.85


def test_text_is_utf8_sentence(clean: Path) -> None:
    table = pq.read_table(clean).to_pandas()
    texts = [(clean.parent / p).read_text(encoding="utf-8") for p in table.text_path]
    assert all(t.strip() and t.strip()[-1] in ".!" for t in texts)
    assert set(table.gt_text_kind) <= {"cue", "plain", "misleading"}


def test_every_breakage_appears_and_really_breaks(broken: Path) -> None:
    root = broken.parent
    table = pq.read_table(broken).to_pandas()
    bad = table[table.gt_breakage.notna()]
    assert set(bad.gt_breakage) == set(CODES)
    assert (table.gt_breakage.isna() == table.gt_broken_modality.isna()).all()
    for _, row in bad.iterrows():
        code = row.gt_breakage
        assert code.split("_")[0] == row.gt_broken_modality
        if code == "video_absent":
            assert pd.isna(row.video_path) and not (root / "video" / f"{row.utterance_id}.mp4").exists()
        elif code == "video_black":
            frames = _read_frames(root / row.video_path)
            assert frames and max(float(f.max()) for f in frames) < 8
        elif code == "audio_silent":
            samples, _ = sf.read(root / row.audio_path)
            assert np.abs(samples).max() < 1e-3
        elif code == "audio_truncated":
            declared, present = wav_data_sizes(root / row.audio_path)
            assert present < declared
            samples, sr = sf.read(root / row.audio_path)
            assert len(samples) / sr < row.gt_duration_s - 0.1  # decodes only a part
        elif code == "audio_corrupt":
            with pytest.raises(sf.LibsndfileError):
                sf.read(root / row.audio_path)
        elif code == "text_empty":
            assert (root / row.text_path).read_text(encoding="utf-8").strip() == ""
        # the other two modalities of a broken clip stay intact
        if row.gt_broken_modality != "text":
            assert (root / row.text_path).read_text(encoding="utf-8").strip()
        if row.gt_broken_modality != "audio":
            assert sf.info(str(root / row.audio_path)).frames > 0


def test_shifted_domain_has_new_speakers(tmp_path: Path) -> None:
    listing = make_tiny_corpus(tmp_path, n=16, seed=3, shifted_domain=True)
    table = pq.read_table(listing).to_pandas()
    source = set(table[table.domain == "source"].speaker)
    shifted = set(table[table.domain == "shifted"].speaker)
    assert shifted and source and not (source & shifted)
    assert set(table[table.domain == "shifted"].label) == set(table.label)
    snr = table.groupby("domain").gt_snr_db.mean()
    assert snr["shifted"] < snr["source"]


def test_killed_run_leaves_no_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = make_tiny_corpus(tmp_path, n=8, seed=1)
    assert listing.exists()
    import pipeline.corpus.generate as gen

    calls = {"n": 0}
    real = gen.render_utterance

    def dies_midway(task):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(gen, "render_utterance", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(tiny_config(n=8, seed=2), tmp_path, progress=False)
    assert not listing.exists()
    assert not list(tmp_path.rglob(".*.tmp")) and not list(tmp_path.rglob(".*.mp4"))


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(KeyError, match="typo_key"):
        CorpusConfig.from_dict({"typo_key": 1})
    with pytest.raises(ValueError, match="breakage_share"):
        CorpusConfig.from_dict({"breakage_share": 1.5})


# --- profiles -------------------------------------------------------------------------------
# make_tiny_corpus(n=8, seed=5, breakage_share=0.25), generated before profiles existed (and
# before dialogues: its listing then hashed, with the media, to 0d8fd02e...): the balanced
# profile at inertia 0 must keep every media byte and every listing value; dialogues only add
# the `dialogue` and `turn` columns. Media: sha256 over the per-file sha256 of the media files;
# listing: sha256 of the rows' JSON over the listing columns that existed then.
BALANCED_TINY_DIGEST = "ed4c7b38c58bd78ef9d5daac4278c1f86ab74f050f78c20849f6e22b37750311"
BALANCED_TINY_LISTING_DIGEST = "a797f1d0fe4649a850699b13df26ad74ae055e194469ecbcf1ec8e310a0f9f86"
NEW_LISTING_COLUMNS = ("dialogue", "turn")


def _media_digest(folder: Path) -> str:
    files = {k: v for k, v in _digest(folder).items() if k.startswith(("audio/", "video/", "text/"))}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _listing_digest(folder: Path) -> str:
    table = pq.read_table(folder / "listing.parquet")
    rows = table.select([c for c in table.column_names if c not in NEW_LISTING_COLUMNS]).to_pylist()
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def test_balanced_profile_keeps_the_bytes(tmp_path: Path) -> None:
    make_tiny_corpus(tmp_path / "b", n=8, seed=5, breakage_share=0.25, profile="balanced")
    assert _media_digest(tmp_path / "b") == BALANCED_TINY_DIGEST
    assert _listing_digest(tmp_path / "b") == BALANCED_TINY_LISTING_DIGEST
    recorded = json.loads((tmp_path / "b" / "corpus.json").read_text())
    assert recorded["config"]["profile"] == "balanced" and recorded["profile_overrides"] == {}


def test_realistic_profile_changes_the_media(tmp_path: Path) -> None:
    make_tiny_corpus(tmp_path / "r", n=8, seed=5, breakage_share=0.25, profile="realistic")
    assert _media_digest(tmp_path / "r") != BALANCED_TINY_DIGEST
    recorded = json.loads((tmp_path / "r" / "corpus.json").read_text())
    assert recorded["config"]["profile"] == "realistic" and recorded["profile_overrides"] == {}
    assert recorded["config"]["text_cue_share"] == PROFILES["realistic"]["text_cue_share"]


def test_profile_supplies_null_knobs_and_explicit_values_win() -> None:
    real = CorpusConfig.from_dict({"profile": "realistic", "video_noise_std": None, "face_jitter": 0.2})
    for knob in KNOBS:
        expected = 0.2 if knob == "face_jitter" else PROFILES["realistic"][knob]
        assert getattr(real, knob) == expected, knob
    assert real.overrides() == {"face_jitter": 0.2}
    assert CorpusConfig.from_dict(real.to_dict()) == real  # workers rebuild the same config
    assert CorpusConfig() == CorpusConfig(profile=DEFAULT_PROFILE, **PROFILES[DEFAULT_PROFILE])
    assert CorpusConfig().profile == load_params("corpus")["profile"]  # dataclass and params.yaml agree
    assert CorpusConfig(profile="realistic", utterances=50).utterances == 50  # other knobs compose
    with pytest.raises(ValueError, match="corpus.profile"):
        CorpusConfig.from_dict({"profile": "exotic"})


def test_params_yaml_leaves_profile_knobs_null_and_shows_their_values() -> None:
    """params.yaml: each knob is null (the profile decides) with a `balanced | realistic` comment that is true."""
    lines = Path("params.yaml").read_text().splitlines()
    section = load_params("corpus")
    assert section["profile"] in PROFILES
    for knob in KNOBS:
        assert section.get(knob) is None, f"{knob} is set in params.yaml: it would hide the profile's value"
        line = next(l for l in lines if l.strip().startswith(f"{knob}:"))
        shown = [yaml.safe_load(part.strip().split("  ")[0]) for part in line.split("#", 1)[1].split("|")]
        for name, value in zip(("balanced", "realistic"), shown):
            want = PROFILES[name][knob]
            assert (list(map(float, value)) if isinstance(value, list) else float(value)) == (
                list(map(float, want)) if isinstance(want, tuple) else float(want)), (knob, name)


def _calibration_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_corpus", Path("benchmarks/calibrate_corpus.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.slow
def test_realistic_profile_orders_the_modalities(tmp_path: Path) -> None:
    """Linear probe, leave-one-session-out (speaker independent), cheap features: text > audio > video."""
    from sklearn.feature_extraction.text import CountVectorizer

    calib = _calibration_module()
    listing = make_tiny_corpus(tmp_path, n=160, seed=21, profile="realistic", sessions=4, max_duration_s=2.5)
    table = pq.read_table(listing).to_pandas()
    y, sessions = table.label.to_numpy(), table.session.to_numpy()
    texts = [(tmp_path / p).read_text(encoding="utf-8") for p in table.text_path]
    feats = {
        "t": CountVectorizer(binary=True).fit_transform(texts).toarray().astype(float),  # (N, vocabulary)
        "a": calib.audio_features([tmp_path / p for p in table.audio_path]),  # (N, 88) eGeMAPS functionals
        "v": calib.video_features([tmp_path / p for p in table.video_path], n_frames=4)[0],  # (N, HOG)
    }
    acc = {m: calib.probe(x, y, sessions)[0] for m, x in feats.items()}
    print("probe accuracy", {m: round(v, 3) for m, v in acc.items()})
    assert acc["t"] > acc["a"] + 0.04 and acc["a"] > acc["v"] + 0.04, acc
    assert acc["v"] > 0.25 + 0.03, acc  # weakest, but above chance: video still carries emotion
