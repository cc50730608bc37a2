"""Model hyper-parameters as one dataclass, so a checkpoint can rebuild its network exactly."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

VARIANTS = ("mculora", "no_specific", "plain")
ADAPT_TARGETS = ("input", "encoder_mlp", "fusion", "head", "context")  # "context": dialogue mode only
CONTEXTS = ("utterance", "dialogue")  # train.context
CONTEXT_DEFAULTS = {"n_layers": 1, "n_heads": None, "causal": False, "max_turns": 128, "max_speakers": 4}
MIXED_MODES = ("group", "gather")


@dataclass
class ModelConfig:
    input_dims: dict[str, int]  # {"a": d_a, "t": d_t, "v": d_v}
    seq_lens: dict[str, int]  # max tokens per modality (size of the learned positional table)
    method: str = "mculora"  # key of pipeline.methods.registry.METHODS
    task: str = "classification"  # or "regression"
    n_outputs: int = 4  # classes, or 1 for regression
    d_model: int = 64  # D: width of every modality encoder
    n_layers: int = 1  # L transformer layers per modality
    n_heads: int = 4
    d_fusion: int = 128  # D_f: width after fusing [h_a; h_t; h_v]
    dropout: float = 0.1
    lora_rank: int = 4
    lora_alpha: float = 8.0  # scaling s = alpha / r = 2
    lora_dropout: float = 0.0
    variant: str = "mculora"  # "no_specific" = shared adapter only; "plain" = no adapters
    adapt_targets: tuple[str, ...] = ADAPT_TARGETS
    mixed_mode: str = "group"  # how mixed-combination batches are served: "group" or "gather"
    lambda_ort: float = 0.1  # carried for the trainer; the network itself does not use it
    lambda_uni: float = 0.0  # unimodal auxiliary heads are not implemented; must stay 0
    options: dict[str, Any] = field(default_factory=dict)  # method-specific settings (the method validates them)
    modalities: tuple[str, ...] = ("a", "t", "v")  # modalities the training split has (dataset-aware)
    context: str = "utterance"  # "dialogue": a context encoder over each dialogue's turns (methods/context.py)
    context_options: dict[str, Any] = field(default_factory=dict)  # n_layers, n_heads, causal, max_turns, max_speakers
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. feature config hash)

    def __post_init__(self) -> None:
        self.adapt_targets = tuple(self.adapt_targets)
        self.modalities = tuple(self.modalities)
        self.input_dims = {m: int(d) for m, d in self.input_dims.items()}
        self.seq_lens = {m: int(t) for m, t in self.seq_lens.items()}
        for m in ("a", "t", "v"):
            if m not in self.input_dims or m not in self.seq_lens:
                raise ValueError(f"ModelConfig: input_dims and seq_lens need keys a, t, v; got "
                                 f"{sorted(self.input_dims)} / {sorted(self.seq_lens)}")
        if self.task not in ("classification", "regression"):
            raise ValueError(f"ModelConfig.task must be classification|regression, got {self.task!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"ModelConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.mixed_mode not in MIXED_MODES:
            raise ValueError(f"ModelConfig.mixed_mode must be one of {MIXED_MODES}, got {self.mixed_mode!r}")
        unknown = set(self.adapt_targets) - set(ADAPT_TARGETS)
        if unknown:
            raise ValueError(f"ModelConfig.adapt_targets: unknown {sorted(unknown)}; allowed {ADAPT_TARGETS}")
        if self.context not in CONTEXTS:
            raise ValueError(f"ModelConfig.context must be one of {CONTEXTS}, got {self.context!r}")
        unknown = set(self.context_options) - set(CONTEXT_DEFAULTS)
        if unknown:
            raise ValueError(f"context options: unknown {sorted(unknown)}; allowed {sorted(CONTEXT_DEFAULTS)}")
        self.context_options = {**CONTEXT_DEFAULTS, **self.context_options}
        if int(self.context_options["max_turns"]) < 1 or int(self.context_options["max_speakers"]) < 1:
            raise ValueError("context options: max_turns and max_speakers must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lambda_uni != 0.0:
            raise ValueError("lambda_uni != 0: unimodal auxiliary heads are not implemented")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (tuples as lists) so torch.load(weights_only=True) accepts it."""
        d = asdict(self)
        d["adapt_targets"] = list(self.adapt_targets)
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)
