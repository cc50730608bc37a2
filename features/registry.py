"""Modality name -> extractor class, imported lazily so a worker loads only what it runs."""
from __future__ import annotations

import importlib
from typing import Any

from features.base import Extractor
from pipeline.core.modalities import MANIFEST_OF_TABLE

EXTRACTORS: dict[str, str] = {
    "acoustic": "features.acoustic:AcousticExtractor",
    "visual": "features.visual:VisualExtractor",
    "textual": "features.textual:TextualExtractor",
}
# The manifest column family each modality reads (audio_path, audio_missing, ...).
MANIFEST_MODALITY = MANIFEST_OF_TABLE


def build_extractor(modality: str, config: dict[str, Any]) -> Extractor:
    """A fresh (not yet set up) extractor for `modality`."""
    if modality not in EXTRACTORS:
        raise KeyError(f"unknown modality {modality!r}; known: {', '.join(EXTRACTORS)}")
    module_name, cls_name = EXTRACTORS[modality].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(config)
