"""Extractor recipes that travel with a model, and the check that today's code rebuilds them exactly.

Every feature table records the recipe of its extractor (`meta["extractor"]`: modality,
code version, config) and its `config_hash`; training keeps the hashes in the
checkpoint (`extra["feature_config_hashes"]`, keyed by modality letter). To predict on
new media the extractors are rebuilt from those recipes, and a rebuilt extractor whose
hash is not the one the model was trained on is refused: its numbers would not be the
numbers the model learnt from (a changed extractor version, config or model files).

Where recipes come from, first hit wins: `extra["feature_recipes"]` in the checkpoint,
then the feature tables of a features directory whose `config_hash` matches.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

from features.base import Extractor
from features.registry import EXTRACTORS, build_extractor
from pipeline.core.modalities import MODALITY_ORDER, TABLE_NAME

RECIPE_FILE = "extractors.json"  # the artifact a logged model carries: {"recipes": {...}, "hashes": {...}}
RECIPE_META_KEYS = ("modality", "version")  # recipe keys that are not extractor config


class RecipeMismatch(ValueError):
    """The extractor this code builds is not the one the model was trained on."""


def recipe_config(recipe: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(extractor name, config) of a stored recipe; keys the extractor does not accept (notes) are dropped."""
    if "modality" not in recipe or "version" not in recipe:
        raise RecipeMismatch(f"the model's features were not made by an extractor ({dict(recipe)}), e.g. imported "
                             "benchmark features: it can only answer feature rows")
    name = str(recipe["modality"])
    if name not in EXTRACTORS:
        raise RecipeMismatch(f"recipe names extractor {name!r}, which this code does not have ({', '.join(EXTRACTORS)})")
    module_name, cls_name = EXTRACTORS[name].split(":")
    defaults = getattr(importlib.import_module(module_name), cls_name).defaults
    return name, {k: v for k, v in recipe.items() if k in defaults and k not in RECIPE_META_KEYS}


def build_checked(recipes: Mapping[str, Mapping[str, Any]], hashes: Mapping[str, str | None],
                  letters: tuple[str, ...]) -> dict[str, Extractor]:
    """One (not yet set up) extractor per modality letter in `letters`, each checked against its hash."""
    out: dict[str, Extractor] = {}
    for m in letters:
        if m not in recipes:
            raise RecipeMismatch(f"no extractor recipe for modality {m!r} ({TABLE_NAME[m]}) stored with the model; "
                                 "log the model again with its feature tables (or retrain) to predict on raw media")
        name, config = recipe_config(recipes[m])
        if name != TABLE_NAME[m]:
            raise RecipeMismatch(f"modality {m!r}: recipe is for {name!r}, expected {TABLE_NAME[m]!r}")
        ext = build_extractor(name, config)
        want = hashes.get(m)
        if not want:
            raise RecipeMismatch(f"{name} extractor: the model records no config hash for it, so features made now "
                                 "cannot be checked against the ones it was trained on")
        if ext.config_hash != want:
            raise RecipeMismatch(
                f"{name} extractor: config hash {ext.config_hash} differs from {want}, the one the model was trained on "
                f"(recipe version {recipes[m].get('version')}, this code's version {ext.version}); features made now "
                "would not be the model's inputs: re-extract and retrain, or use the imer version that trained it")
        out[m] = ext
    return out


def recipes_from_tables(features_dir: str | Path, hashes: Mapping[str, str | None]) -> dict[str, dict[str, Any]]:
    """Recipes of the tables under `features_dir` whose config_hash is the model's (others are skipped)."""
    from pipeline.formats.feature_table import read_feature_table

    found: dict[str, dict[str, Any]] = {}
    for m in MODALITY_ORDER:
        path = Path(features_dir) / f"{TABLE_NAME[m]}.arrow"
        if not path.exists():
            continue
        meta = read_feature_table(path, memory_map=True).meta
        if meta.get("extractor") and hashes.get(m) and meta.get("config_hash") == hashes.get(m):
            found[m] = dict(meta["extractor"])
    return found


def model_recipes(extra: Mapping[str, Any], features_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The recipes stored with a checkpoint, completed from matching feature tables under `features_dir`."""
    hashes = extra.get("feature_config_hashes") or {}
    recipes = {m: dict(r) for m, r in (extra.get("feature_recipes") or {}).items() if r}
    if features_dir is not None and len(recipes) < len(MODALITY_ORDER):
        for m, r in recipes_from_tables(features_dir, hashes).items():
            recipes.setdefault(m, r)
    return recipes
