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

Domains: rows whose manifest `domain` is not "source" (a shifted domain, for
test-time adaptation) never enter train/val/test. The source strategy runs on the
source rows alone; shifted rows become `shifted_adapt` (an unlabelled adaptation
pool: `shifted_adapt_sessions`, default the first shifted session) or
`shifted_test` (`shifted_test_sessions`, default the rest; a single shifted session
is split by speaker), speaker-disjoint. `shifted_test` gets stored masks on its own
seed stream, so val/test masks are unchanged. A corpus without shifted rows gets
exactly the assignment, masks and splits.json it got before domains existed.

Dialogues (manifest `dialogue`/`turn`, `read_dialogues`): whole dialogues never cross
splits. by_session and loso keep a dialogue together when it stays inside one session;
whatever the strategy, a dialogue whose rows land in two splits (by_speaker with
two-speaker dialogues, a published `split` column that cuts one) is an error naming it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.atomic import atomic_path, write_json
from pipeline.core.hashing import file_digest
from pipeline.core.modalities import COMBINATIONS, MANIFEST_NAME, MODALITY_ORDER, TABLE_NAME, mask_to_index
from pipeline.formats.feature_table import read_feature_table
from pipeline.formats.manifest import read_dialogues, read_manifest
from pipeline.formats.split_store import (  # noqa: F401  (re-exported for callers of the stage module)
    SHIFTED_SPLITS, SOURCE_DOMAIN, SPLITS, check_domain_separation, natural_presence, read_assignment,
    read_random_masks, row_domains)

SECTION = "splits"
MASKED_SPLITS = ("val", "test", "shifted_test")  # index + 1 = the split's seed stream
STRATEGIES = ("by_session", "by_speaker", "manifest", "loso")
DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def assign_splits(manifest: pa.Table, params: dict[str, Any]) -> np.ndarray:
    """(N,) split per manifest row: the strategy on source rows, `shifted_*` for shifted-domain rows."""
    shifted = row_domains(manifest) != SOURCE_DOMAIN
    if not shifted.any():
        return _assign_source(manifest, params)  # exactly the pre-domain result
    source_rows, shifted_rows = np.flatnonzero(~shifted), np.flatnonzero(shifted)
    if len(source_rows) == 0:
        raise ValueError("the manifest has only shifted-domain rows; a source model needs source rows")
    split = np.empty(manifest.num_rows, dtype=object)
    split[source_rows] = _assign_source(manifest.take(source_rows), params)
    split[shifted_rows] = _assign_shifted(manifest.take(shifted_rows), params)
    check_domain_separation(row_domains(manifest), split)
    return split.astype(str)


def _assign_shifted(manifest: pa.Table, params: dict[str, Any]) -> np.ndarray:
    """(n,) 'shifted_adapt'/'shifted_test' for shifted rows: by session, or by speaker for one session."""
    sessions = np.asarray(manifest.column("session").to_pylist(), dtype=object).astype(str)
    speakers = np.asarray(manifest.column("speaker").to_pylist(), dtype=object).astype(str)
    names = sorted(set(sessions.tolist()))
    adapt = [str(x) for x in params.get("shifted_adapt_sessions") or []]
    test = [str(x) for x in params.get("shifted_test_sessions") or []]
    unknown = sorted(set(adapt + test) - set(names))
    if unknown:
        raise ValueError(f"shifted sessions {unknown} not among the manifest's shifted sessions {names}")
    if set(adapt) & set(test):
        raise ValueError(f"shifted sessions {sorted(set(adapt) & set(test))} are in both shifted_adapt and shifted_test")
    if not adapt and not test and len(names) == 1:  # one shifted session: split its speakers
        people = sorted(set(speakers.tolist()))
        if len(people) < 2:
            raise ValueError(f"shifted session {names[0]} has one speaker; shifted_adapt and shifted_test "
                             "must be speaker-disjoint (render more shifted speakers or sessions)")
        pool = people[: len(people) // 2]
        return np.where(np.isin(speakers, pool), "shifted_adapt", "shifted_test").astype(object)
    if not adapt:
        adapt = [n_ for n_ in names if n_ not in test][:1] if not test else [n_ for n_ in names if n_ not in test]
    if not test:
        test = [n_ for n_ in names if n_ not in adapt]
    left = sorted(set(names) - set(adapt) - set(test))
    if left or not adapt or not test:
        raise ValueError(f"shifted sessions {names}: shifted_adapt {adapt} and shifted_test {test} must both be "
                         f"non-empty and cover every shifted session (unassigned: {left})")
    return np.where(np.isin(sessions, adapt), "shifted_adapt", "shifted_test").astype(object)


def _assign_source(manifest: pa.Table, params: dict[str, Any]) -> np.ndarray:
    """(N,) array of 'train'/'val'/'test' per (source) manifest row, following params['strategy']."""
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
    dialogues, _ = read_dialogues(manifest)
    check_dialogues_in_one_split(dialogues, split, strategy, manifest_path)
    natural, table_info = natural_presence(manifest, features_dir)
    fold = int(params.get("fold", 0)) if strategy == "loso" else 0

    speakers = np.asarray(manifest.column("speaker").to_pylist(), dtype=object)
    shared = _groups_in_several_splits(speakers, split)
    if shared and strategy != "manifest" and not params.get("allow_speaker_overlap", False):
        raise ValueError(f"{manifest_path}: speakers {shared[:5]} fall in more than one split under {strategy!r}")

    mask_rows: dict[str, list] = {"utterance_id": [], "split": [], "mr": [], "a": [], "t": [], "v": []}
    realised: dict[str, dict[str, float]] = {}
    has_shifted = bool(np.isin(split, SHIFTED_SPLITS).any())
    names = SPLITS + SHIFTED_SPLITS if has_shifted else SPLITS  # shifted keys only when shifted rows exist
    for s_idx, name in enumerate(MASKED_SPLITS):
        if name == "shifted_test" and not has_shifted:
            continue
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
        "counts": _counts(split, manifest, meta, natural, names, dialogues),
        "speakers_in_several_splits": shared,
        "realised_missing_share": realised,
        "groups": {s: sorted({str(g) for g in np.asarray(manifest.column("session").to_pylist())[split == s]})
                   for s in names},
        "inputs": {"manifest": {"path": str(manifest_path), "file_sha256": file_digest(manifest_path)},
                   "features": table_info},
        "content_hash": content.hexdigest()[:16],
    }
    if has_shifted:
        domain = row_domains(manifest)
        summary["domains"] = {str(d): {s: int(((domain == d) & (split == s)).sum()) for s in names
                                       if ((domain == d) & (split == s)).any()} for d in sorted(set(domain.tolist()))}
    write_json(out_dir / "splits.json", summary)
    return summary


def check_dialogues_in_one_split(dialogues: np.ndarray, split: np.ndarray, strategy: str, where: str | Path) -> None:
    """Raise if a dialogue's rows sit in more than one split (its context would leak across them)."""
    crossing = _groups_in_several_splits(dialogues, split)
    if not crossing:
        return
    first = crossing[0]
    parts = sorted({str(s) for s in split[dialogues == first]})
    raise ValueError(
        f"{where}: {len(crossing)} dialogue(s) fall in more than one split under strategy {strategy!r}, e.g. "
        f"dialogue {first!r} in {parts} (all: {crossing[:5]}); whole dialogues must stay in one split: use "
        "splits.strategy: by_session (dialogues inside one session stay together), or fix the listing's "
        "`split` / `dialogue` columns (for a single shifted session, render corpus.shifted_sessions >= 2)")


def _groups_in_several_splits(groups: np.ndarray, split: np.ndarray) -> list[str]:
    seen: dict[str, set] = {}
    for g, s in zip(groups.tolist(), split.tolist()):
        seen.setdefault(str(g), set()).add(s)
    return sorted(g for g, ss in seen.items() if len(ss) > 1)


def _counts(split: np.ndarray, manifest: pa.Table, meta: dict, natural: np.ndarray,
            names: tuple[str, ...], dialogues: np.ndarray) -> dict:
    labels = np.asarray(manifest.column("label").to_pylist(), dtype=object)
    combo = mask_to_index(natural)
    out: dict[str, Any] = {}
    for s in names:
        sel = split == s
        entry: dict[str, Any] = {"n": int(sel.sum()), "dialogues": len(set(dialogues[sel].tolist())),
                                 "no_modality": int((combo[sel] < 0).sum()),
                                 "natural_combination": {c: int((combo[sel] == i).sum()) for i, c in enumerate(COMBINATIONS)}}
        if meta.get("task") == "classification":
            entry["per_class"] = {c: int((labels[sel] == c).sum()) for c in meta.get("classes", [])}
        out[s] = entry
    return out


def run_stage(params: dict[str, Any]) -> dict:
    """Resolve paths from params and build the splits."""
    summary = build_splits(params.get("manifest", "data/manifest.parquet"), params.get("features_dir", "data/features"),
                           params.get("out_dir", "data/splits"), params)
    return {"strategy": summary["strategy"], "counts": {s: c["n"] for s, c in summary["counts"].items()},
            "content_hash": summary["content_hash"]}


def main() -> None:
    from pipeline.core.params import load_params

    print(run_stage(load_params(SECTION)))


if __name__ == "__main__":
    main()
