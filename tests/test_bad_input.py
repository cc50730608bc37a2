"""Hostile inputs: every per-path OS failure, empty-looking inputs, odd WAVs, huge texts, file modes.

Each test builds real files (symlink loops, directories, mode-000 files read by a
real unprivileged process) and runs the real stage code on them.
"""
from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from features.acoustic import AcousticExtractor
from features.base import ClipError
from features.runner import run_extraction
from pipeline.core.atomic import atomic_path, current_umask
from pipeline.formats.feature_table import read_feature_table
from pipeline.formats.manifest import read_manifest
from pipeline.ingest import ingest
from tests.media_factory import good_clips, make_manifest, write_text, write_wav

REPO = Path(__file__).resolve().parents[1]
ACOUSTIC = {"segments": 8}
HEADER = "utterance_id,session,speaker,label,audio_path,video_path,text_path"


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _hostile_paths(root: Path) -> dict[str, Path]:
    """A symlink loop, a directory, a link to a good file, an absent path."""
    root.mkdir(parents=True, exist_ok=True)
    good = write_wav(root / "good.wav", duration_s=1.0, seed=1)
    (root / "loop_a.wav").symlink_to(root / "loop_b.wav")
    (root / "loop_b.wav").symlink_to(root / "loop_a.wav")
    (root / "a_dir.wav").mkdir()
    (root / "link.wav").symlink_to(good)
    return {"good": good, "loop": root / "loop_a.wav", "dir": root / "a_dir.wav", "link": root / "link.wav", "absent": root / "nowhere.wav"}


def test_ingest_names_loops_and_directories_and_keeps_the_listed_link(tmp_path):
    paths = _hostile_paths(tmp_path / "clips")
    rows = [f"{n},S1,spk1,happy,clips/{p.name},," for n, p in paths.items()]
    report = ingest(_csv(tmp_path / "listing.csv", [HEADER, *rows]), tmp_path / "m.parquet", project_root=tmp_path)
    table = {r["utterance_id"]: r for r in read_manifest(tmp_path / "m.parquet")[0].to_pylist()}
    assert report.utterances == 5  # a symlink loop no longer crashes ingest
    assert {u: r["audio_missing"] for u, r in table.items()} == {
        "good": None, "loop": "symlink_loop", "dir": "not_a_file", "link": None, "absent": "file_absent",
    }
    assert table["link"]["audio_path"] == "clips/link.wav"  # the listed path, not the link's target
    assert report.missing_reasons["audio"] == {"file_absent": 1, "not_a_file": 1, "symlink_loop": 1}


def test_extraction_routes_path_failures_to_missing_clips(tmp_path):
    paths = _hostile_paths(tmp_path / "clips")
    manifest = make_manifest(tmp_path / "m.parquet", [{"utterance_id": n, "audio_path": str(p)} for n, p in paths.items()])
    summary = run_extraction("acoustic", manifest, tmp_path / "f" / "acoustic.arrow", tmp_path / "cache", ACOUSTIC, workers=1, max_failure_share=0.0, progress=False)
    table = read_feature_table(tmp_path / "f" / "acoustic.arrow")
    got = dict(zip(table.utterance_id, table.failure_reason))
    assert got == {"good": None, "loop": "symlink_loop", "dir": "not_a_file", "link": None, "absent": "file_absent"}
    assert summary["n_extraction_failures"] == 0  # no file behind these paths: missing data, not failures


def test_ragged_csv_row_is_named_by_file_line_and_data_row(tmp_path):
    write_wav(tmp_path / "clips" / "u.wav", duration_s=0.5)
    lines = [HEADER] + [f"u{i},S1,spk1,happy,clips/u.wav,," for i in range(1, 6)]
    lines.insert(3, "")  # a blank line: editors count it, the parser skips it
    lines[6] = "u5,S1,spk1,happy"  # ragged: 4 of 7 fields, on file line 7 = data row 5
    listing = _csv(tmp_path / "listing.csv", lines)
    with pytest.raises(ValueError) as err:
        ingest(listing, tmp_path / "m.parquet", project_root=tmp_path)
    assert "line 7, data row 5, column '(whole row)': expected 7 fields, got 4" in str(err.value)
    report = ingest(listing, tmp_path / "m.parquet", on_bad_row="skip", project_root=tmp_path)
    assert report.utterances == 4 and [str(p) for p in report.rejected] == ["line 7, data row 5, column '(whole row)': expected 7 fields, got 4"]
    bad = _csv(tmp_path / "bad.csv", [HEADER, "u1,S1,spk1,happy,clips/u.wav,,", "", "u2,S1,,happy,clips/u.wav,,"])
    with pytest.raises(ValueError, match=r"line 4, data row 2, column 'speaker': empty"):
        ingest(bad, tmp_path / "m2.parquet", project_root=tmp_path)


SETPRIV = shutil.which("setpriv")
NO_READ_OVERRIDE = [SETPRIV or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to drop the read override")
def test_unreadable_files_without_the_read_override_are_permission_denied(tmp_path):
    """Real stage processes that may not read what they are given: a mode-000 file, a file in a mode-000 dir.

    Root reads through mode 000, so the stages run as root with the read override
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped from the bounding set, as a
    normal user's process would: the kernel then refuses the reads for real.
    """
    rows = good_clips(tmp_path / "media", 3, modalities=("audio",))
    locked = write_wav(tmp_path / "media" / "locked.wav", seed=9)
    hidden = write_wav(tmp_path / "media" / "closed" / "hidden.wav", seed=8)
    rows += [{"utterance_id": "locked", "audio_path": str(locked)}, {"utterance_id": "hidden", "audio_path": str(hidden)}]
    make_manifest(tmp_path / "data" / "manifest.parquet", rows)
    _csv(tmp_path / "listing.csv", [HEADER] + [f"{r['utterance_id']},S1,spk1,happy,{r['audio_path']},," for r in rows])
    params = {
        "extract_acoustic": {**ACOUSTIC, "workers": 1, "progress": False, "max_failure_share": 0.5},
        "ingest": {"listing": "listing.csv", "out": "data/ingested.parquet", "classes": ["happy"]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    locked.chmod(0)
    hidden.parent.chmod(0)
    expected = {"u0000": None, "u0001": None, "u0002": None, "locked": "permission_denied", "hidden": "permission_denied"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    try:
        run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 300}
        ingested = subprocess.run([*NO_READ_OVERRIDE, sys.executable, "-m", "pipeline.ingest"], **run)
        assert ingested.returncode == 0, ingested.stderr[-2000:]
        manifest = read_manifest(tmp_path / "data" / "ingested.parquet")[0].to_pylist()
        assert {r["utterance_id"]: r["audio_missing"] for r in manifest} == expected
        extracted = subprocess.run([*NO_READ_OVERRIDE, sys.executable, "-m", "features.stage_acoustic"], **run)
        assert extracted.returncode == 0, extracted.stderr[-2000:]
    finally:
        hidden.parent.chmod(0o755)  # let the cleanup in
    table = read_feature_table(tmp_path / "data" / "features" / "acoustic.arrow")
    assert dict(zip(table.utterance_id, table.failure_reason)) == expected
    assert "permission_denied=2" not in extracted.stderr  # 2 of 5 < 0.5: the stage went on


def test_dc_offset_without_signal_is_silent(tmp_path):
    ext = AcousticExtractor(ACOUSTIC)
    dc = tmp_path / "dc.wav"
    sf.write(str(dc), np.full(16000, 0.4, np.float32) + 1e-5 * np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000)
    with pytest.raises(ClipError) as err:
        ext.extract(dc)
    assert err.value.reason == "silent_audio" and "without DC offset" in str(err.value)
    speech_on_dc = tmp_path / "speech_dc.wav"  # real signal riding on an offset still counts
    sig, rate = sf.read(str(write_wav(tmp_path / "s.wav", duration_s=1.0)), dtype="float32")
    sf.write(str(speech_on_dc), sig + 0.3, rate)
    assert ext.extract(speech_on_dc).length > 0


def _zero_data_length(src: Path, dst: Path) -> Path:
    """Copy a WAV as a streaming writer leaves it: RIFF and data lengths 0, samples present."""
    blob = bytearray(src.read_bytes())
    at = blob.index(b"data")
    struct.pack_into("<I", blob, at + 4, 0)
    struct.pack_into("<I", blob, 4, 0)
    dst.write_bytes(bytes(blob))
    return dst


def test_wav_with_zero_data_length_but_samples_is_read(tmp_path):
    ext = AcousticExtractor(ACOUSTIC)
    good = write_wav(tmp_path / "good.wav", duration_s=1.0, seed=2)
    streamed = _zero_data_length(good, tmp_path / "streamed.wav")
    a, b = ext.extract(good), ext.extract(streamed)
    np.testing.assert_array_equal(a.sequence, b.sequence)
    np.testing.assert_array_equal(a.summary, b.summary)
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(streamed.read_bytes()[: streamed.read_bytes().index(b"data") + 8])
    with pytest.raises(ClipError, match="no audio samples"):
        ext.extract(header_only)


@pytest.fixture(scope="module")
def text_ext():
    from features.textual import TextualExtractor

    ext = TextualExtractor({"max_tokens": 16})
    ext.ensure_setup()
    return ext


def test_transcript_without_a_real_token_is_empty_text(tmp_path, text_ext):
    nul = write_text(tmp_path / "nul.txt", b"\x00\x00\x00\x01\x02")
    ok = write_text(tmp_path / "ok.txt", "Hello there.")
    res_nul, res_ok = text_ext.extract_many([nul, ok])
    assert isinstance(res_nul, ClipError) and res_nul.reason == "empty_text" and str(nul) in str(res_nul)
    assert not isinstance(res_ok, Exception) and res_ok.length > 2


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (the kernel's count, /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_huge_transcript_reads_only_what_the_encoder_uses(tmp_path, text_ext):
    small = write_text(tmp_path / "small.txt", "I miss her so much, the house feels empty. " * 20)
    huge = write_text(tmp_path / "huge.txt", small.read_text() + "filler words " * 420_000)  # ~5.5 MB
    assert huge.stat().st_size > 5_000_000
    read_before = _bytes_read()
    res_huge = text_ext.extract(huge)
    read = _bytes_read() - read_before
    res_small = text_ext.extract(small)
    assert read < 200_000, f"read {read} bytes of a {huge.stat().st_size}-byte transcript"  # the budget is 64 KiB
    assert res_huge.extras == {"truncated_text": 1.0} and res_small.extras == {}
    np.testing.assert_allclose(res_huge.sequence, res_small.sequence, atol=1e-5)  # the first 16 tokens are the same text
    manifest = make_manifest(tmp_path / "m.parquet", [{"utterance_id": "small", "text_path": str(small)}, {"utterance_id": "huge", "text_path": str(huge)}])
    summary = run_extraction("textual", manifest, tmp_path / "f" / "textual.arrow", None, {"max_tokens": 16}, workers=1, progress=False)
    table = read_feature_table(tmp_path / "f" / "textual.arrow")
    assert table.present.all() and table.meta["notes"] == {"truncated_text": 1} and summary["notes"] == {"truncated_text": 1}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o002)
    try:
        assert current_umask() == 0o002
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("{}")
        assert _mode(tmp_path / "x.json") == 0o664
        manifest = make_manifest(tmp_path / "m.parquet", good_clips(tmp_path / "media", 2, modalities=("audio",)))
        run_extraction("acoustic", manifest, tmp_path / "f" / "acoustic.arrow", tmp_path / "cache", ACOUSTIC, workers=1, progress=False)
    finally:
        os.umask(old)
    outputs = [tmp_path / "m.parquet", tmp_path / "f" / "acoustic.arrow", tmp_path / "f" / "acoustic.failures.json", *tmp_path.glob("cache/*/*.npz")]
    assert len(outputs) == 5
    assert {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in outputs} == {str(p.relative_to(tmp_path)): "0o664" for p in outputs}
