"""Aligned multimodal data for training and evaluation, read straight from the feature tables.

The feature tables stay memory-mapped; the manifest order defines the sample axis
and each modality keeps a row-index array into its table, so a batch copies only
its own rows (`features[rows[idx]]`), never the whole table and never one Python
object per row. `subset(split)` is a view (an index array), not a copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from pipeline.core.modalities import MASKS, MODALITY_ORDER, TABLE_NAME, mask_to_index
from pipeline.formats.feature_table import read_feature_table
from pipeline.formats.manifest import read_dialogues, read_manifest
from pipeline.core.hashing import file_digest
from pipeline.methods.context import DialogueLayout, dense_layout, singleton_layout
from pipeline.training.grouping import batch_rows
from pipeline.training.statistics import feature_statistics  # noqa: F401  (re-exported)
from pipeline.formats.split_store import check_domain_separation, natural_presence, read_assignment, row_domains


@dataclass
class MultimodalData:
    """Memory-mapped features of all modalities aligned on the manifest's utterances.

    `positions` selects the samples of this view (indices into the aligned axis);
    every per-sample accessor takes *local* indices 0..len(self)-1.
    """

    utterance_id: np.ndarray  # (N,) object, aligned axis
    features: dict[str, np.ndarray]  # letter -> (N_table, T, d) float32 memory-mapped
    rows: dict[str, np.ndarray]  # letter -> (N,) int64 row in the table, -1 = not in the table
    lengths: dict[str, np.ndarray]  # letter -> (N,) int64 valid steps (0 when missing)
    natural: np.ndarray  # (N, 3) bool natural presence
    target: np.ndarray  # (N,) int64 class index or float32 score
    split: np.ndarray  # (N,) str train/val/test
    task: str
    classes: list[str]
    feature_meta: dict[str, dict] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    positions: np.ndarray | None = None  # (n,) int64 into the aligned axis; None = all
    # conversation structure (manifest `dialogue`, `turn`, `speaker`); None = every row its own dialogue
    dialogue: np.ndarray | None = None  # (N,) str dialogue id
    turn: np.ndarray | None = None  # (N,) int64 turn number inside the dialogue
    speaker: np.ndarray | None = None  # (N,) str speaker id

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        manifest: str | Path,
        features_dir: str | Path,
        splits_dir: str | Path,
        include: Sequence[str] = ("train", "val", "test"),
    ) -> "MultimodalData":
        """Align manifest, feature tables and stored split assignment.

        `include` restricts which splits are aligned at all: the train stage passes
        ("train", "val") so test rows are never even indexed.
        """
        table, meta = read_manifest(manifest)
        ids_all = np.asarray(table.column("utterance_id").to_pylist(), dtype=object)
        a_ids, a_split = read_assignment(splits_dir)
        split_of = dict(zip(a_ids.tolist(), a_split.tolist()))
        missing = [u for u in ids_all[:5] if u not in split_of]
        if len(split_of) != len(ids_all) or missing:
            raise ValueError(f"{splits_dir}: split assignment does not match {manifest} "
                             f"({len(split_of)} vs {len(ids_all)} utterances); re-run the splits stage")
        split_all = np.asarray([split_of[u] for u in ids_all.tolist()], dtype=object).astype(str)
        check_domain_separation(row_domains(table), split_all)  # no shifted-domain row in train/val/test
        keep = np.flatnonzero(np.isin(split_all, list(include)))
        ids = ids_all[keep]
        task = meta.get("task", "classification")
        classes = list(meta.get("classes", []))
        target = _targets(table, task, classes, manifest)[keep]
        natural, table_info = natural_presence(table, features_dir)
        natural = natural[keep]

        features, rows, lengths, feature_meta = {}, {}, {}, {}
        for m in MODALITY_ORDER:
            ft = read_feature_table(Path(features_dir) / f"{TABLE_NAME[m]}.arrow", memory_map=True)
            index = ft.index()
            r = np.array([index.get(u, -1) for u in ids.tolist()], dtype=np.int64)
            features[m] = ft.sequence  # memory-mapped view, (N_table, T, d)
            rows[m] = r
            length = np.where(r >= 0, ft.length[np.maximum(r, 0)], 0).astype(np.int64)
            lengths[m] = np.where(natural[:, MODALITY_ORDER.index(m)], length, 0)
            feature_meta[m] = dict(ft.meta)
        dialogue, turn = read_dialogues(table)
        speaker = np.asarray(table.column("speaker").to_pylist(), dtype=object).astype(str)
        provenance = {"manifest_sha256": file_digest(manifest), "features": table_info}
        splits_json = Path(splits_dir) / "splits.json"
        if splits_json.exists():
            import json

            provenance["splits_hash"] = json.loads(splits_json.read_text()).get("content_hash")
        return cls(ids, features, rows, lengths, natural, target, split_all[keep], task, classes,
                   feature_meta, provenance, dialogue=np.asarray(dialogue).astype(str)[keep],
                   turn=np.asarray(turn, dtype=np.int64)[keep], speaker=speaker[keep])

    # ---------------------------------------------------------------- views
    def _pos(self) -> np.ndarray:
        return np.arange(len(self.utterance_id)) if self.positions is None else self.positions

    def __len__(self) -> int:
        return len(self._pos())

    def subset(self, split: str | Iterable[str]) -> "MultimodalData":
        """View of the samples in `split` (a name or several)."""
        names = [split] if isinstance(split, str) else list(split)
        pos = self._pos()
        return replace(self, positions=pos[np.isin(self.split[pos], names)])

    def take(self, local: np.ndarray) -> "MultimodalData":
        """View of some samples of this view (local indices)."""
        return replace(self, positions=self._pos()[np.asarray(local, dtype=np.int64)])

    @property
    def input_dims(self) -> dict[str, int]:
        return {m: int(self.features[m].shape[2]) for m in MODALITY_ORDER}

    @property
    def seq_lens(self) -> dict[str, int]:
        return {m: int(self.features[m].shape[1]) for m in MODALITY_ORDER}

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    def view_natural(self) -> np.ndarray:
        """(n, 3) natural presence of this view."""
        return self.natural[self._pos()]

    def view_target(self) -> np.ndarray:
        return self.target[self._pos()]

    def view_split(self) -> np.ndarray:
        return self.split[self._pos()]

    def dialogue_groups(self) -> np.ndarray:
        """(n,) int64 dialogue code of each row of this view (each row its own without dialogues)."""
        pos = self._pos()
        if self.dialogue is None:
            return np.arange(len(pos), dtype=np.int64)
        return np.unique(self.dialogue[pos], return_inverse=True)[1].reshape(-1).astype(np.int64)

    def dialogue_layout(self, local: np.ndarray) -> DialogueLayout:
        """Where rows `local` of this view sit in their dialogues (see pipeline/methods/context.py)."""
        pos = self._pos()[np.asarray(local, dtype=np.int64)]
        if self.dialogue is None:
            return singleton_layout(len(pos))
        return dense_layout(self.dialogue[pos], self.turn[pos], self.speaker[pos])

    def read_batches(self, batch_size: int, by_dialogue: bool) -> list[np.ndarray]:
        """Local indices in read batches; `by_dialogue` keeps every dialogue inside one batch."""
        return batch_rows(len(self), batch_size, self.dialogue_groups() if by_dialogue else None)

    def modality_shares(self) -> dict[str, float]:
        """Share of this view's rows in which each modality is naturally present (with a non-empty sequence)."""
        pos = self._pos()
        if len(pos) == 0:
            return {m: 0.0 for m in MODALITY_ORDER}
        return {m: float((self.natural[pos, j] & (self.lengths[m][pos] > 0)).mean())
                for j, m in enumerate(MODALITY_ORDER)}

    def existing_modalities(self, min_share: float) -> tuple[str, ...]:
        """Modalities present in at least `min_share` of this view's rows (at least one row if min_share is 0)."""
        shares = self.modality_shares()
        return tuple(m for m in MODALITY_ORDER if shares[m] > 0 and shares[m] >= min_share)

    def restrict(self, modalities: Sequence[str]) -> "MultimodalData":
        """The same rows with every modality outside `modalities` marked absent (never read, never routed)."""
        keep = np.array([m in modalities for m in MODALITY_ORDER], dtype=bool)
        if keep.all():
            return self
        lengths = {m: (v if keep[j] else np.zeros_like(v)) for j, (m, v) in
                   enumerate((m, self.lengths[m]) for m in MODALITY_ORDER)}
        return replace(self, natural=self.natural & keep[None, :], lengths=lengths)

    # ---------------------------------------------------------------- batches
    def batch(
        self,
        local: np.ndarray,
        combination: int | None = None,
        mask: np.ndarray | None = None,
        modalities: Sequence[str] = MODALITY_ORDER,
    ) -> dict[str, Any]:
        """Tensors for samples `local` in the forward() format.

        combination=c: homogeneous batch, effective mask = MASKS[c] AND natural.
        mask=(B, 3): per-sample mask (ANDed with natural), combination per sample.
        Neither: mask = natural presence. Modalities outside `modalities` (or absent
        from the combination) are not read; they come back as zeros.
        """
        pos = self._pos()[np.asarray(local, dtype=np.int64)]  # (B,)
        natural = self.natural[pos]  # (B, 3)
        if combination is not None:
            eff = natural & MASKS[int(combination)][None, :]
            comb: int | torch.Tensor = int(combination)
            wanted = [m for j, m in enumerate(MODALITY_ORDER) if MASKS[int(combination)][j]]
        else:
            eff = natural if mask is None else natural & np.asarray(mask, dtype=bool)
            comb = torch.as_tensor(mask_to_index(eff), dtype=torch.long)  # -1 = nothing present
            wanted = list(modalities)
        feats, lens, lens_nat = {}, {}, {}
        for j, m in enumerate(MODALITY_ORDER):
            arr = self.features[m]
            rows = self.rows[m][pos]
            if m in wanted:
                out = np.zeros((len(pos), arr.shape[1], arr.shape[2]), dtype=np.float32)  # (B, T, d)
                ok = rows >= 0
                if ok.any():
                    out[ok] = arr[rows[ok]]  # copies only these rows off the memory map
                feats[m] = torch.from_numpy(out)
            else:
                feats[m] = torch.zeros((len(pos), arr.shape[1], arr.shape[2]), dtype=torch.float32)
            lens_nat[m] = torch.as_tensor(self.lengths[m][pos], dtype=torch.long)
            lens[m] = torch.where(torch.as_tensor(eff[:, j]), lens_nat[m], 0)
        target = self.target[pos]
        return {
            "features": feats,
            "lengths": lens,
            "lengths_natural": lens_nat,
            "mask": torch.as_tensor(eff),
            "natural": torch.as_tensor(natural),
            "combination": comb,
            "target": torch.as_tensor(target),
            "index": torch.as_tensor(pos),
            "dialogue": self.dialogue_layout(local),
        }


def train_prior(data: MultimodalData) -> list[float]:
    """What to predict for a sample with no modality: train class frequencies or mean train score.

    Validation (checkpoint selection), evaluation and serving all use this one
    answer, so the score that selects a checkpoint is the score the registry compares.
    """
    y = data.subset("train").view_target()
    if len(y) == 0:
        raise ValueError("no train rows to compute the prior for samples without any modality")
    if data.task == "classification":
        return (np.bincount(y.astype(np.int64), minlength=len(data.classes)) / len(y)).tolist()
    return [float(np.mean(y))]


def with_mask(batch: dict[str, Any], mask: np.ndarray | torch.Tensor, combination: int | None) -> dict[str, Any]:
    """The same batch under another effective mask (features are shared, not copied)."""
    mask = torch.as_tensor(np.asarray(mask, dtype=bool)) if not isinstance(mask, torch.Tensor) else mask
    eff = batch["natural"] & mask  # (B, 3)
    if combination is None:  # each sample's effective combination (-1: nothing left)
        comb = torch.as_tensor(mask_to_index(eff.cpu().numpy()), dtype=torch.long, device=eff.device)
    else:
        comb = combination
    lens = {m: torch.where(eff[:, j], batch["lengths_natural"][m], 0) for j, m in enumerate(MODALITY_ORDER)}
    return {**batch, "mask": eff, "lengths": lens, "combination": comb}


def select_rows(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """Rows `keep` (bool (B,)) of a batch; a vector `combination` is sliced along."""
    comb = batch["combination"]
    return {
        **batch,
        "features": {m: x[keep] for m, x in batch["features"].items()},
        "lengths": {m: x[keep] for m, x in batch["lengths"].items()},
        "lengths_natural": {m: x[keep] for m, x in batch["lengths_natural"].items()},
        "mask": batch["mask"][keep],
        "natural": batch["natural"][keep],
        "combination": comb[keep] if isinstance(comb, torch.Tensor) else comb,
        "target": batch["target"][keep],
        "index": batch["index"][keep],
        **({"dialogue": batch["dialogue"].select(keep)} if batch.get("dialogue") is not None else {}),
    }


def _targets(table, task: str, classes: list[str], manifest: str | Path) -> np.ndarray:
    if task == "classification":
        labels = table.column("label").to_pylist()
        lookup = {c: i for i, c in enumerate(classes)}
        bad = sorted({str(x) for x in labels if x not in lookup})
        if bad:
            raise ValueError(f"{manifest}: labels {bad[:5]} are not in the manifest classes {classes}")
        return np.asarray([lookup[x] for x in labels], dtype=np.int64)
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    if np.isnan(scores).any():
        raise ValueError(f"{manifest}: {int(np.isnan(scores).sum())} regression rows have no score")
    return scores
