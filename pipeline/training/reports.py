"""What training writes besides the checkpoint: the summary, the history, the DVC plot tables, MLflow."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_path, write_json
from pipeline.core.modalities import COMBINATIONS
from pipeline.training.cggm_parts import coefficient_csv


def summary(cfg: Any, metric: str, monitor: str, best: dict | None, state: Any, plan: list, train: Any, val: Any,
            data: Any, tracking: Any, combinations: tuple[str, ...], modalities: tuple[str, ...]) -> dict:
    """models/train_summary.json: the run's decisions and outcome (the registry reads it)."""
    final = plan[-1].label
    dpft = state.dpft
    return {
        "seed": cfg.seed, "method": cfg.method, "regime": cfg.regime, "variant": cfg.variant,
        "standardise_inputs": cfg.standardise_inputs,
        "dpft_mode": dpft.mode if dpft is not None else "none",
        "selection_metric": metric, "monitor": monitor,
        "best_epoch": None if best is None else int(best["epoch"]),
        "best_val_mean": None if best is None else float(best[monitor]),
        "best_val": {} if best is None else {c: best.get(f"val/{metric}/{c}") for c in combinations},
        "combinations": list(combinations), "modalities": list(modalities),
        "modality_shares": train.modality_shares(),
        "not_applicable": [c for c in COMBINATIONS if c not in combinations],
        "epochs_run": len(state.history), "parameter_counts": state.counts,
        "stages": [{"name": p.name, "label": p.label, "sampler": p.sampler, "epochs": p.epochs,
                    "seed": state.seeds.get(p.label), "restored_from": state.cached.get(p.label),
                    "notes": state.notes.get(p.label, {})} for p in plan],
        "q_history": [[h.get(f"dpft/q/{c}") for c in COMBINATIONS] for h in state.history if h["stage"] == final],
        "sep_history": [[h.get(f"dpft/sep/{c}") for c in COMBINATIONS] for h in state.history if h["stage"] == final],
        "final_q": None if dpft is None else dpft.q.tolist(),
        "sampler_draws": getattr(state.sampler, "history", []),
        "n_train": len(train), "n_val": len(val), "provenance": data.provenance,
        "mlflow_run_id": None if tracking is None else tracking.run_id,
        "mlflow_tracking_uri": None if tracking is None else tracking.tracking_uri,
    }


def write_all(out_dir: Path, summary_: dict, history: list[dict], metric: str, tracking: Any,
              best: dict | None) -> None:
    write_json(out_dir / "models" / "train_summary.json", summary_)
    write_json(out_dir / "reports" / "train_history.json", history)
    write_plot_csvs(out_dir / "reports" / "plots", history, metric)
    if tracking is None:
        return
    if best is not None:
        tracking.log_epoch({f"best/val/{metric}/mean": best[f"val/{metric}/mean"], "best/epoch": best["epoch"]}, step=0)
    counts = summary_["parameter_counts"]
    final = counts.get("main") or list(counts.values())[-1]
    tracking.set_tags({"imer.method": summary_["method"], "imer.regime": summary_["regime"],
                       "imer.variant": summary_["variant"], "imer.trainable_params": final["trainable"],
                       "imer.combinations": ",".join(summary_["combinations"])})
    tracking.log_artifact(out_dir / "models" / "train_summary.json", "train")
    tracking.log_artifact(out_dir / "reports" / "train_history.json", "train")


def write_plot_csvs(plots: Path, history: list[dict], metric: str) -> None:
    """DVC plot data: one CSV per figure, one row per epoch."""
    tables = {
        "dpft_q.csv": ("dpft/q/", COMBINATIONS),
        "dpft_sep.csv": ("dpft/sep/", COMBINATIONS),
        "val_score.csv": (f"val/{metric}/", COMBINATIONS + ("mean",)),  # fixed name: a DVC out
    }
    for name, (prefix, cols) in tables.items():
        lines = ["epoch,stage," + ",".join(cols)]
        for h in history:
            vals = [h.get(prefix + c) for c in cols]
            if all(v is None for v in vals):
                continue
            lines.append(f"{h['epoch']},{h['stage']}," + ",".join("" if v is None else f"{v:.6g}" for v in vals))
        with atomic_path(plots / name) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(plots / "cggm_coeff.csv") as tmp:  # header only when train.cggm is off
        tmp.write_text(coefficient_csv(history))
    lines = ["epoch,stage,loss,l_ort"]
    lines += [f"{h['epoch']},{h['stage']},{h.get('train/loss', float('nan')):.6g},{h.get('train/l_ort', float('nan')):.6g}"
              for h in history]
    with atomic_path(plots / "train_loss.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
