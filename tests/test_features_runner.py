"""The extraction stage engine: no clip lost, caching, failure threshold, kill safety, workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from features.runner import ClipJob, ExtractionFailed, ExtractorSpec, extract_chunk, run_extraction
from pipeline.formats.feature_table import read_feature_table
from tests.media_factory import bad_audio, good_clips, make_manifest

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"feature_set": "eGeMAPSv02", "segments": 8}


def _run(tmp: Path, manifest: Path, **kw) -> dict:
    kw.setdefault("workers", 1)
    kw.setdefault("max_failure_share", 0.9)
    kw.setdefault("progress", False)
    return run_extraction("acoustic", manifest, tmp / "features" / "acoustic.arrow", tmp / "cache", kw.pop("config", CONFIG), **kw)


@pytest.fixture()
def mixed_manifest(tmp_path) -> tuple[Path, dict[str, str | None]]:
    """Good clips, every bad-audio case, a manifest-declared gap, a null path and an absent file."""
    rows = good_clips(tmp_path / "media", 4, modalities=("audio",))
    expected: dict[str, str | None] = {r["utterance_id"]: None for r in rows}
    for name, (path, reason) in bad_audio(tmp_path / "bad").items():
        rows.append({"utterance_id": f"bad_{name}", "audio_path": str(path)})
        expected[f"bad_{name}"] = reason
    rows.append({"utterance_id": "declared", "audio_missing": "not_recorded"})
    rows.append({"utterance_id": "nopath"})
    rows.append({"utterance_id": "gone", "audio_path": str(tmp_path / "nowhere.wav")})
    expected.update(declared="not_recorded", nopath="no_path", gone="file_absent")
    return make_manifest(tmp_path / "manifest.parquet", rows), expected


def test_every_manifest_row_gets_a_row_with_the_right_reason(tmp_path, mixed_manifest):
    manifest, expected = mixed_manifest
    summary = _run(tmp_path, manifest)
    table = read_feature_table(tmp_path / "features" / "acoustic.arrow")
    assert list(table.utterance_id) == list(expected)  # manifest order, nothing lost
    for uid, reason, present, length in zip(table.utterance_id, table.failure_reason, table.present, table.length):
        assert reason == expected[uid], uid
        assert present == (reason is None) and (length > 0) == present
    missing = ~table.present
    assert np.all(table.sequence[missing] == 0) and np.all(table.summary[missing] == 0)
    assert np.isfinite(table.sequence).all()
    # absent-by-design rows are not extractor failures
    n_bad = sum(1 for r in expected.values() if r not in (None, "not_recorded", "no_path", "file_absent"))
    assert summary["n_extraction_failures"] == n_bad
    assert summary["failure_share"] == pytest.approx(n_bad / (len(expected) - 3))
    assert table.meta["feature_names"][0].endswith("_mean") and table.meta["sequence_shape"] == [8, 50]
    assert table.meta["extractor"]["feature_set"] == "eGeMAPSv02"
    report = json.loads((tmp_path / "features" / "acoustic.failures.json").read_text())
    assert {c["utterance_id"]: c["reason"] for c in report["clips"]} == {u: r for u, r in expected.items() if r}


def test_cache_extracts_only_new_clips_and_all_after_config_change(tmp_path):
    rows = good_clips(tmp_path / "media", 6, modalities=("audio",))
    first = make_manifest(tmp_path / "m1.parquet", rows[:4])
    assert _run(tmp_path, first)["cache_misses"] == 4
    again = _run(tmp_path, first)
    assert (again["cache_hits"], again["cache_misses"]) == (4, 0)
    grown = make_manifest(tmp_path / "m2.parquet", rows)
    assert _run(tmp_path, grown)["cache_misses"] == 2
    changed = _run(tmp_path, grown, config={**CONFIG, "segments": 4})
    assert changed["cache_misses"] == 6
    assert read_feature_table(tmp_path / "features" / "acoustic.arrow").sequence.shape == (6, 4, 50)


def test_a_run_of_cache_hits_never_loads_the_model(tmp_path, monkeypatch):
    """Re-running with nothing new (e.g. a scheduled ingest) skips the 6 s MiniLM load."""
    from features import workers

    rows = good_clips(tmp_path / "media", 3, modalities=("text",))
    manifest = make_manifest(tmp_path / "m.parquet", rows)
    out, cache = tmp_path / "features" / "textual.arrow", tmp_path / "cache"
    first = run_extraction("textual", manifest, out, cache, {}, workers=1, max_failure_share=0.9, progress=False)
    assert first["cache_misses"] == 3
    monkeypatch.setattr(workers, "_WORKER_EXTRACTORS", {})  # as in a fresh process
    again = run_extraction("textual", manifest, out, cache, {}, workers=1, max_failure_share=0.9, progress=False)
    assert (again["cache_hits"], again["cache_misses"], again["setup_s"]) == (3, 0, 0.0)
    assert not any(ext._ready for ext in workers._WORKER_EXTRACTORS.values())


def test_deterministic_failures_are_cached_unexpected_errors_are_not(tmp_path):
    files = bad_audio(tmp_path / "bad")
    cache = tmp_path / "cache"
    spec = ExtractorSpec("acoustic", CONFIG, threads=None)
    silent = ClipJob("s", str(files["silent"][0]), "h_silent")
    vanished = ClipJob("v", str(tmp_path / "vanished.wav"), "h_vanished")  # deleted after planning
    outs = extract_chunk(spec, [silent, vanished], str(cache))
    assert [o.failure_reason for o in outs] == ["silent_audio", "file_absent"]  # an OS-level failure is named, not cached
    assert str(tmp_path / "vanished.wav") in outs[1].message
    cached = {p.stem for p in cache.rglob("*.npz")}
    assert cached == {"h_silent"}
    again = extract_chunk(spec, [silent], str(cache))[0]
    assert again.cache_hit and again.failure_reason == "silent_audio" and str(files["silent"][0]) in again.message


def test_failure_share_above_limit_raises_after_writing_report(tmp_path, mixed_manifest):
    manifest, _ = mixed_manifest
    out = tmp_path / "features" / "acoustic.arrow"
    with pytest.raises(ExtractionFailed, match=r"max_failure_share.*silent_audio=1") as info:
        _run(tmp_path, manifest, max_failure_share=0.1)
    assert "unreadable_audio=2" in str(info.value)
    assert not out.exists()  # a failed stage never replaces the table
    assert (tmp_path / "features" / "acoustic.failures.json").exists()


def test_two_workers_and_one_give_identical_tables(tmp_path, mixed_manifest):
    manifest, _ = mixed_manifest
    tables = []
    for workers in (1, 2):
        sub = tmp_path / f"w{workers}"
        _run(sub, manifest, workers=workers, chunk_size=3)
        tables.append(read_feature_table(sub / "features" / "acoustic.arrow"))
    a, b = tables
    assert list(a.utterance_id) == list(b.utterance_id)
    assert a.failure_reason == b.failure_reason
    np.testing.assert_array_equal(a.sequence, b.sequence)
    np.testing.assert_array_equal(a.summary, b.summary)
    np.testing.assert_array_equal(a.length, b.length)


def test_sigkill_mid_run_keeps_old_table_and_rerun_completes(tmp_path):
    rows = good_clips(tmp_path / "media", 60, modalities=("audio",))
    make_manifest(tmp_path / "data" / "manifest.parquet", rows[:3])
    params = {"extract_acoustic": {**CONFIG, "workers": 1, "chunk_size": 2, "max_failure_share": 0.2, "progress": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "features.stage_acoustic"]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    table_path = tmp_path / "data" / "features" / "acoustic.arrow"
    old = read_feature_table(table_path, memory_map=False)
    assert len(old) == 3

    make_manifest(tmp_path / "data" / "manifest.parquet", rows)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / "data" / "cache" / "acoustic"
    deadline = time.monotonic() + 120
    while len(list(cache.rglob("*.npz"))) < 9 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    n_cached = len(list(cache.rglob("*.npz")))
    assert 9 <= n_cached < 60

    survived = read_feature_table(table_path, memory_map=False)
    assert list(survived.utterance_id) == list(old.utterance_id)
    np.testing.assert_array_equal(survived.sequence, old.sequence)

    done = subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    summary = json.loads(done.stdout)
    assert summary["cache_hits"] == n_cached  # entries are renamed into place whole: none is half-written
    assert summary["cache_misses"] == 60 - summary["cache_hits"]
    table = read_feature_table(table_path)
    assert len(table) == 60 and table.present.all()


def test_unknown_config_key_is_rejected_by_name(tmp_path, mixed_manifest):
    manifest, _ = mixed_manifest
    with pytest.raises(ValueError, match="segmnets"):
        _run(tmp_path, manifest, config={"segmnets": 4})
