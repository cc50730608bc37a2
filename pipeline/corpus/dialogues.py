"""Conversations: the utterances of a session arranged as two-speaker dialogues, with emotional inertia.

The clip plan (who says what, in which order, with which per-clip seed) is drawn
first and is never changed here. This module only *arranges* the planned clips:
within a session, two speakers take turns; each speaker's utterances are used in
their planned order (`<speaker>_0001`, `_0002`, ...). Dialogue lengths and the pairing
come from their own RNG stream, so the arrangement leaves every clip as planned.

Inertia: in turn order, with probability `inertia` an utterance takes the emotion of
an earlier turn of its dialogue, the speaker's own last turn (persisting) or the
partner's last turn (following), half and half; otherwise it keeps its independent
draw. The first turn always keeps its draw. Copying from a turn whose emotion has the
class shares of the independent draws keeps those shares, so the classes stay balanced
in expectation. The uniforms behind the decisions are drawn once per clip whatever
`inertia` is, so raising it only adds copies (at 0 nothing changes: today's labels).
"""
from __future__ import annotations

from typing import Any

import numpy as np

DIALOGUE_STREAM = 3001  # pairing and lengths
INERTIA_STREAM = 3011  # copy decisions


def arrange_dialogues(jobs: list[dict[str, Any]], seed: int, stream: int, mean_turns: float, inertia: float) -> None:
    """Set `dialogue` and `turn` on every job of one domain and apply inertia to its `label`, in place."""
    rng = np.random.default_rng([seed, DIALOGUE_STREAM, stream])
    queues: dict[str, dict[str, list[int]]] = {}  # session -> speaker -> job indices in planned order
    for i, job in enumerate(jobs):
        sp = job["speaker"]
        queues.setdefault(sp["session"], {}).setdefault(sp["speaker_id"], []).append(i)
    dialogues: list[list[int]] = []
    for session in sorted(queues):
        for k, turns in enumerate(_session_dialogues(queues[session], rng, mean_turns)):
            dialogues.append(turns)
            for t, i in enumerate(turns):
                jobs[i]["dialogue"] = f"{session}_d{k + 1:03d}"
                jobs[i]["turn"] = t
    _apply_inertia(jobs, dialogues, np.random.default_rng([seed, INERTIA_STREAM, stream]), inertia)


def _session_dialogues(queues: dict[str, list[int]], rng: np.random.Generator, mean_turns: float) -> list[list[int]]:
    """Cut one session's utterances into dialogues; each dialogue is its job indices in turn order.

    Each dialogue pairs the two speakers with the most utterances left (random among ties)
    and opens with the one who has more left, so speakers stay even and every dialogue
    alternates. A speaker left alone (an odd speaker count, or one voice left at the end)
    speaks a monologue. Lengths: 1 + Poisson(mean_turns - 1), cut at what is left.
    """
    left = {name: list(q) for name, q in queues.items()}
    out: list[list[int]] = []
    while any(left.values()):
        names = [n for n in left if left[n]]
        order = rng.permutation(len(names))
        ranked = sorted(range(len(names)), key=lambda j: (-len(left[names[j]]), order[j]))
        pair = [names[j] for j in ranked[:2]]
        length = 1 + int(rng.poisson(max(mean_turns - 1.0, 0.0)))
        turns: list[int] = []
        for t in range(length):
            speaker = pair[t % len(pair)]
            if not left[speaker]:
                break
            turns.append(left[speaker].pop(0))
        out.append(turns)
    return out


def _apply_inertia(jobs: list[dict[str, Any]], dialogues: list[list[int]], rng: np.random.Generator, inertia: float) -> None:
    """Copy emotions along each dialogue (see the module docstring); uniforms drawn per clip in job order."""
    copy_u, source_u = rng.random(len(jobs)), rng.random(len(jobs))  # (N,), (N,) fixed whatever inertia is
    if inertia <= 0:
        return
    for turns in dialogues:
        last: dict[str, int] = {}  # speaker -> job index of their latest turn so far
        for i in turns:
            speaker = jobs[i]["speaker"]["speaker_id"]
            own = last.get(speaker)
            partner = next((j for s, j in last.items() if s != speaker), None)
            if (own is not None or partner is not None) and copy_u[i] < inertia:
                if own is None or partner is None:
                    source = own if own is not None else partner
                else:
                    source = own if source_u[i] < 0.5 else partner
                jobs[i]["label"] = jobs[source]["label"]
            last[speaker] = i


def dialogue_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Dialogue facts for corpus.json: how many, turns per dialogue, share of turns repeating the previous emotion."""
    by_dialogue: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        by_dialogue.setdefault(r["dialogue"], []).append((r["turn"], r["label"]))
    lengths = [len(v) for v in by_dialogue.values()]
    pairs = same = 0
    for turns in by_dialogue.values():
        labels = [label for _, label in sorted(turns)]
        pairs += len(labels) - 1
        same += sum(a == b for a, b in zip(labels, labels[1:]))
    return {
        "dialogues": len(by_dialogue),
        "turns_mean": round(float(np.mean(lengths)), 2) if lengths else 0.0,
        "turns_max": max(lengths, default=0),
        "same_emotion_as_previous_turn": round(same / pairs, 4) if pairs else 0.0,
    }
