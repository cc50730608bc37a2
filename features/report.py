"""The end of an extraction: failure report, failure-share check, and the feature table.

The report (`<table>.failures.json`) is written first, always, so a stage that fails
the share check still says why, per clip. Per-clip notes that keep a clip present
but deserve a look (`truncated_text`) are counted in the table metadata and listed
in the report.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from features.base import Extractor
from features.clips import ClipOutcome, ExtractionFailed
from pipeline.core.atomic import write_json
from pipeline.formats.feature_table import FeatureTable, build_meta, write_feature_table

NOTE_FLAGS = ("truncated_text",)  # per-clip extras that flag a present clip for a look


def finish(modality: str, rows: list[ClipOutcome], n_with_file: int, extractor: Extractor, out_path: Path, max_failure_share: float, workers: int) -> dict[str, Any]:
    """Write the failure report, enforce `max_failure_share`, write the table; return the run summary."""
    failed = [o for o in rows if o.extraction_failure]
    counts = Counter(o.failure_reason for o in rows if not o.present)
    share = len(failed) / n_with_file if n_with_file else 0.0
    notes = {flag: [o.utterance_id for o in rows if o.present and o.extras.get(flag)] for flag in NOTE_FLAGS}
    notes = {flag: ids for flag, ids in notes.items() if ids}
    report_path = out_path.with_name(f"{out_path.stem}.failures.json")
    summary = {
        "modality": modality,
        "out": str(out_path),
        "failures_report": str(report_path),
        "config_hash": extractor.config_hash,
        "n_clips": len(rows),
        "n_with_file": n_with_file,
        "n_present": sum(o.present for o in rows),
        "n_absent": len(rows) - n_with_file,
        "n_extraction_failures": len(failed),
        "failure_share": share,
        "max_failure_share": max_failure_share,
        "counts": dict(sorted(counts.items())),
        "notes": {flag: len(ids) for flag, ids in notes.items()},
        "cache_hits": sum(o.cache_hit for o in rows if o.content_hash is not None),
        "cache_misses": sum(not o.cache_hit for o in rows if o.content_hash is not None),
        "extract_s": sum(o.extract_s for o in rows),
        "setup_s": sum(o.setup_s for o in rows),  # extractor set-up, summed over the processes that built one
        "workers": workers,
    }
    report = {
        **summary,
        "clips": [{"utterance_id": o.utterance_id, "reason": o.failure_reason, "message": o.message, "extraction_failure": o.extraction_failure} for o in rows if not o.present],
        "clip_extras": {o.utterance_id: o.extras for o in rows if o.extras},
        "noted_clips": notes,
    }
    write_json(report_path, report)
    if share > max_failure_share:
        detail = ", ".join(f"{r}={n}" for r, n in Counter(o.failure_reason for o in failed).most_common())
        raise ExtractionFailed(
            f"extract_{modality}: {len(failed)} of {n_with_file} clips with a file failed extraction "
            f"({share:.1%} > max_failure_share {max_failure_share:.1%}): {detail}; per-clip reasons in {report_path}; "
            f"table {out_path} not written"
        )
    write_feature_table(out_path, _table(modality, rows, extractor, summary))
    return summary


def _table(modality: str, rows: list[ClipOutcome], extractor: Extractor, summary: dict[str, Any]) -> FeatureTable:
    t, d = extractor.seq_shape
    names, summary_names = extractor.feature_names, extractor.summary_names
    seq = np.zeros((len(rows), t, d), np.float32)  # (N, T, d)
    summ = np.zeros((len(rows), len(summary_names)), np.float32)  # (N, d_s)
    for i, o in enumerate(rows):
        if o.present:
            seq[i], summ[i] = o.sequence, o.summary
    meta = build_meta(modality, t, d, len(summary_names), names, summary_names, extractor.recipe(), extractor.config_hash)
    meta["failure_counts"] = summary["counts"]
    if summary["notes"]:
        meta["notes"] = summary["notes"]
    return FeatureTable(
        modality=modality,
        utterance_id=np.asarray([o.utterance_id for o in rows], dtype=object),
        present=np.array([o.present for o in rows], bool),
        failure_reason=[o.failure_reason for o in rows],
        length=np.array([o.length if o.present else 0 for o in rows], np.int32),
        sequence=seq,
        summary=summ,
        content_hash=[o.content_hash for o in rows],
        meta=meta,
    )
