"""The method registry: `train.method` -> network class, and the one interface every method keeps.

Every method is an `nn.Module` built from a `ModelConfig` (`config.method` names it)
and exposes the same surface to training, evaluation, registration and serving:

- `forward(features, lengths, mask, combination) -> ModelOutput`
  (`prediction` (B, n_outputs), plus the representations a loss may need);
- `parameter_counts() -> {"total", "trainable", ...}`;
- `STAGES` (the training stages it knows) and `set_stage(stage)`, which sets which
  parameter groups are trainable in that stage;
- `set_input_statistics(stats)` (train-split standardisation stored as buffers).

Nothing outside `pipeline/methods/` names a method class: it asks `build_network`.
Adding a method = one module here, one line in `METHODS`, its tests.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch.nn as nn

# method name -> "module:Class"; imported lazily so serving loads only what it runs
METHODS: dict[str, str] = {
    "mculora": "pipeline.methods.mculora:MCULoRANet",
    "mplmm": "pipeline.methods.mplmm:MPLMMNet",
    "wander": "pipeline.methods.wander:WanderNet",
}


def method_class(name: str) -> type[nn.Module]:
    if name not in METHODS:
        raise ValueError(f"unknown train.method {name!r}; registered: {', '.join(METHODS)}")
    module_name, cls_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_network(config: Any) -> nn.Module:
    """The network of `config.method`, freshly initialised (with a dialogue context encoder in
    front of its head when `config.context == "dialogue"`, see pipeline/methods/context.py)."""
    net = method_class(config.method)(config)
    if getattr(config, "context", "utterance") == "dialogue":
        from pipeline.methods.context import attach_context

        attach_context(net)
    return net


def default_model_name(method: str) -> str:
    """Registry model name when `register.model_name` is null: one registered model per method."""
    return f"imer-{method}"
