"""Stage `splits`: train/val/test assignment, natural presence and stored random-missing masks.

Everything random about evaluation is drawn here once, from a recorded seed, and
stored as data under `data/splits/`; training and evaluation read these files and
never re-draw (the research code re-drew masks on every run).

Random-missing masks (val and test, for every MR in `missing_rates`): for a split
of N samples, K = round(MR * 3N) of the 3N (sample, modality) slots are removed,
never all three of one sample, so K is capped at 2N (MR = 0.7 realises 2/3). The
draw: one seeded random permutation of the 3N slots per split; walking it in
order, a slot is *eligible* if it is among the first two slots of its sample met
on the walk; the first K eligible slots are missing. This equals a sequential
uniform draw that skips slots which would empty a sample, and since the same
permutation serves every MR, masks are nested (a slot missing at MR is missing at
every higher MR). Masks are independent of natural presence; evaluation combines
them (effective = random mask AND natural presence).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, write_json
from pipeline.combinations import COMBINATIONS, MODALITY_ORDER, TABLE_NAME, mask_to_index
from pipeline.feature_table import read_feature_table
from pipeline.manifest import MODALITY_LETTER, read_manifest

SECTION = "splits"
SPLITS = ("train", "val", "test")
STRATEGIES = ("by_session", "by_speaker", "manifest", "loso")
DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed), for provenance tags."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def natural_presence(manifest: pa.Table, features_dir: str | Path) -> tuple[np.ndarray, dict[str, dict]]:
    """(N, 3) bool presence in manifest order: row present in the feature table AND not missing at ingest."""
    features_dir = Path(features_dir)
    ids = manifest.column("utterance_id").to_pylist()
    natural = np.zeros((len(ids), 3), dtype=bool)
    info: dict[str, dict] = {}
    for j, m in enumerate(MODALITY_ORDER):
        path = features_dir / f"{TABLE_NAME[m]}.arrow"
        table = read_feature_table(path, memory_map=True)
        index = table.index()
        rows = np.array([index.get(u, -1) for u in ids], dtype=np.int64)
        found = rows >= 0
        natural[found, j] = table.present[rows[found]]
        source = {v: k for k, v in MODALITY_LETTER.items()}[m]  # "a" -> "audio"
        missing_col = f"{source}_missing"
        if missing_col in manifest.column_names:
            natural[:, j] &= np.asarray(manifest.column(missing_col).is_null())
        info[m] = {"path": str(path), "file_sha256": file_digest(path), "config_hash": table.meta.get("config_hash"),
                   "rows_not_in_table": int((~found).sum())}
    return natural, info


def assign_splits(manifest: pa.Table, params: dict[str, Any]) -> np.ndarray:
    """(N,) array of 'train'/'val'/'test' per manifest row, following params['strategy']."""
    strategy = params.get("strategy", "by_session")
    n = manifest.num_rows
    if strategy == "manifest":
        if "split" not in manifest.column_names:
            raise ValueError("strategy 'manifest' needs a 'split' column in the manifest")
        split = np.asarray(manifest.column("split").to_pylist(), dtype=object)
        bad = sorted({str(s) for s in split if s not in SPLITS})
        if bad:
            raise ValueError(f"manifest 'split' column has values {bad}; expected {SPLITS}")
        return split.astype(str)
    if strategy in ("by_session", "loso"):
        groups = np.asarray(manifest.column("session").to_pylist(), dtype=object)
        test_key, val_key = "test_sessions", "val_sessions"
    elif strategy == "by_speaker":
        groups = np.asarray(manifest.column("speaker").to_pylist(), dtype=object)
        test_key, val_key = "test_speakers", "val_speakers"
    else:
        raise ValueError(f"unknown split strategy {strategy!r}; expected one of {STRATEGIES}")
    names = sorted({str(g) for g in groups})
    if len(names) < 3:
        raise ValueError(f"strategy {strategy!r} needs at least 3 groups, found {names}")
    if strategy == "loso":
        fold = int(params.get("fold", 0))
        if not 0 <= fold < len(names):
            raise ValueError(f"loso fold {fold} outside 0..{len(names) - 1}")
        test = [names[fold]]
        val = list(params.get("val_sessions") or []) or [names[(fold - 1) % len(names)]]
    else:
        test = list(params.get(test_key) or []) or [names[-1]]
        val = list(params.get(val_key) or []) or [n_ for n_ in names if n_ not in test][-1:]
    unknown = sorted(set(test + val) - set(names))
    if unknown:
        raise ValueError(f"held-out groups {unknown} not in the manifest ({names})")
    if set(test) & set(val):
        raise ValueError(f"groups {sorted(set(test) & set(val))} are in both val and test")
    split = np.full(n, "train", dtype=object)
    split[np.isin(groups, val)] = "val"
    split[np.isin(groups, test)] = "test"
    return split.astype(str)


def random_missing_masks(n: int, rates: list[float], rng: np.random.Generator) -> dict[float, np.ndarray]:
    """Nested (n, 3) presence masks, one per MR; see the module docstring for the algorithm."""
    perm = rng.permutation(3 * n)  # slot ids: sample * 3 + modality
    sample = perm // 3
    order = np.argsort(sample, kind="stable")  # group the walk by sample, keeping walk order
    rank = np.empty(3 * n, dtype=np.int64)
    counts = np.bincount(sample, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank[order] = np.arange(3 * n) - np.repeat(starts, counts)  # occurrence number of the slot within its sample
    eligible = perm[rank < 2]  # in walk order
    masks = {}
    for mr in rates:
        k = min(int(round(mr * 3 * n)), 2 * n)
        present = np.ones(3 * n, dtype=bool)
        present[eligible[:k]] = False
        masks[mr] = present.reshape(n, 3)
    return masks


def build_splits(manifest_path: str | Path, features_dir: str | Path, out_dir: str | Path, params: dict[str, Any]) -> dict:
    """Pure stage function: write assignment, natural presence, random masks and splits.json."""
    out_dir = Path(out_dir)
    manifest, meta = read_manifest(manifest_path)
    seed = int(params.get("seed", 0))
    strategy = params.get("strategy", "by_session")
    rates = [float(r) for r in params.get("missing_rates", DEFAULT_RATES)]
    if any(not 0.0 <= r < 1.0 for r in rates):
        raise ValueError(f"missing_rates must lie in [0, 1): {rates}")
    ids = np.asarray(manifest.column("utterance_id").to_pylist(), dtype=object)
    split = assign_splits(manifest, params)
    natural, table_info = natural_presence(manifest, features_dir)
    fold = int(params.get("fold", 0)) if strategy == "loso" else 0

    speakers = np.asarray(manifest.column("speaker").to_pylist(), dtype=object)
    shared = _groups_in_several_splits(speakers, split)
    if shared and strategy != "manifest" and not params.get("allow_speaker_overlap", False):
        raise ValueError(f"{manifest_path}: speakers {shared[:5]} fall in more than one split under {strategy!r}")

    mask_rows: dict[str, list] = {"utterance_id": [], "split": [], "mr": [], "a": [], "t": [], "v": []}
    realised: dict[str, dict[str, float]] = {}
    for s_idx, name in enumerate(("val", "test")):
        sel = np.flatnonzero(split == name)
        rng = np.random.default_rng([seed, 1 + s_idx])  # one stream per split: adding rates changes nothing
        masks = random_missing_masks(len(sel), rates, rng)
        realised[name] = {}
        for mr, mask in masks.items():
            mask_rows["utterance_id"].extend(ids[sel].tolist())
            mask_rows["split"].extend([name] * len(sel))
            mask_rows["mr"].extend([mr] * len(sel))
            for j, m in enumerate(MODALITY_ORDER):
                mask_rows[m].extend(mask[:, j].tolist())
            realised[name][f"{mr:.1f}"] = float(1.0 - mask.mean()) if len(sel) else 0.0

    assignment = pa.table({"utterance_id": pa.array(ids.tolist(), pa.string()),
                           "split": pa.array(split.tolist(), pa.string()),
                           "fold": pa.array(np.full(len(ids), fold, dtype=np.int32))})
    natural_tbl = pa.table({"utterance_id": pa.array(ids.tolist(), pa.string()),
                            **{m: pa.array(natural[:, j]) for j, m in enumerate(MODALITY_ORDER)}})
    masks_tbl = pa.table({"utterance_id": pa.array(mask_rows["utterance_id"], pa.string()),
                          "split": pa.array(mask_rows["split"], pa.string()),
                          "mr": pa.array(mask_rows["mr"], pa.float64()),
                          **{m: pa.array(mask_rows[m], pa.bool_()) for m in MODALITY_ORDER}})
    for name, tbl in (("assignment", assignment), ("natural", natural_tbl), ("random_masks", masks_tbl)):
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            pq.write_table(tbl, tmp)

    content = hashlib.sha256()
    for arr in (ids.astype(str), split, natural, np.asarray(mask_rows["mr"]),
                np.stack([mask_rows[m] for m in MODALITY_ORDER], axis=1) if mask_rows["a"] else np.zeros(0)):
        content.update(np.ascontiguousarray(arr).astype(str if arr.dtype == object else arr.dtype).tobytes())
    summary = {
        "seed": seed,
        "strategy": strategy,
        "fold": fold,
        "missing_rates": rates,
        "task": meta.get("task"),
        "classes": meta.get("classes", []),
        "counts": _counts(split, manifest, meta, natural),
        "speakers_in_several_splits": shared,
        "realised_missing_share": realised,
        "groups": {s: sorted({str(g) for g in np.asarray(manifest.column("session").to_pylist())[split == s]})
                   for s in SPLITS},
        "inputs": {"manifest": {"path": str(manifest_path), "file_sha256": file_digest(manifest_path)},
                   "features": table_info},
        "content_hash": content.hexdigest()[:16],
    }
    write_json(out_dir / "splits.json", summary)
    return summary


def _groups_in_several_splits(groups: np.ndarray, split: np.ndarray) -> list[str]:
    seen: dict[str, set] = {}
    for g, s in zip(groups.tolist(), split.tolist()):
        seen.setdefault(str(g), set()).add(s)
    return sorted(g for g, ss in seen.items() if len(ss) > 1)


def _counts(split: np.ndarray, manifest: pa.Table, meta: dict, natural: np.ndarray) -> dict:
    labels = np.asarray(manifest.column("label").to_pylist(), dtype=object)
    combo = mask_to_index(natural)
    out: dict[str, Any] = {}
    for s in SPLITS:
        sel = split == s
        entry: dict[str, Any] = {"n": int(sel.sum()), "no_modality": int((combo[sel] < 0).sum()),
                                 "natural_combination": {c: int((combo[sel] == i).sum()) for i, c in enumerate(COMBINATIONS)}}
        if meta.get("task") == "classification":
            entry["per_class"] = {c: int((labels[sel] == c).sum()) for c in meta.get("classes", [])}
        out[s] = entry
    return out


def read_assignment(splits_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(utterance_id (N,), split (N,)) as stored; a missing file is a clear error."""
    path = Path(splits_dir) / "assignment.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: split assignment not found (run the splits stage)")
    tbl = pq.read_table(path, columns=["utterance_id", "split"])
    return (np.asarray(tbl.column("utterance_id").to_pylist(), dtype=object),
            np.asarray(tbl.column("split").to_pylist(), dtype=object).astype(str))


def read_random_masks(splits_dir: str | Path, split: str) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Stored masks of one split: {mr: (utterance_id (n,), presence (n, 3) bool)}; never re-drawn."""
    path = Path(splits_dir) / "random_masks.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: random-missing masks not found (run the splits stage)")
    tbl = pq.read_table(path, filters=[("split", "=", split)])
    mr = tbl.column("mr").to_numpy()
    ids = np.asarray(tbl.column("utterance_id").to_pylist(), dtype=object)
    mask = np.stack([tbl.column(m).to_numpy(zero_copy_only=False) for m in MODALITY_ORDER], axis=1).astype(bool)
    return {float(r): (ids[mr == r], mask[mr == r]) for r in np.unique(mr)}


def run_stage(params: dict[str, Any]) -> dict:
    """Resolve paths from params and build the splits."""
    summary = build_splits(params.get("manifest", "data/manifest.parquet"), params.get("features_dir", "data/features"),
                           params.get("out_dir", "data/splits"), params)
    return {"strategy": summary["strategy"], "counts": {s: summary["counts"][s]["n"] for s in SPLITS},
            "content_hash": summary["content_hash"]}


def main() -> None:
    from pipeline.params import load_params

    print(run_stage(load_params(SECTION)))


if __name__ == "__main__":
    main()
