"""Where training keeps its files between steps: a temp folder under the project, and the stage cache.

Temporary checkpoints live under `<out_dir>/.imer/tmp/` (git-ignored, never the system temp dir),
removed when the run ends, also on error; a folder left by a killed trainer is removed by the next one. A stage whose plan sets `cache_key` stores its weights
under `<out_dir>/.imer/stage_cache/<hash>.pt`, keyed by that key plus the feature-table and split
hashes, the network config and the seed, and is restored instead of retrained when all match.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from pipeline.core.atomic import atomic_path
from pipeline.core.hashing import config_hash
from pipeline.core.processes import owned_tmpdir

WORK_DIR = ".imer"


@contextlib.contextmanager
def training_tmpdir(out_dir: str | Path) -> Iterator[Path]:
    """A fresh folder under `<out_dir>/.imer/tmp/`, removed on exit."""
    # named with this trainer's pid and start time; folders of trainers that were killed are removed here
    with owned_tmpdir(Path(out_dir) / WORK_DIR / "tmp") as path:
        yield path


class StageCache:
    """Stored weights of one stage, reusable when data, backbone config, seed and the stage all match.

    Only what the stage trains is stored (its trainable parameters) plus the buffers, and the key
    leaves out the method's options: runs that differ only in what a later stage adds (MPLMM's
    prompts, Wander's CP rank) share one stage 1. The method adds any stage-relevant option to the
    plan's `cache_key` (e.g. MPLMM's stage-1 sampler).
    """

    def __init__(self, out_dir: Path, stage: Any, cfg: Any, provenance: Mapping[str, Any], model: torch.nn.Module):
        features = {m: info.get("file_sha256") for m, info in (provenance.get("features") or {}).items()}
        config = model.config.to_dict()
        for name in ("extra", "options", "method"):  # the backbone, not what later stages add
            config.pop(name, None)
        self.trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        shapes = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        key = {"stage": stage.name, "key": stage.cache_key, "features": features, "epochs": stage.epochs,
               "sampler": stage.sampler, "sampler_options": stage.sampler_options,
               "splits": provenance.get("splits_hash"), "manifest": provenance.get("manifest_sha256"),
               "config": config, "seed": cfg.seed, "lr": cfg.lr, "batch_size": cfg.batch_size,
               "weight_decay": cfg.weight_decay, "standardise": cfg.standardise_inputs, "trained": shapes}
        if cfg.cggm.get("enabled"):  # CGGM changes what a stage learns; absent when off (old keys stay valid)
            key["cggm"] = dict(cfg.cggm)
        self.key = key
        self.path = Path(out_dir) / WORK_DIR / "stage_cache" / f"{config_hash(key)}.pt"

    def restore(self, model: torch.nn.Module) -> bool:
        """Load the stored weights into `model`; False when there are none (then train and `store`)."""
        if not self.path.exists():
            return False
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        if payload.get("key_hash") != config_hash(self.key):
            return False
        own = model.state_dict()
        stored = payload["state_dict"]
        if any(k not in own or own[k].shape != v.shape for k, v in stored.items()):
            return False  # another network layout under the same key: retrain rather than guess
        model.load_state_dict(stored, strict=False)
        return True

    def store(self, model: torch.nn.Module) -> None:
        buffers = {n for n, _ in model.named_buffers()}
        keep = set(self.trained) | buffers
        payload = {"key_hash": config_hash(self.key),
                   "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items() if k in keep}}
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)
