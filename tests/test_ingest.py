"""Ingest: a user listing becomes a manifest; bad rows are named, absent files become missingness."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.ingest import ingest
from pipeline.formats.manifest import read_manifest

CLASSES = ["neutral", "happy", "sad", "angry"]


def _media(root: Path) -> None:
    (root / "clips").mkdir(parents=True)
    sf.write(root / "clips" / "u1.wav", np.zeros(1600, dtype=np.float32), 16000)
    (root / "clips" / "u1.txt").write_text("hello there", encoding="utf-8")
    (root / "clips" / "u2.txt").write_text("fine", encoding="utf-8")


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


HEADER = "utterance_id,session,speaker,label,audio_path,video_path,text_path"


def test_listing_to_manifest_marks_absent_and_unlisted_media(tmp_path: Path) -> None:
    _media(tmp_path)
    listing = _csv(tmp_path / "listing.csv", [HEADER, "007,S1,spk1,happy,clips/u1.wav,clips/u1.mp4,clips/u1.txt", "u2,S1,spk2,sad,,,clips/u2.txt"])
    report = ingest(listing, tmp_path / "out" / "manifest.parquet", classes=CLASSES, project_root=tmp_path)
    table, meta = read_manifest(tmp_path / "out" / "manifest.parquet")
    rows = table.to_pylist()
    assert report.utterances == 2 and meta["classes"] == CLASSES and meta["task"] == "classification"
    assert rows[0]["utterance_id"] == "007"  # ids stay strings
    assert rows[0]["audio_path"] == "clips/u1.wav" and rows[0]["audio_missing"] is None
    assert rows[0]["video_missing"] == "file_absent"  # listed but not on disk: real missingness
    assert rows[1]["audio_missing"] == "no_path" and rows[1]["text_missing"] is None
    assert report.missing == {"audio": 1, "text": 0, "video": 2}


def test_bad_rows_are_named_by_row_and_column(tmp_path: Path) -> None:
    _media(tmp_path)
    listing = _csv(tmp_path / "listing.csv", [HEADER, "u1,S1,,happy,clips/u1.wav,,", "u1,S1,spk1,joyful,clips/u1.wav,,", "u3,S1,spk1,sad,,,"])
    with pytest.raises(ValueError) as err:
        ingest(listing, tmp_path / "m.parquet", classes=CLASSES, project_root=tmp_path)
    message = str(err.value)
    assert "listing.csv" in message
    assert "row 1, column 'speaker': empty" in message
    assert "row 2, column 'utterance_id': duplicate id 'u1'" in message
    assert "row 2, column 'label': 'joyful'" in message
    assert "row 3, column 'audio_path/text_path/video_path'" in message
    assert not (tmp_path / "m.parquet").exists()


def test_skip_mode_keeps_valid_rows_and_reports_rejected(tmp_path: Path) -> None:
    _media(tmp_path)
    listing = _csv(tmp_path / "listing.csv", [HEADER, "u1,S1,spk1,happy,clips/u1.wav,,", "u2,S1,spk1,bored,,,clips/u2.txt"])
    report = ingest(listing, tmp_path / "m.parquet", classes=CLASSES, on_bad_row="skip", project_root=tmp_path)
    assert report.utterances == 1 and len(report.rejected) == 1 and report.rejected[0].column == "label"


def test_missing_required_column_is_named(tmp_path: Path) -> None:
    listing = _csv(tmp_path / "listing.csv", ["utterance_id,session,label,text_path", "u1,S1,happy,a.txt"])
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['speaker'\]"):
        ingest(listing, tmp_path / "m.parquet", project_root=tmp_path)


def test_regression_listing_requires_numeric_scores(tmp_path: Path) -> None:
    _media(tmp_path)
    header = "utterance_id,session,speaker,score,text_path"
    good = _csv(tmp_path / "good.csv", [header, "v1,S1,a,-1.5,clips/u1.txt", "v2,S1,b,2.0,clips/u2.txt"])
    ingest(good, tmp_path / "m.parquet", task="regression", project_root=tmp_path)
    table, meta = read_manifest(tmp_path / "m.parquet")
    assert meta["task"] == "regression" and table.column("score").to_pylist() == [-1.5, 2.0]
    bad = _csv(tmp_path / "bad.csv", [header, "v1,S1,a,very positive,clips/u1.txt"])
    with pytest.raises(ValueError, match=r"row 1, column 'score': 'very positive' is not a number"):
        ingest(bad, tmp_path / "m2.parquet", task="regression", project_root=tmp_path)


def test_unknown_listing_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ingest(tmp_path / "nope.csv", tmp_path / "m.parquet")
    (tmp_path / "listing.json").write_text("{}")
    with pytest.raises(ValueError, match="must be .csv, .tsv or .parquet"):
        ingest(tmp_path / "listing.json", tmp_path / "m.parquet")
