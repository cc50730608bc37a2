"""The `import` stage's typed configuration and the datasets it knows (class order, task)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.modalities import LETTER_OF_MANIFEST

DATASETS: dict[str, dict[str, Any]] = {
    # Class order = integer label order of the label pickle; override with import.classes.
    # 4-way: the GCNet/MoMKE pickle's per-integer counts are 1,636 / 1,084 / 1,708 / 1,103, which are
    # IEMOCAP-4's happy(+excited) / sad / neutral / angry counts: 0..3 = happy, sad, neutral, angry.
    "iemocap4": {"task": "classification", "classes": ["happy", "sad", "neutral", "angry"]},
    # 6-way (DialogueRNN/GCNet): per-integer counts 648 / 1,084 / 1,708 / 1,103 / 1,041 / 1,849 are
    # happy / sad / neutral / angry / excited / frustrated (hap, sad, neu, ang, exc, fru).
    "iemocap6": {"task": "classification", "classes": ["happy", "sad", "neutral", "angry", "excited", "frustrated"]},
    "mosi": {"task": "regression", "classes": None},
    "mosei": {"task": "regression", "classes": None},
}


@dataclass
class ImportConfig:
    """Everything the import reads; its hash goes into every table's metadata."""

    format: str  # gcnet | mmsa
    dataset: str  # iemocap4 | iemocap6 | mosi | mosei
    label_path: str | None = None  # gcnet
    feature_dirs: dict[str, str] = field(default_factory=dict)  # gcnet: audio/text/video folders
    pickle_path: str | None = None  # mmsa
    classes: list[str] | None = None  # None = dataset default
    max_len: dict[str, int | None] = field(default_factory=dict)  # a/t/v: cap on T (None = longest seen)
    face_reduce: str = "mean"  # mean | stack (per-face folders)
    nonfinite: str = "zero"  # zero | missing
    aligned: str | bool = "auto"  # mmsa: auto from the file name
    pickle_encoding: str = "latin1"
    batch_rows: int = 2048
    max_missing_share: float = 0.5  # per modality; above it the layout is wrong, not the data
    on_all_missing: str = "error"  # gcnet ids with no feature file in any modality: error | drop

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ImportConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(params) - known - {"manifest_out", "features_dir"})
        if unknown:
            raise KeyError(f"params.yaml import: unknown keys {unknown}; known: {sorted(known | {'manifest_out', 'features_dir'})}")
        cfg = cls(**{k: v for k, v in params.items() if k in known})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.format not in ("gcnet", "mmsa"):
            raise ValueError(f"import.format must be 'gcnet' or 'mmsa', got {self.format!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"import.dataset must be one of {list(DATASETS)}, got {self.dataset!r}")
        if self.format == "mmsa" and DATASETS[self.dataset]["task"] != "regression":
            raise ValueError(f"MMSA pickles carry CMU-MOSI/MOSEI sentiment; dataset {self.dataset!r} is not available in that format")
        if self.face_reduce not in ("mean", "stack") or self.nonfinite not in ("zero", "missing"):
            raise ValueError("import.face_reduce must be mean|stack and import.nonfinite zero|missing")
        if self.on_all_missing not in ("error", "drop"):
            raise ValueError(f"import.on_all_missing must be error|drop, got {self.on_all_missing!r}")

    def class_names(self) -> list[str] | None:
        if DATASETS[self.dataset]["task"] == "regression":
            return None
        return list(self.classes or DATASETS[self.dataset]["classes"])

    def cap(self, modality: str) -> int | None:
        value = self.max_len.get(LETTER_OF_MANIFEST[modality]) if self.max_len else None
        return None if value is None else int(value)


def batch_rows(limit: int, seq_len: int, dim: int, max_bytes: int = 64 << 20) -> int:
    """Rows per record batch: at most `limit`, and at most `max_bytes` of padded float32 sequence."""
    return max(1, min(int(limit), max_bytes // max(1, seq_len * dim * 4)))
