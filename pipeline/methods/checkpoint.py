"""Save/load a model as one plain-dict torch file, loadable with torch.load(weights_only=True)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.core.atomic import atomic_path
from pipeline.methods.config import ModelConfig
from pipeline.methods.registry import build_network

FORMAT = "imer-model/2"  # {format, method, config, state_dict, extra}
LEGACY_FORMATS = ("imer-mculora/1",)  # MCULoRA-only checkpoints from before the method registry


def save_model(path: str | os.PathLike, model: torch.nn.Module, extra: dict[str, Any]) -> None:
    """Write {format, config, state_dict, extra} atomically; `extra` must hold builtins/tensors only."""
    payload = {"format": FORMAT, "method": model.config.method, "config": model.config.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "extra": dict(extra)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network from the stored config and weights (eval mode); returns (model, extra)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file or a pickle that is not weights-only safe
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({exc})") from exc
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if found not in (FORMAT, *LEGACY_FORMATS):
        raise ValueError(f"{path}: not an imer checkpoint (format {found!r}; expected {FORMAT} or {LEGACY_FORMATS})")
    config = dict(payload["config"])
    config.setdefault("method", payload.get("method", "mculora"))  # legacy files predate `method`
    model = build_network(ModelConfig.from_dict(config))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval(), payload["extra"]
