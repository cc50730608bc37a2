"""Transcripts from a small grammar: some carry emotion cue words, most of the rest do not.

Three kinds of sentence, drawn per clip: `cue` (content plus a cue phrase of the true
class), `plain` (content only, the same distribution for every class) and
`misleading` (a cue phrase of another class, as in sarcasm or reported speech).
The shares set how much the text alone can know.
"""
from __future__ import annotations

import numpy as np

SUBJECTS = ("I", "we", "my sister", "the manager", "our neighbour", "my friend", "the team", "he", "she", "they")
VERBS = ("moved", "checked", "painted", "sold", "booked", "cancelled", "found", "fixed", "cleaned", "signed")
OBJECTS = (
    "the car", "the kitchen", "the tickets", "the old house", "the report", "the garden", "the contract",
    "the flat", "the bike", "the schedule", "the boxes", "the letter",
)
TIMES = ("yesterday", "this morning", "last week", "on Tuesday", "after lunch", "before the holidays", "today", "tonight")

# Cue phrases per class. Neutral cues are flat, matter-of-fact markers.
CUES: dict[str, tuple[str, ...]] = {
    "neutral": (
        "That is fine, nothing special.", "It was an ordinary day.", "Okay, that is the plan.",
        "It is all as usual.", "Nothing much to say about it.", "That is just how it works.",
    ),
    "happy": (
        "I am so happy about it!", "This is wonderful news!", "I love it, it is amazing!",
        "We are thrilled!", "What a great day!", "I am delighted, honestly.",
    ),
    "sad": (
        "I feel so sad about it.", "I miss how it used to be.", "It breaks my heart.",
        "I am so lonely now.", "I could not stop crying.", "It is all so hopeless.",
    ),
    "angry": (
        "This is absolutely unacceptable!", "I am furious about it!", "How dare they do that!",
        "I am sick of this!", "It is ridiculous, I hate it!", "I am so angry right now!",
    ),
}
KINDS = ("cue", "plain", "misleading")


def sentence_for(
    label: str, classes: tuple[str, ...], rng: np.random.Generator, cue_share: float, misleading_share: float
) -> tuple[str, str]:
    """Return (transcript, kind) for a clip of class `label`; misleading cues come from the other `classes`."""
    kind = KINDS[int(rng.choice(3, p=[cue_share, 1 - cue_share - misleading_share, misleading_share]))]
    content = _content(rng)
    if kind == "plain":
        return content, kind
    if kind == "cue":
        cue_class = label
    else:
        others = [c for c in classes if c != label]
        cue_class = others[int(rng.integers(len(others)))]
    phrases = CUES.get(cue_class) or (f"It feels {cue_class}.",)
    cue = phrases[int(rng.integers(len(phrases)))]
    return (f"{content} {cue}" if rng.random() < 0.7 else f"{cue} {content}"), kind


def _content(rng: np.random.Generator) -> str:
    pick = lambda words: words[int(rng.integers(len(words)))]  # noqa: E731
    sentence = f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)} {pick(TIMES)}."
    return sentence[0].upper() + sentence[1:]
