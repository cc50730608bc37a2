"""A training plan: the stages a method trains in, in order (see pipeline/methods/registry.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StagePlan:
    name: str  # a stage the network knows (`net.STAGES`); `net.set_stage(name)` sets what trains
    epochs: int  # maximum epochs of this stage
    sampler: str  # a key of pipeline.training.samplers.SAMPLERS ("dropout", "homogeneous", ...)
    dpft: bool = False  # DPFT re-weights the sampler's combination probabilities after each epoch
    select: bool = False  # keep this stage's best validation epoch (early stopping on it); normally the last
    cache_key: dict[str, Any] | None = None  # store the state after this stage; reuse it when the key recurs
    sampler_options: dict[str, Any] | None = None  # keyword options for the sampler (e.g. MPLMM's eta)
    history_name: str | None = None  # name in the history / plots (default: `name`)

    @property
    def label(self) -> str:
        return self.history_name or self.name


def check_plan(plan: list[StagePlan], stages: tuple[str, ...]) -> None:
    """Exactly one selected stage, the last; every stage known to the network."""
    if not plan:
        raise ValueError("a training plan needs at least one stage")
    unknown = [p.name for p in plan if p.name not in stages]
    if unknown:
        raise ValueError(f"training plan names unknown stages {unknown}; the network knows {stages}")
    if [p.select for p in plan] != [False] * (len(plan) - 1) + [True]:
        raise ValueError("exactly the last stage of a training plan must have select=True")
