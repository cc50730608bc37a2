"""Conversations in prediction input: the optional `dialogue`, `turn` and `speaker` columns.

Rows that share a `dialogue` value are one conversation, ordered by `turn` (whole numbers
>= 0; ties, or no `turn` column at all, by row order); `speaker` ids name who says each
utterance (roles are numbered by first appearance inside the dialogue; a row without a
speaker is an unknown speaker, one role shared inside its dialogue). A row without a
dialogue value is a dialogue of its own, whatever its speaker. A `turn` is a position
inside a dialogue: a `turn` column without `dialogue`, a turn on a row without a dialogue,
or a dialogue row without its turn (when the column is given) is an error, as in the
manifest. Dialogue ids compare as text (`7` and `"7"` are one dialogue).

Only models trained with `train.context: dialogue` read the structure; utterance models
ignore it. Either way the output echoes `dialogue` and `turn` as they were given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipeline.formats.manifest import DIALOGUE_COLUMNS, parse_turn
from pipeline.methods.context import DialogueLayout, dense_layout

CONVERSATION_COLUMNS = (*DIALOGUE_COLUMNS, "speaker")  # the manifest's dialogue columns plus who speaks
ECHOED = ("dialogue", "turn")  # copied from the input to the output, as given


@dataclass
class Conversations:
    """Where each input row sits in its conversation (row order = input order)."""

    group: np.ndarray  # (N,) int64 dialogue code; a row without a dialogue has a code of its own
    turn: np.ndarray  # (N,) int64 turn (0 where there is no turn column: row order decides)
    speaker: np.ndarray  # (N,) str speaker id, "" = not given
    echo: dict[str, list[Any]]  # `dialogue` / `turn` columns as given

    def layout(self, local: np.ndarray) -> DialogueLayout:
        """The layout of rows `local` (whole dialogues) for `route(..., dialogue=)`."""
        return dense_layout(self.group[local], self.turn[local], self.speaker[local])


def read_conversations(frame: pd.DataFrame, source: str = "serving input") -> Conversations | None:
    """The conversations of `frame`'s rows, or None without a `dialogue` column (each row its own).

    Bad values raise ValueError naming `source`, the row (1-based) and the column.
    """
    if "dialogue" not in frame.columns:
        if "turn" in frame.columns:
            raise ValueError(f"{source}: column 'turn' without a 'dialogue' column; a turn is a position "
                             "inside a dialogue")
        return None
    n = len(frame)
    ids = [_text(v) for v in frame["dialogue"].tolist()]
    has = np.array([d is not None for d in ids], dtype=bool)  # (N,)
    group = np.empty(n, dtype=np.int64)
    if has.any():
        group[has] = np.unique(np.array([d for d in ids if d is not None], dtype=object).astype(str),
                               return_inverse=True)[1].reshape(-1)
    start = int(group[has].max()) + 1 if has.any() else 0
    group[~has] = start + np.arange(int((~has).sum()))  # a dialogue of one each
    turn = _turns(frame["turn"].tolist(), has, source) if "turn" in frame.columns else np.zeros(n, dtype=np.int64)
    speaker = np.array([_text(v) or "" for v in (frame["speaker"].tolist() if "speaker" in frame.columns
                                                 else [None] * n)], dtype=object).astype(str)
    echo = {c: frame[c].tolist() for c in ECHOED if c in frame.columns}
    return Conversations(group, turn, speaker, echo)


def _turns(values: Sequence[Any], has_dialogue: np.ndarray, source: str) -> np.ndarray:
    """(N,) int64 turns; 0 on rows without a dialogue (which must have no turn)."""
    out = np.zeros(len(values), dtype=np.int64)
    for i, (value, inside) in enumerate(zip(values, has_dialogue.tolist())):
        given = _text(value)
        where = f"{source}: row {i + 1}, column 'turn'"
        if given is None:
            if inside:
                raise ValueError(f"{where}: empty on a row of a dialogue; give every utterance of a dialogue "
                                 "its turn, or leave out the column to order by rows")
            continue
        if not inside:
            raise ValueError(f"{where}: {given!r} on a row without a dialogue; a turn is a position inside a dialogue")
        number = parse_turn(given)
        if number is None:
            raise ValueError(f"{where}: {given!r} is not a whole number >= 0")
        out[i] = number
    return out


def _text(value: Any) -> str | None:
    """A given value as stripped text; None for null, NaN and blank."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    text = str(value).strip()
    return text or None


def echo_columns(frame: pd.DataFrame, conversations: Conversations | None) -> pd.DataFrame:
    """`frame` (one row per input row) with the echoed `dialogue` / `turn` columns in front."""
    if conversations is None:
        return frame
    for col in reversed(ECHOED):
        if col in conversations.echo:
            frame.insert(0, col, conversations.echo[col])
    return frame
