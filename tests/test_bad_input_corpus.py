"""The bad-input corpus end to end: a listing full of hostile rows -> ingest -> all three extractions.

Nothing may crash a stage; every row reaches the manifest and every table; each bad
input ends as its modality missing with the reason a user can act on. Run with `-s`
to see the counts table.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from features.runner import run_extraction
from pipeline.formats.feature_table import read_feature_table
from pipeline.formats.manifest import read_manifest
from pipeline.ingest import ingest
from tests.media_factory import bad_audio, bad_text, bad_video, good_clips, write_text, write_wav

COLUMN = {"audio": "audio_path", "video": "video_path", "text": "text_path"}
TABLE = {"audio": "acoustic", "video": "visual", "text": "textual"}
CONFIGS = {"acoustic": {"segments": 8}, "visual": {"segments": 4, "max_frames": 8}, "textual": {"max_tokens": 16}}


def _extra_bad(root: Path) -> dict[str, dict[str, tuple[Path, str | None]]]:
    """Inputs the probe found slipping through, plus path-level hostiles for each modality."""
    root.mkdir(parents=True, exist_ok=True)
    dc = root / "dc.wav"
    sf.write(str(dc), np.full(16000, 0.4, np.float32), 16000)
    streamed = bytearray(write_wav(root / "full.wav", duration_s=1.0, seed=7).read_bytes())
    struct.pack_into("<I", streamed, streamed.index(b"data") + 4, 0)
    (root / "streamed.wav").write_bytes(bytes(streamed))
    out = {
        "audio": {"dc": (dc, "silent_audio"), "streamed": (root / "streamed.wav", None)},
        "video": {},
        "text": {
            "nul": (write_text(root / "nul.txt", b"\x00\x00\x00"), "empty_text"),
            "huge": (write_text(root / "huge.txt", "so many words " * 400_000), None),
        },
    }
    good = {"audio": root / "full.wav", "video": None, "text": root / "nul.txt"}
    for modality, suffix in (("audio", ".wav"), ("video", ".mp4"), ("text", ".txt")):
        d = root / modality
        d.mkdir()
        (d / f"loop_a{suffix}").symlink_to(d / f"loop_b{suffix}")
        (d / f"loop_b{suffix}").symlink_to(d / f"loop_a{suffix}")
        (d / f"dir{suffix}").mkdir()
        out[modality].update({
            "loop": (d / f"loop_a{suffix}", "symlink_loop"),
            "dir": (d / f"dir{suffix}", "not_a_file"),
            "absent": (d / f"absent{suffix}", "file_absent"),
        })
        if good[modality] is not None:
            (d / f"link{suffix}").symlink_to(good[modality])
            out[modality]["link"] = (d / f"link{suffix}", None if modality == "audio" else "empty_text")
    return out


@pytest.mark.slow  # ~15 s: three real extractions over 35 hostile rows
def test_bad_input_corpus_never_crashes_a_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # manifest paths are project-relative, as in a real run
    rows = good_clips(tmp_path / "good", 4)
    listing = ["utterance_id,session,speaker,label,audio_path,video_path,text_path"]
    expected: dict[str, dict[str, str | None]] = {m: {} for m in COLUMN}
    for r in rows:
        listing.append(f"{r['utterance_id']},S1,spk1,happy,{r['audio_path']},{r['video_path']},{r['text_path']}")
        for m in COLUMN:
            expected[m][r["utterance_id"]] = None
    groups = {"audio": bad_audio(tmp_path / "a"), "video": bad_video(tmp_path / "v"), "text": bad_text(tmp_path / "t")}
    for m, extra in _extra_bad(tmp_path / "x").items():
        groups[m].update(extra)
    for m, cases in groups.items():
        for name, (path, reason) in cases.items():
            uid = f"{m}_{name}"
            cells = {c: (str(path) if c == m else "") for c in COLUMN}
            listing.append(f"{uid},S1,spk2,sad,{cells['audio']},{cells['video']},{cells['text']}")
            for other in COLUMN:
                expected[other][uid] = reason if other == m else "no_path"
    (tmp_path / "listing.csv").write_text("\n".join(listing) + "\n")
    n_in = len(listing) - 1

    crashes = []
    report = ingest(tmp_path / "listing.csv", tmp_path / "manifest.parquet", project_root=tmp_path)
    manifest = read_manifest(tmp_path / "manifest.parquet")[0].to_pylist()
    counts: dict[str, dict[str, int]] = {}
    for m, name in TABLE.items():
        try:
            run_extraction(name, tmp_path / "manifest.parquet", tmp_path / "f" / f"{name}.arrow", None, CONFIGS[name], workers=1, max_failure_share=1.0, progress=False)
        except Exception as exc:  # noqa: BLE001 - counted, then asserted to be none
            crashes.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        table = read_feature_table(tmp_path / "f" / f"{name}.arrow")
        got = dict(zip(table.utterance_id, table.failure_reason))
        assert got == expected[m], {u: (got.get(u), r) for u, r in expected[m].items() if got.get(u) != r}
        counts[name] = {"present": int(table.present.sum()), "missing": int((~table.present).sum()), **Counter(r for r in table.failure_reason if r)}
    summary = {"clips_in": n_in, "in_manifest": len(manifest), "rejected": len(report.rejected), "crashes": len(crashes), "per_modality": counts}
    print("\nbad-input corpus:", json.dumps(summary, indent=1, sort_keys=True))
    assert crashes == []
    assert len(manifest) == n_in and report.rejected == []
    assert {r["utterance_id"]: r["audio_path"] for r in manifest}["audio_link"].endswith("x/audio/link.wav")  # the link, as listed
