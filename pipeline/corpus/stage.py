"""Stage `corpus`: render the embedded default corpus from `params.yaml: corpus`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.corpus.config import CorpusConfig
from pipeline.corpus.generate import generate_corpus
from pipeline.core.params import load_params

SECTION = "corpus"


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Resolve the output folder and generate; the summary is what `imer corpus` prints."""
    config = CorpusConfig.from_dict(params)
    return generate_corpus(config, Path(config.out_dir))


def main() -> None:
    import json

    print(json.dumps(run_stage(load_params(SECTION)), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
