"""A tiny real corpus for tests: other test files build their fixtures with this."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.corpus.config import CorpusConfig
from pipeline.corpus.generate import LISTING_NAME, generate_corpus


def tiny_config(n: int = 32, seed: int = 7, breakage_share: float = 0.0, **overrides: Any) -> CorpusConfig:
    """Small but complete: 2 sessions x 2 speakers, short clips, every class present.

    Profile `balanced` unless overridden: test fixtures keep their bytes whatever the default run uses."""
    values: dict[str, Any] = {
        "profile": "balanced",
        "seed": seed,
        "utterances": n,
        "sessions": 2,
        "speakers_per_session": 2,
        "min_duration_s": 1.5,
        "max_duration_s": 2.0,
        "breakage_share": breakage_share,
        "shifted_utterances": max(8, n // 4),
        "shifted_sessions": 1,
        "workers": 1,
    }
    values.update(overrides)
    return CorpusConfig.from_dict(values)


def make_tiny_corpus(tmp_dir: Path, n: int = 32, seed: int = 7, breakage_share: float = 0.0, **overrides: Any) -> Path:
    """Generate a tiny corpus under `tmp_dir` and return the path of its listing.parquet."""
    config = tiny_config(n=n, seed=seed, breakage_share=breakage_share, **overrides)
    generate_corpus(config, Path(tmp_dir), progress=False)
    return Path(tmp_dir) / LISTING_NAME
