"""TrainConfig: the `train` section of params.yaml as typed dataclasses that own every default.

`params.yaml` shows every key with the same value as the default here (a test checks
that the two agree); an unknown key is an error that names it, so a typo never falls
back silently to a default. Method- and option-specific sections (`mplmm`, `wander`,
`cggm`) stay plain mappings here and are validated by the component that reads them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.core.params import build_config

REGIMES = ("from_scratch", "two_stage")
OPTION_SECTIONS = ("mplmm", "wander", "cggm")  # free-form sections, validated by their owners


@dataclass
class ModelParams:
    d_model: int = 64  # width of every modality encoder
    n_layers: int = 1  # transformer layers per modality
    n_heads: int = 4
    d_fusion: int = 128  # width after fusing [h_a; h_t; h_v]
    dropout: float = 0.1
    adapt_targets: tuple[str, ...] = ("input", "encoder_mlp", "fusion", "head", "context")  # where MCLA adapters sit
    mixed_mode: str = "group"  # mixed-combination batches: group rows by combination, or gather adapters


@dataclass
class LoraParams:
    rank: int = 4
    alpha: float = 8.0  # scaling = alpha / rank
    dropout: float = 0.0


@dataclass
class DPFTParams:
    mode: str = "separability"  # separability | uniform | val_accuracy
    eta: float = 0.1  # step size of the multiplicative q update
    q_min: float = 0.05
    q_max: float = 0.4
    monitor_size: int = 256  # fixed TRAINING monitoring subset for separability


@dataclass
class ContextParams:
    """The context encoder of `context: dialogue` (pipeline/methods/context.py)."""
    n_layers: int = 1  # transformer layers over a dialogue's turns
    n_heads: int | None = None  # None = model.n_heads
    causal: bool = False  # true: a turn sees only earlier turns (online use, later turns unknown)
    max_turns: int = 128  # learned turn positions; later turns share the last one
    max_speakers: int = 4  # speaker roles (order of first appearance in the dialogue)


@dataclass
class MLflowParams:
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "imer"
    artifact_root: str = "mlartifacts"


@dataclass
class TrainConfig:
    manifest: str = "data/manifest.parquet"
    features_dir: str = "data/features"
    splits_dir: str = "data/splits"
    out_dir: str = "."  # writes models/ and reports/ under it
    seed: int = 20261125
    num_threads: int = 1  # torch intra-op threads (0 = torch default); 1 is fastest at this model size
    method: str = "mculora"  # a key of pipeline.methods.registry.METHODS
    regime: str = "from_scratch"  # from_scratch | two_stage (MCULoRA)
    stage1_epochs: int = 10  # epochs of a method's stage 1 (two_stage, MPLMM, Wander)
    variant: str = "mculora"  # MCULoRA ablations: mculora | no_specific | plain
    standardise_inputs: bool = True  # per-feature (x - mean) / std fitted on train frames, stored in the model
    min_modality_share: float = 0.05  # a modality exists for the dataset if present in >= this share of train rows
    max_epochs: int = 30
    patience: int = 8  # early stopping on the validation selection metric
    batch_size: int = 32
    val_batch_size: int = 256
    lr: float = 0.001
    weight_decay: float = 0.01
    lambda_ort: float = 0.1  # MCULoRA orthogonality loss weight
    regression_loss: str = "l1"  # l1 | mse
    selection_metric: str | None = None  # None = the task's default (pipeline.core.metrics)
    context: str = "utterance"  # utterance | dialogue (conversation context across utterances)
    model: ModelParams = field(default_factory=ModelParams)
    context_encoder: ContextParams = field(default_factory=ContextParams)
    lora: LoraParams = field(default_factory=LoraParams)
    dpft: DPFTParams = field(default_factory=DPFTParams)
    mlflow: MLflowParams = field(default_factory=MLflowParams)
    mplmm: dict[str, Any] = field(default_factory=dict)
    wander: dict[str, Any] = field(default_factory=dict)
    cggm: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"train.regime must be one of {REGIMES}, got {self.regime!r}")
        if not 0.0 <= self.min_modality_share <= 1.0:
            raise ValueError(f"train.min_modality_share must lie in [0, 1], got {self.min_modality_share}")
        self.model.adapt_targets = tuple(self.model.adapt_targets)
        from pipeline.methods.config import CONTEXTS

        if self.context not in CONTEXTS:
            raise ValueError(f"train.context must be one of {CONTEXTS}, got {self.context!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_params(cls, section: Mapping[str, Any]) -> "TrainConfig":
        """Build from a `train` params section; unknown keys raise with their dotted name."""
        return build_config(cls, dict(section or {}), "train")

    @classmethod
    def load(cls, path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> "TrainConfig":
        """The real `train` section of `path`, with `overrides` merged in key by key (tests shrink it this way)."""
        from pipeline.core.params import deep_merge, load_params

        return cls.from_params(deep_merge(load_params("train", path), dict(overrides or {})))

    def options(self, name: str) -> dict[str, Any]:
        """A free-form option section (`mplmm`, `wander`, `cggm`) as a plain dict."""
        if name not in OPTION_SECTIONS:
            raise KeyError(f"train has no option section {name!r}; known {OPTION_SECTIONS}")
        return dict(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain builtins (for run params, hashes and summaries)."""
        d = asdict(self)
        d["model"]["adapt_targets"] = list(self.model.adapt_targets)
        return d
