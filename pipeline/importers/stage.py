"""Stage `import`: published pre-extracted features -> imer manifest + three feature tables.

After this stage the dataset looks exactly like one that went through ingest and
extraction (null media paths, `split` column for published splits), so splits,
train, evaluate and register run unchanged. Tables are written in record batches
to staging files and moved into place together only when every check passed.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.core.modalities import TABLE_OF_MANIFEST
from pipeline.formats.feature_table import FeatureTableWriter, build_meta
from pipeline.importers import gcnet, mmsa
from pipeline.importers.config import DATASETS, ImportConfig, batch_rows  # noqa: F401  (ImportConfig re-exported)
from pipeline.importers import missingness as miss
from pipeline.formats.manifest import MODALITIES, manifest_meta, write_manifest
from pipeline.core.params import config_hash, load_params

SECTION = "import"
TABLES = TABLE_OF_MANIFEST  # "audio" -> "acoustic"
def import_dataset(cfg: ImportConfig, manifest_out: str | Path, features_dir: str | Path) -> dict[str, Any]:
    """Import one dataset; write the manifest and three feature tables; return a summary."""
    features_dir = Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    staged = {m: features_dir / f".{TABLES[m]}.arrow.importing" for m in MODALITIES}
    try:
        if cfg.format == "gcnet":
            rows, tables = _import_gcnet(cfg, staged)
        else:
            rows, tables = _import_mmsa(cfg, staged, features_dir)
        for m in MODALITIES:
            os.replace(staged[m], features_dir / f"{TABLES[m]}.arrow")
    finally:
        for path in staged.values():
            if path.exists():
                path.unlink()
    classes = cfg.class_names()
    task = DATASETS[cfg.dataset]["task"]
    source = cfg.label_path if cfg.format == "gcnet" else cfg.pickle_path
    meta = manifest_meta(task, classes, f"import:{cfg.format}:{cfg.dataset}", {"import_source": str(source), "import_config_hash": config_hash(asdict(cfg))})
    write_manifest(_manifest_table(rows, tables), manifest_out, meta)
    summary: dict[str, Any] = {
        "format": cfg.format,
        "dataset": cfg.dataset,
        "task": task,
        "rows": len(rows["utterance_id"]),
        # per-class counts as read: compare them with the corpus's published counts to catch a wrong mapping
        "per_class": dict(sorted(Counter(x for x in rows["label"] if x is not None).items())) if classes else None,
        "splits": dict(Counter(s or "none" for s in rows["split"])),
        "rows_all_missing": int(sum(all(tables[m]["reasons"][i] for m in MODALITIES) for i in range(len(rows["utterance_id"])))),
        "manifest": str(manifest_out),
        "tables": {TABLES[m]: {k: v for k, v in tables[m].items() if k != "reasons"} for m in MODALITIES},
    }
    if "dropped" in rows:
        summary["dropped_all_absent"] = rows["dropped"]
    return summary


def _import_gcnet(cfg: ImportConfig, staged: dict[str, Path]) -> tuple[dict[str, list], dict[str, dict]]:
    if not cfg.label_path:
        raise ValueError("import.label_path is required for format gcnet")
    absent = [m for m in MODALITIES if not (cfg.feature_dirs or {}).get(m)]
    if absent:
        raise ValueError(f"import.feature_dirs needs a folder for {absent} (keys audio, text, video)")
    utts = gcnet.read_labels(cfg.label_path, cfg.dataset, cfg.class_names(), cfg.pickle_encoding)
    if not utts:
        raise ValueError(f"{cfg.label_path}: no utterances in videoIDs")
    uids = [u.utterance_id for u in utts]
    scans = {m: gcnet.scan_modality(cfg.feature_dirs[m], uids, cfg.face_reduce) for m in MODALITIES}
    none = [i for i in range(len(uids)) if all(scans[m][0][i].reason == miss.FILE_ABSENT for m in MODALITIES)]
    dropped: list[str] = []
    if none and cfg.on_all_missing == "error":
        shown = ", ".join(uids[i] for i in none[:5])
        raise ValueError(
            f"{cfg.label_path}: {len(none)} utterance ids have no feature file in any of {[cfg.feature_dirs[m] for m in MODALITIES]} "
            f"(e.g. {shown}); check the folders, or set import.on_all_missing: drop"
        )
    if none:
        keep = sorted(set(range(len(uids))) - set(none))
        dropped = [uids[i] for i in none]
        utts = [utts[i] for i in keep]
        scans = {m: ([s[0][i] for i in keep], s[1], s[2]) for m, s in scans.items()}
    tables = {}
    for m in MODALITIES:
        found, dim, longest = scans[m]
        seq_len = max(1, min(longest, cfg.cap(m) or longest))
        batches = gcnet.iter_batches(found, cfg.face_reduce, batch_rows(cfg.batch_rows, seq_len, dim))
        extractor = {"name": "import", "format": "gcnet", "dataset": cfg.dataset, "folder": str(cfg.feature_dirs[m]), "face_reduce": cfg.face_reduce, "nonfinite": cfg.nonfinite, "max_len": cfg.cap(m)}
        names = [f"{Path(cfg.feature_dirs[m]).name}_{k}" for k in range(dim)]
        tables[m] = _write_table(cfg, m, staged[m], [u.utterance_id for u in utts], batches, seq_len, dim, names, extractor, str(cfg.feature_dirs[m]))
    rows = {
        "utterance_id": [u.utterance_id for u in utts],
        "session": [u.session for u in utts],
        "speaker": [u.speaker for u in utts],
        "label": [u.label for u in utts],
        "score": [u.score for u in utts],
        "split": [u.split for u in utts],
        "dialogue": [u.dialogue_id for u in utts],
        "turn": [u.turn for u in utts],
        "speaker_tag": [u.speaker_tag for u in utts],
    }
    if dropped:
        rows["dropped"] = dropped  # type: ignore[assignment]
    return rows, tables


def _import_mmsa(cfg: ImportConfig, staged: dict[str, Path], features_dir: Path) -> tuple[dict[str, list], dict[str, dict]]:
    """MMSA pickle -> tables. Large arrays are spilled to a hidden folder beside the tables
    (free disk ~ the pickle's size) that lives exactly as long as this import, errors included."""
    if not cfg.pickle_path:
        raise ValueError("import.pickle_path is required for format mmsa")
    with tempfile.TemporaryDirectory(prefix=".mmsa-spill-", dir=features_dir) as spill:
        return _import_mmsa_splits(cfg, staged, Path(spill))


def _import_mmsa_splits(cfg: ImportConfig, staged: dict[str, Path], spill: Path) -> tuple[dict[str, list], dict[str, dict]]:
    """The import proper; its memmaps over `spill` are dropped when it returns, before the folder goes."""
    splits = mmsa.read_mmsa(cfg.pickle_path, cfg.pickle_encoding, cfg.aligned, spill_dir=spill)
    uids = [uid for s in splits for uid in s.ids]
    tables = {}
    for m in MODALITIES:
        dim = splits[0].arrays[m].shape[2]
        longest = max(int(s.lengths[m].max(initial=0)) for s in splits)
        seq_len = max(1, min(longest, cfg.cap(m) or longest))

        rows_per = batch_rows(cfg.batch_rows, seq_len, dim)

        def batches(m: str = m, rows_per: int = rows_per) -> Iterator[tuple[list, list]]:
            for s in splits:
                for start in range(0, len(s.ids), rows_per):
                    yield mmsa.row_items(s, m, start, min(start + rows_per, len(s.ids)))
                mmsa.release_pages(s.arrays[m])  # the split's last batch is packed: unmap it

        extractor = {
            "name": "import", "format": "mmsa", "dataset": cfg.dataset, "pickle": str(cfg.pickle_path), "array": mmsa.ARRAY_KEYS[m],
            "length_source": {s.name: s.length_source[m] for s in splits}, "nonfinite": cfg.nonfinite, "max_len": cfg.cap(m),
        }
        names = [f"mmsa_{mmsa.ARRAY_KEYS[m]}_{k}" for k in range(dim)]
        tables[m] = _write_table(cfg, m, staged[m], uids, batches(), seq_len, dim, names, extractor, str(cfg.pickle_path))
    rows = {
        "utterance_id": uids,
        "session": [mmsa.split_session(u) for u in uids],
        "speaker": [mmsa.split_session(u) for u in uids],
        "label": [None] * len(uids),
        "score": [float(x) for s in splits for x in s.scores],
        "split": [s.name for s in splits for _ in s.ids],
    }
    rows["dialogue"], rows["turn"] = mmsa.dialogue_turns(uids)
    return rows, tables


def _write_table(
    cfg: ImportConfig, m: str, path: Path, uids: list[str], batches: Iterator[tuple[list, list]],
    seq_len: int, dim: int, names: list[str], extractor: dict[str, Any], source: str,
) -> dict[str, Any]:
    """Stream one modality's batches into a feature table; check the missing share."""
    meta = build_meta(TABLES[m], seq_len, dim, dim, names, [f"mean_{n}" for n in names], extractor, config_hash(extractor))
    reasons: list[str | None] = []
    truncated = 0
    lengths: list[np.ndarray] = []
    with FeatureTableWriter(path, TABLES[m], seq_len, dim, dim, meta) as writer, \
            tqdm(total=len(uids), desc=f"import {TABLES[m]}", unit="utt", disable=None) as bar:  # bar on a terminal
        start = 0
        for items, hashes in batches:
            present, why, length, seq, summ, cut = miss.pack_rows(items, seq_len, dim, cfg.nonfinite)
            writer.write_batch(uids[start:start + len(items)], present, why, length, seq, summ, hashes)
            start += len(items)
            bar.update(len(items))
            reasons.extend(why)
            truncated += cut
            lengths.append(length)
        if start != len(uids):
            raise ValueError(f"{source}: wrote {start} {TABLES[m]} rows for {len(uids)} utterances")
        counts = Counter(r for r in reasons if r)
        share = sum(counts.values()) / max(1, len(uids))
        if share > cfg.max_missing_share:
            raise ValueError(
                f"{source}: {TABLES[m]} is missing for {share:.0%} of utterances ({dict(counts)}), above "
                f"import.max_missing_share={cfg.max_missing_share}; wrong folder or layout?"
            )
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    return {
        "sequence_shape": [seq_len, dim],
        "present": int(len(uids) - sum(counts.values())),
        "missing": dict(counts),
        "truncated": truncated,
        "mean_length": float(all_lengths[all_lengths > 0].mean()) if np.any(all_lengths > 0) else 0.0,
        "reasons": reasons,
    }


def _manifest_table(rows: dict[str, list], tables: dict[str, dict]) -> pa.Table:
    n = len(rows["utterance_id"])
    cols: dict[str, pa.Array] = {
        "utterance_id": pa.array(rows["utterance_id"], pa.string()),
        "session": pa.array(rows["session"], pa.string()),
        "speaker": pa.array(rows["speaker"], pa.string()),
        "label": pa.array(rows["label"], pa.string()),
        "score": pa.array(rows["score"], pa.float64()),
        "domain": pa.array(["source"] * n, pa.string()),
    }
    for m in MODALITIES:
        cols[f"{m}_path"] = pa.array([None] * n, pa.string())
    for m in MODALITIES:
        cols[f"{m}_missing"] = pa.array(tables[m]["reasons"], pa.string())
    cols["split"] = pa.array(rows["split"], pa.string())
    for extra in ("dialogue", "speaker_tag"):
        if extra in rows:
            cols[extra] = pa.array(rows[extra], pa.string())
    if "turn" in rows:
        cols["turn"] = pa.array(rows["turn"], pa.int64())
    return pa.table(cols)


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Resolve output paths from params and import; the summary is JSON-able."""
    cfg = ImportConfig.from_params(params)
    summary = import_dataset(cfg, params.get("manifest_out", "data/manifest.parquet"),
                             params.get("features_dir", "data/features"))
    if summary.get("per_class"):
        print(f"import: per-class counts read from {cfg.label_path if cfg.format == 'gcnet' else cfg.pickle_path}: "
              f"{summary['per_class']} (class order {cfg.class_names()}; set import.classes if they do not match "
              f"the corpus's published counts)", file=sys.stderr)
    return summary


def main() -> None:
    run_stage(load_params(SECTION))


if __name__ == "__main__":
    main()
