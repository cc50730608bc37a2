"""The embedded default corpus: real audio, video and transcript files with known emotion.

`generate_corpus(config, out_dir)` is the one pure entry point; `stage.py` wires it to
`params.yaml: corpus`.
"""
from pipeline.corpus.config import CorpusConfig
from pipeline.corpus.generate import LISTING_NAME, generate_corpus

__all__ = ["CorpusConfig", "LISTING_NAME", "generate_corpus"]
