"""The prediction function shared by `imer predict` and the served pyfunc.

Two kinds of input, one routing rule (`pipeline.methods.routing.route`, natural
missingness, nothing usable -> the training prior):
- feature rows: per modality m in (a, t, v) `{m}_features` (flattened (T, d_m) list),
  `{m}_length`, `{m}_present`, for callers that extract themselves;
- media rows: per manifest family (audio, video, text) `{family}_path` (a file the
  server can read) or `{family}_b64` (the file's bytes, base64), and `text` (the
  transcript itself); optional `utterance_id`. The model's own extractors run on them.

Either kind may carry a conversation (`pipeline.serving.dialogues`): optional `dialogue`
(rows sharing it are one dialogue; a row without one is a dialogue of its own), `turn`
(order inside the dialogue, ties by row order) and `speaker` (speaker ids; roles by first
appearance). A model trained with `train.context: dialogue` then reads each utterance in its
dialogue's context: rows are routed in batches of whole dialogues (`training.grouping.batch_rows`),
so a dialogue is never split across two forward passes and rows of different dialogues never
see each other. Utterance models ignore these columns; a lone utterance is a dialogue of one.

Output, one row per input row, in input order (`dialogue` and `turn` echoed when given):
classification -> `label` + `prob_<class>`; regression -> `score`; always `combination`
(the adapter set used, "none" when the prior answered) and `used_prior`; for media rows
also `utterance_id` and per family `<family>_status` ("present" or why it is missing) and
`<family>_detail`.
"""
from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.core.modalities import COMBINATIONS, MANIFEST_NAME, MODALITY_ORDER
from pipeline.methods.context import reads_dialogue
from pipeline.methods.routing import model_modalities, route
from pipeline.serving.dialogues import CONVERSATION_COLUMNS, Conversations, echo_columns, read_conversations
from pipeline.serving.media import SUFFIXES, Extracted, MediaExtractor, MediaItem
from pipeline.serving.recipes import build_checked
from pipeline.training.grouping import batch_rows

FEATURE_COLUMNS = tuple(f"{m}_{k}" for m in MODALITY_ORDER for k in ("features", "length", "present"))
FAMILIES = tuple(MANIFEST_NAME[m] for m in MODALITY_ORDER)  # ("audio", "text", "video")
MEDIA_COLUMNS = ("utterance_id", "text", *(f"{f}_{k}" for f in FAMILIES for k in ("path", "b64")))
BATCH_SIZE = 256  # rows per forward pass (a longer dialogue is a pass of its own)


def predict_arrays(model: torch.nn.Module, features: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor],
                   present: np.ndarray, serving: Mapping[str, Any], conversations: Conversations | None = None,
                   batch_size: int = BATCH_SIZE) -> pd.DataFrame:
    """Route (N, T, d) features, (N,) lengths and (N, 3) presence through `model`; the output frame.

    A dialogue-context model reads `conversations` (None: every row a dialogue of its own),
    in batches of whole dialogues; output rows are in input order either way.
    """
    n = len(present)
    context = reads_dialogue(model) and conversations is not None
    width = len(serving["classes"]) if serving["task"] == "classification" else 1
    out, comb = np.zeros((n, width)), np.full(n, -1, dtype=np.int64)  # (N, K), (N,)
    for local in batch_rows(n, batch_size, conversations.group if context else None):
        idx = torch.as_tensor(local, dtype=torch.long)
        routed = route(model, {m: x.index_select(0, idx) for m, x in features.items()},
                       {m: x.index_select(0, idx) for m, x in lengths.items()}, np.asarray(present)[local],
                       np.ones(3, dtype=bool), serving["prior"],
                       dialogue=conversations.layout(local) if context else None)
        out[local], comb[local] = routed.output, routed.combination
    return echo_columns(output_frame(out, comb, serving), conversations)


def output_frame(out: np.ndarray, comb: np.ndarray, serving: Mapping[str, Any]) -> pd.DataFrame:
    """(N, K) outputs and (N,) combination indices (-1 = prior) -> label/probabilities or score, combination."""
    if serving["task"] == "classification":
        classes = list(serving["classes"])
        frame = pd.DataFrame({f"prob_{c}": out[:, k] for k, c in enumerate(classes)})
        frame.insert(0, "label", [classes[k] for k in out.argmax(axis=1)])
    else:
        frame = pd.DataFrame({"score": out[:, 0]})
    frame["combination"] = [COMBINATIONS[c] if c >= 0 else "none" for c in comb]
    frame["used_prior"] = np.asarray(comb) < 0
    return frame


def frame_from_arrays(features: Mapping[str, np.ndarray], lengths: Mapping[str, np.ndarray],
                      present: np.ndarray, conversation: Mapping[str, Sequence[Any]] | None = None) -> pd.DataFrame:
    """Feature rows from (N, T, d) arrays, (N,) lengths and (N, 3) presence; `conversation` adds
    any of the `dialogue` / `turn` / `speaker` columns ((N,) each)."""
    present = np.asarray(present, dtype=bool)
    cols: dict[str, Any] = {}
    for j, m in enumerate(MODALITY_ORDER):
        x = np.asarray(features[m], dtype=np.float32)
        flat = x.reshape(x.shape[0], -1)  # (N, T*d)
        cols[f"{m}_features"] = [row.astype(np.float64).tolist() if p else [] for row, p in zip(flat, present[:, j])]
        cols[f"{m}_length"] = np.where(present[:, j], np.asarray(lengths[m]), 0).astype(np.int64)
        cols[f"{m}_present"] = present[:, j]
    for col, values in (conversation or {}).items():
        if col not in CONVERSATION_COLUMNS:
            raise ValueError(f"conversation column {col!r} is not one of {list(CONVERSATION_COLUMNS)}")
        cols[col] = list(values)
    return pd.DataFrame(cols)


def arrays_from_frame(frame: pd.DataFrame, cfg: Any) -> tuple[dict, dict, np.ndarray]:
    """Feature rows -> ((N, T, d) tensors, (N,) lengths, (N, 3) presence), checked against the model's shapes."""
    absent = [c for c in FEATURE_COLUMNS if c not in frame.columns]
    if absent:
        raise ValueError(f"serving input: missing columns {absent}")
    n = len(frame)
    present = np.stack([frame[f"{m}_present"].fillna(False).to_numpy(dtype=bool) for m in MODALITY_ORDER], axis=1)  # (N, 3)
    feats, lens = {}, {}
    for j, m in enumerate(MODALITY_ORDER):
        t, d = cfg.seq_lens[m], cfg.input_dims[m]
        x = np.zeros((n, t * d), dtype=np.float32)  # (N, T*d)
        for i, row in enumerate(frame[f"{m}_features"]):
            if present[i, j] and row is not None and len(row):
                if len(row) != t * d:
                    raise ValueError(f"row {i}: {m}_features has {len(row)} values, expected T*d = {t}*{d}")
                x[i] = np.asarray(row, dtype=np.float32)
        feats[m] = torch.from_numpy(x.reshape(n, t, d))  # (N, T, d)
        length = frame[f"{m}_length"].fillna(0).to_numpy(dtype=np.int64)
        lens[m] = torch.as_tensor(np.where(present[:, j], length, 0), dtype=torch.long)
    return feats, lens, present


class Predictor:
    """A model, its serving info (task, classes, prior) and, when recipes are known, its extractors."""

    def __init__(self, model: torch.nn.Module, serving: Mapping[str, Any],
                 recipes: Mapping[str, Mapping[str, Any]] | None = None,
                 hashes: Mapping[str, str | None] | None = None) -> None:
        self.model = model.eval()
        self.serving = dict(serving)
        self.recipes = {m: dict(r) for m, r in (recipes or {}).items()}
        self.hashes = dict(hashes or {})
        self._media: MediaExtractor | None = None
        if self.recipes:  # refuse now, not at the first request: a mismatch is the model's problem
            self.media()

    def media(self) -> MediaExtractor:
        """The checked extractors (built once; heavy set-up happens on first use)."""
        if self._media is None:
            if not self.recipes:
                raise ValueError("this model carries no extractor recipes: it answers feature rows only")
            cfg = self.model.config
            letters = model_modalities(self.model)
            exts = build_checked(self.recipes, self.hashes, letters)
            shapes = {m: (cfg.seq_lens[m], cfg.input_dims[m]) for m in MODALITY_ORDER}
            self._media = MediaExtractor(exts, shapes)
        return self._media

    def predict_features(self, frame: pd.DataFrame) -> pd.DataFrame:
        conversations = read_conversations(frame)  # bad dialogue columns fail before any work
        feats, lens, present = arrays_from_frame(frame, self.model.config)
        return predict_arrays(self.model, feats, lens, present, self.serving, conversations)

    def predict_items(self, items: Sequence[MediaItem]) -> pd.DataFrame:
        """Extract what each utterance has, route, and report per modality what was used or why not."""
        conversations = read_conversations(pd.DataFrame([it.conversation for it in items], index=range(len(items))))
        got: Extracted = self.media().extract(items)
        feats = {m: torch.from_numpy(x) for m, x in got.features.items()}
        lens = {m: torch.from_numpy(x) for m, x in got.lengths.items()}
        out = predict_arrays(self.model, feats, lens, got.present, self.serving, conversations)
        out.insert(0, "utterance_id", [it.utterance_id for it in items])
        for family in FAMILIES:
            out[f"{family}_status"] = got.status[family]
            out[f"{family}_detail"] = got.detail[family]
        return out

    def predict_media_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Media rows (paths, base64 bytes or transcript text) -> predictions; bytes live in a temp dir."""
        known = (*MEDIA_COLUMNS, *FEATURE_COLUMNS, *CONVERSATION_COLUMNS)
        unknown = [c for c in frame.columns if c not in known]
        if unknown:
            raise ValueError(f"serving input: unknown columns {unknown}; media rows take "
                             f"{list(MEDIA_COLUMNS) + list(CONVERSATION_COLUMNS)}")
        with tempfile.TemporaryDirectory(prefix="imer-serve-") as tmp:
            items = [_row_item(i, row, Path(tmp)) for i, row in enumerate(frame.to_dict("records"))]
            return self.predict_items(items)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Feature rows when the frame has feature columns with data, else media rows."""
        media = [c for c in frame.columns if c in MEDIA_COLUMNS and c != "utterance_id" and frame[c].notna().any()]
        if media:
            return self.predict_media_frame(frame.drop(columns=[c for c in FEATURE_COLUMNS if c in frame.columns]))
        return self.predict_features(frame)


def _row_item(i: int, row: Mapping[str, Any], tmp: Path) -> MediaItem:
    uid = str(row.get("utterance_id") or f"row{i}")
    paths: dict[str, Path | None] = {}
    failures: dict[str, tuple[str, str]] = {}
    for family in FAMILIES:
        raw_path, blob = _given(row.get(f"{family}_path")), _given(row.get(f"{family}_b64"))
        if family == "text" and blob is None and _given(row.get("text")) is not None:
            blob = base64.b64encode(str(row["text"]).encode("utf-8")).decode("ascii")
        if blob is not None:
            target = tmp / f"{i}_{family}{SUFFIXES[family][0]}"
            try:
                target.write_bytes(base64.b64decode(blob, validate=True))
                paths[family] = target
            except (binascii.Error, ValueError) as exc:
                failures[family] = ("invalid_base64", f"{uid}: {family}_b64 is not base64 ({exc})")
        else:
            paths[family] = Path(raw_path) if raw_path is not None else None
    return MediaItem(uid, paths, failures, {c: row[c] for c in CONVERSATION_COLUMNS if c in row})


def _given(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None
