"""The training loop: run a method's training plan with Lightning, select on validation, save.

`train_model` reads as its steps: prepare the views (and refuse test rows), find the
modalities and combinations the training split can form, build the registered
network, run each stage of its plan, keep the selected stage's best validation epoch,
then write the checkpoint, the summary, the history and the plot tables. The test
split never reaches this module.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.core.metrics import best_index, direction, selection_metric
from pipeline.core.modalities import COMBINATIONS, formable_combinations
from pipeline.core.params import config_hash
from pipeline.formats.split_store import SHIFTED_SPLITS
from pipeline.methods import ModelConfig, save_model
from pipeline.methods.registry import build_network
from pipeline.training import reports
from pipeline.training.cggm import build_cggm
from pipeline.training.config import TrainConfig
from pipeline.training.data import MultimodalData, feature_statistics, train_prior
from pipeline.training.dpft import DPFTController
from pipeline.training.lit_module import MethodModule
from pipeline.training.plan import StagePlan, check_plan
from pipeline.training.progress import EpochProgress
from pipeline.training.samplers import BatchDataset, BatchKey, make_sampler
from pipeline.training.workdir import StageCache, training_tmpdir

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LightningModule.*configure_optimizers.*")


class TestRowsInTraining(ValueError):
    """Raised when a view handed to training holds test rows (a data leak)."""


@dataclass
class TrainState:
    """What the stages of one run accumulate."""

    out_dir: Path = Path(".")  # where models/, reports/ and .imer/ (temp files, stage cache) go
    history: list[dict] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    sampler: Any = None  # the selected stage's sampler
    dpft: DPFTController | None = None
    cached: dict[str, str] = field(default_factory=dict)  # stage -> cache file it was restored from
    components: list | None = None  # training options plugged into MethodModule (CGGM), one per run
    notes: dict[str, dict] = field(default_factory=dict)  # stage -> what the network's prepare_stage reported


def build_model_config(data: MultimodalData, cfg: TrainConfig, modalities: tuple[str, ...]) -> ModelConfig:
    """ModelConfig from the data's dims and the train config (model.*, lora.*, variant, method options)."""
    return ModelConfig(
        input_dims=data.input_dims, seq_lens=data.seq_lens, task=data.task, n_outputs=data.n_outputs,
        d_model=cfg.model.d_model, n_layers=cfg.model.n_layers, n_heads=cfg.model.n_heads,
        d_fusion=cfg.model.d_fusion, dropout=cfg.model.dropout, lora_rank=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, variant=cfg.variant,
        adapt_targets=tuple(cfg.model.adapt_targets), mixed_mode=cfg.model.mixed_mode, lambda_ort=cfg.lambda_ort,
        method=cfg.method, options=cfg.options(cfg.method) if cfg.method in ("mplmm", "wander") else {},
        modalities=modalities, context=cfg.context,
        context_options=asdict(cfg.context_encoder) if cfg.context == "dialogue" else {},
        extra={"feature_config_hashes": {m: data.feature_meta[m].get("config_hash") for m in data.feature_meta}},
    )


def as_config(cfg: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    return cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_params(cfg)


def training_views(data: MultimodalData) -> tuple[MultimodalData, MultimodalData]:
    """The train and val views; a test row in either is a hard error (never an assert: -O keeps it)."""
    train, val = data.subset("train"), data.subset("val")
    held_out = ("test", *SHIFTED_SPLITS)  # the source test split and every shifted-domain row
    leaked = np.isin(train.view_split(), held_out).any() or np.isin(val.view_split(), held_out).any()
    if leaked:
        raise TestRowsInTraining("training was handed test or shifted-domain rows; load data with "
                                 "include=('train', 'val')")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"train needs non-empty train and val splits (got {len(train)} / {len(val)})")
    return train, val


def train_model(data: MultimodalData, cfg: TrainConfig | Mapping[str, Any], out_dir: str | Path,
                tracking: Any = None, extra_callbacks: list | None = None) -> dict:
    """Train on data's train split, select on its val split; write models/ and reports/ under out_dir.

    `extra_callbacks` (e.g. timers in benchmarks) join the selected stage's Lightning callbacks.
    """
    cfg, out_dir = as_config(cfg), Path(out_dir)
    _threads_and_seed(cfg)
    train, val = training_views(data)
    modalities = train.existing_modalities(cfg.min_modality_share)
    if not modalities:
        raise ValueError("no modality is present in the training split")
    train, val = train.restrict(modalities), val.restrict(modalities)
    combinations = formable_combinations(modalities)
    metric = selection_metric(data.task, cfg.selection_metric)
    model = build_network(build_model_config(data, cfg, modalities))
    if cfg.standardise_inputs:
        model.set_input_statistics(feature_statistics(train))  # train split only: no val/test statistic
    prior = train_prior(data)  # scores val samples left with no modality, exactly as evaluate does
    plan = model.training_plan(cfg)
    check_plan(plan, model.STAGES)
    state = TrainState(out_dir=out_dir)
    with training_tmpdir(out_dir) as tmp:
        for index, stage in enumerate(plan):
            _run_stage(index, stage, plan, model, train, val, cfg, metric, prior, combinations, tracking,
                       extra_callbacks, state, tmp, data.provenance)
    return _finish(model, data, cfg, metric, plan, state, out_dir, tracking, train, val, prior, combinations,
                   modalities)


def _threads_and_seed(cfg: TrainConfig) -> None:
    if cfg.num_threads > 0:
        # Small matmuls: intra-op threads only spin against each other (measured 30x slower on 2 busy cores).
        torch.set_num_threads(cfg.num_threads)
    pl.seed_everything(cfg.seed, workers=True)


def stage_seed(cfg: TrainConfig, index: int, stage: StagePlan) -> int:
    """The sampler seed of a stage: seed + 1 for the selected stage, seed + 2 * index before it (recorded)."""
    return cfg.seed + 1 if stage.select else cfg.seed + 2 * index


def _run_stage(index: int, stage: StagePlan, plan: list[StagePlan], model: torch.nn.Module,
               train: MultimodalData, val: MultimodalData, cfg: TrainConfig, metric: str, prior: list[float],
               combinations: tuple[str, ...], tracking: Any, extra_callbacks: list | None, state: TrainState,
               tmp: Path, provenance: Mapping[str, Any]) -> None:
    """Set what trains, build the sampler (and DPFT), fit; the selected stage restores its best epoch."""
    model.set_stage(stage.name)
    state.counts[stage.label] = model.parameter_counts()
    seed = state.seeds[stage.label] = stage_seed(cfg, index, stage)
    if index > 0 and plan[index - 1].cache_key is not None:
        pl.seed_everything(seed, workers=True)  # the same RNG state whether the previous stage ran or was restored
    cache = StageCache(state.out_dir, stage, cfg, provenance, model) if stage.cache_key is not None else None
    if cache is not None and cache.restore(model):
        state.cached[stage.label] = str(cache.path)
        return
    if hasattr(model, "prepare_stage"):  # e.g. Wander: load stage1_from, build the frozen-backbone cache
        state.notes[stage.label] = model.prepare_stage(stage, train, val, cfg.val_batch_size)
    allowed = np.array([c in combinations for c in COMBINATIONS])  # (7,)
    groups = train.dialogue_groups() if cfg.context == "dialogue" else None  # whole dialogues per batch
    sampler = make_sampler(stage.sampler, train.view_natural(), cfg.batch_size, seed, allowed=allowed,
                           groups=groups, **(stage.sampler_options or {}))
    dpft = None
    if stage.dpft:
        mode = cfg.dpft.mode
        if mode == "separability" and not getattr(model, "has_separability", False):
            mode = "uniform"  # separability needs combination-specific branches; recorded in the summary
        dpft = DPFTController(mode, eta=cfg.dpft.eta, q_min=cfg.dpft.q_min, q_max=cfg.dpft.q_max, active=allowed)
        if not allowed.all():  # (with all 7 formable the sampler's own uniform q is DPFT's start)
            sampler.set_q(dpft.q)
    sink = (lambda e: tracking.log_epoch(e, step=e["epoch"])) if tracking is not None else None
    monitor_batch = _monitor_batch(train, cfg.dpft.monitor_size, cfg.seed) if dpft is not None else None
    module = MethodModule(model, sampler=sampler, dpft=dpft, monitor_batch=monitor_batch, stage=stage.label,
                          epoch_offset=len(state.history), lr=cfg.lr, weight_decay=cfg.weight_decay,
                          regression_loss=cfg.regression_loss, selection_metric=metric, epoch_sink=sink,
                          prior=prior, combinations=combinations,
                          components=_training_components(cfg, model, train, state))
    callbacks: list = [EpochProgress(metric)]  # one line per epoch on stderr
    if stage.select:
        monitor, mode = f"val/{metric}/mean", direction(metric)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp, filename="best", monitor=monitor, mode=mode,
                                            save_weights_only=True, save_top_k=1)
        callbacks = [ckpt, pl.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience),
                     EpochProgress(metric), *(extra_callbacks or [])]  # ckpt first: read back below
    loader = DataLoader(BatchDataset(train), sampler=sampler, batch_size=None)
    _trainer(stage.epochs, callbacks, str(tmp)).fit(module, loader, _val_loader(val, cfg.val_batch_size,
                                                                                 cfg.context == "dialogue"))
    state.history += module.history
    if stage.select:
        state.sampler, state.dpft = sampler, dpft
        if callbacks[0].best_model_path:
            weights = torch.load(callbacks[0].best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    elif cache is not None:
        cache.store(model)


def _finish(model, data: MultimodalData, cfg: TrainConfig, metric: str, plan: list[StagePlan], state: TrainState,
            out_dir: Path, tracking: Any, train: MultimodalData, val: MultimodalData, prior: list[float],
            combinations: tuple[str, ...], modalities: tuple[str, ...]) -> dict:
    """Pick the selected stage's best epoch, save the checkpoint and write every report."""
    monitor = f"val/{metric}/mean"
    selected = [h for h in state.history if h["stage"] == plan[-1].label and monitor in h]
    best = selected[best_index([h[monitor] for h in selected], metric)] if selected else None
    extra = {
        "classes": list(data.classes), "task": data.task, "input_dims": data.input_dims, "seq_lens": data.seq_lens,
        "feature_config_hashes": {m: data.feature_meta[m].get("config_hash") for m in data.feature_meta},
        "feature_recipes": {m: data.feature_meta[m].get("extractor") for m in data.feature_meta},  # for predict
        "prior": prior, "provenance": data.provenance, "seed": cfg.seed, "selection_metric": metric,
        "best_epoch": None if best is None else int(best["epoch"]), "params_hash": config_hash(cfg.to_dict()),
        "mlflow_run_id": None if tracking is None else tracking.run_id, "method": cfg.method,
        "combinations": list(combinations),
    }
    save_model(out_dir / "models" / "model.pt", model.eval(), extra)
    summary = reports.summary(cfg, metric, monitor, best, state, plan, train, val, data, tracking,
                              combinations, modalities)
    reports.write_all(out_dir, summary, state.history, metric, tracking, best)
    return summary


def _training_components(cfg: TrainConfig, model: torch.nn.Module, train: MultimodalData,
                         state: TrainState) -> list:
    """Training options for MethodModule, built once per run so they carry across stages (train.cggm)."""
    if state.components is None:
        options = cfg.options("cggm")  # validated even when disabled: a typo is an error
        wants_monitor = options.get("enabled") and options.get("signal") == "epoch_monitor"
        monitor = _monitor_batch(train, cfg.dpft.monitor_size, cfg.seed) if wants_monitor else None
        cggm = build_cggm(options, model, cfg.regression_loss, monitor)
        state.components = [] if cggm is None else [cggm]
    return state.components


def _monitor_batch(train: MultimodalData, size: int, seed: int) -> dict:
    """A fixed, seeded subset of TRAINING samples with at least one modality (chosen once per run)."""
    usable = np.flatnonzero(train.view_natural().any(axis=1))
    rng = np.random.default_rng([seed, 7])
    local = np.sort(rng.choice(usable, size=min(size, len(usable)), replace=False))
    return train.batch(local)  # (dialogue mode: partial dialogues, laid out by their turns)


def _val_loader(val: MultimodalData, batch_size: int, by_dialogue: bool = False) -> DataLoader:
    keys = [BatchKey(index=local) for local in val.read_batches(batch_size, by_dialogue)]
    return DataLoader(BatchDataset(val), sampler=keys, batch_size=None)


def _trainer(max_epochs: int, callbacks: list, root: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator="auto", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
        deterministic=True if not torch.cuda.is_available() else "warn", enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, use_distributed_sampler=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
    )
