"""`train.mplmm` options: defaults (params.yaml shows the same values, a test checks) and validation."""
from __future__ import annotations

import copy
from typing import Any

from pipeline.methods.mult import DROPOUT_KEYS
from pipeline.methods.prompts import GENERATORS, SIGNAL_PROMPTS, TYPE_PROMPT_INITS

# `train.mplmm` options and their defaults (params.yaml shows the same values with a comment each).
DEFAULTS: dict[str, Any] = {
    "backbone": "imer", "prompt_length": 16, "generator": "attention", "gen_tokens": None,
    "signal_prompts": "positional", "readout": None, "type_prompt_init": "small", "type_prompts": True,
    "stage1_sampler": "complete", "stage1_epochs": None, "stage1_from": None, "sampler": "eta", "eta": 0.7,
    "reinit_input_proj": False, "lambda_gen": 0.0, "frozen_dropout": False,
    "mult": {"d_model": 30, "n_layers": 5, "mem_layers": 5, "n_heads": 5, "causal": False,
             "dropout": {"attn": 0.1, "relu": 0.1, "res": 0.1, "embed": 0.25, "out": 0.1}},
}
CHOICES = {"backbone": ("imer", "mult"), "generator": GENERATORS, "signal_prompts": SIGNAL_PROMPTS,
           "readout": ("mean", "prompt"), "type_prompt_init": TYPE_PROMPT_INITS,
           "stage1_sampler": ("complete", "dropout"), "sampler": ("eta", "uniform7", "homogeneous")}
# train.mplmm.sampler -> pipeline.training.samplers.SAMPLERS key (stage 1's "complete" / "dropout" are keys already)
STAGE2_SAMPLER_KEY = {"eta": "eta", "uniform7": "dropout", "homogeneous": "homogeneous"}


def resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    """Defaults merged with `options` (nested for `mult`), validated; readout null -> the backbone's default."""
    def merge(base: dict, new: dict, where: str) -> dict:
        unknown = sorted(set(new) - set(base))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known {sorted(base)}")
        return {k: merge(v, dict(new[k] or {}), f"{where}.{k}") if isinstance(v, dict) and k in new
                else new.get(k, v) for k, v in base.items()}

    opts = merge(copy.deepcopy(DEFAULTS), dict(options or {}), "train.mplmm")
    if opts["readout"] is None:
        opts["readout"] = "mean" if opts["backbone"] == "imer" else "prompt"
    for key, allowed in CHOICES.items():
        if opts[key] not in allowed:
            raise ValueError(f"train.mplmm.{key} must be one of {allowed}, got {opts[key]!r}")
    if opts["backbone"] == "mult" and opts["stage1_sampler"] != "complete":
        raise ValueError("train.mplmm.stage1_sampler: dropout needs backbone imer (MulT's cross-attention "
                         "needs every source); use complete")
    if int(opts["prompt_length"]) < 1 or (opts["gen_tokens"] is not None and int(opts["gen_tokens"]) < 1):
        raise ValueError("train.mplmm.prompt_length and gen_tokens must be >= 1 (gen_tokens null = the cap)")
    if not 0.0 <= float(opts["eta"]) <= 1.0 or float(opts["lambda_gen"]) < 0:
        raise ValueError(f"train.mplmm: eta must lie in [0, 1] and lambda_gen >= 0, got {opts['eta']}, "
                         f"{opts['lambda_gen']}")
    mult = opts["mult"]
    if int(mult["d_model"]) % int(mult["n_heads"]):
        raise ValueError(f"train.mplmm.mult: d_model={mult['d_model']} not divisible by n_heads={mult['n_heads']}")
    if set(mult["dropout"]) != set(DROPOUT_KEYS):
        raise ValueError(f"train.mplmm.mult.dropout needs keys {DROPOUT_KEYS}")
    return opts
