"""MLflow helpers: one run per training, tagged with the hashes of everything it learned from.

The run id goes into train_summary.json, so evaluate/register reopen the same run
instead of starting another. The default store is a SQLite file in the repo
(`sqlite:///mlflow.db`) with artifacts under `mlartifacts/`; both come from
params (`train.mlflow.*`). Each run records its trainer (host, pid, start time), so
the next `start_run` can close runs that a killed training left RUNNING.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.core.processes import Owner, current_owner

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "imer"
DEFAULT_ARTIFACTS = "mlartifacts"
OWNER_TAGS = ("imer.trainer.host", "imer.trainer.pid", "imer.trainer.started")
NOTE_TAG = "imer.note"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"lora": {"rank": 4}} -> {"lora.rank": "4"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def git_revision(repo_dir: str | Path = ".") -> str | None:
    """HEAD commit, or None outside a repository / before the first commit."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def provenance_tags(provenance: Mapping[str, Any], repo_dir: str | Path = ".") -> dict[str, str]:
    """Tags naming the exact data: manifest hash, per-table config+file hash, splits hash, git/DVC revision."""
    tags = {"imer.manifest_sha256": str(provenance.get("manifest_sha256"))}
    for m, info in (provenance.get("features") or {}).items():
        tags[f"imer.features.{m}.config_hash"] = str(info.get("config_hash"))
        tags[f"imer.features.{m}.file_sha256"] = str(info.get("file_sha256"))
    tags["imer.splits_hash"] = str(provenance.get("splits_hash"))
    rev = git_revision(repo_dir)
    if rev:
        tags["mlflow.source.git.commit"] = rev
        tags["imer.git_revision"] = rev
    for env, tag in (("DVC_EXP_BASELINE_REV", "imer.dvc_baseline_rev"), ("DVC_EXP_NAME", "imer.dvc_exp_name")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


@dataclass
class Tracking:
    """An open MLflow run; `log_epoch` writes one epoch's metrics in one batch call."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str

    def log_epoch(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=k, value=float(v), timestamp=now, step=int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch",)]
        for start in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start:start + 900])

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[start:start + 90])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """Point mlflow's fluent API (needed by `log_model`) at `uri` only inside the block.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ, which
    `start_run` honours: left in place, one stage's store would capture every later
    run in the same process (a Prefect worker, a notebook, a test session).
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in _URI_ENV}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_run(mlflow_params: Mapping[str, Any], params: Mapping[str, Any], provenance: Mapping[str, Any],
              run_name: str | None = None, repo_dir: str | Path = ".") -> Tracking:
    """Open a run in the experiment named in `mlflow_params`, logging flattened params and provenance tags.

    The run is tagged with its trainer (host, pid, start time); runs of this experiment
    left RUNNING by a trainer of this host that is gone are closed first (`close_stale_runs`).
    """
    from mlflow.tracking import MlflowClient

    # MLFLOW_TRACKING_URI wins: a remote GPU worker reports to the shared server without a params change.
    uri = os.environ.get("MLFLOW_TRACKING_URI") or str(mlflow_params.get("tracking_uri", DEFAULT_URI))
    name = str(mlflow_params.get("experiment", DEFAULT_EXPERIMENT))
    artifacts = Path(mlflow_params.get("artifact_root", DEFAULT_ARTIFACTS))
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        experiment_id = client.create_experiment(name, artifact_location=artifacts.resolve().as_uri())
    else:
        experiment_id = exp.experiment_id
    for stale in close_stale_runs(client, experiment_id):  # runs left RUNNING by trainings killed on this host
        print(f"mlflow: run {stale} of experiment {name!r} was left RUNNING by a training that is gone; "
              "marked KILLED (see its imer.note tag)", file=sys.stderr)
    tags = {**provenance_tags(provenance, repo_dir), **owner_tags(current_owner())}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    tracking = Tracking(client, run.info.run_id, experiment_id, uri)
    tracking.log_params(params)
    return tracking


def owner_tags(owner: Owner) -> dict[str, str]:
    """Run tags naming the training process, so a later start can tell whether it is gone."""
    return dict(zip(OWNER_TAGS, (owner.host, str(owner.pid), repr(owner.started))))


def run_owner(tags: Mapping[str, str]) -> Owner | None:
    """The trainer recorded on a run, or None for runs from before these tags (never judged stale)."""
    try:
        host, pid, started = (tags[k] for k in OWNER_TAGS)
        return Owner(host, int(pid), float(started))
    except (KeyError, ValueError):
        return None


def close_stale_runs(client: Any, experiment_id: str, status: str = "KILLED") -> list[str]:
    """Mark RUNNING runs whose trainer is gone as `status` (KILLED), with an `imer.note` tag saying why.

    Stale only when the run records its trainer and that trainer ran on this host and no
    longer exists (same pid and start time): a live training here, one on another host,
    and runs without the tags are left alone. Returns the closed run ids.
    """
    from datetime import datetime, timezone

    closed = []
    me = current_owner()
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        owner = run_owner(run.data.tags)
        if owner is None or not owner.is_gone():
            continue
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        client.set_tag(run.info.run_id, NOTE_TAG,
                       f"marked {status} at {when} by the training started as pid {me.pid} on {me.host}: its "
                       f"trainer (pid {owner.pid} on {owner.host}) is gone without closing the run (killed?)")
        client.set_terminated(run.info.run_id, status=status)
        closed.append(run.info.run_id)
    return closed


def reopen_run(tracking_uri: str, run_id: str) -> Tracking:
    """The run of an earlier stage (evaluate/register log into the training run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    return Tracking(client, run_id, run.info.experiment_id, tracking_uri)


# ---------------------------------------------------------------- dataset lineage and system metrics
def dataset_inputs(provenance: Mapping[str, Any], manifest_path: str | Path | None = None) -> list[Any]:
    """MLflow `DatasetInput`s for the manifest and each feature table, named and digested by their files.

    MLflow stores a dataset digest of at most 36 characters: the digest is the first 32 hex
    digits of the file's SHA-256; the full hash (and the extractor config hash) ride along as
    input tags, so a run names the exact bytes it trained on.
    """
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    entries = [("manifest", manifest_path, provenance.get("manifest_sha256"), None)]
    for modality, info in sorted((provenance.get("features") or {}).items()):
        entries.append((f"features/{modality}", info.get("path"), info.get("file_sha256"), info.get("config_hash")))
    inputs = []
    for name, path, sha, config in entries:
        if not sha:
            continue
        uri = Path(path).resolve().as_uri() if path else f"file:///unknown/{name}"
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about it
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        dataset = MetaDataset(source, name=name, digest=str(sha)[:32])
        tags = [InputTag("mlflow.data.context", "train"), InputTag("imer.sha256", str(sha))]
        if config:
            tags.append(InputTag("imer.config_hash", str(config)))
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
    return inputs


def log_dataset_inputs(tracking: Tracking, provenance: Mapping[str, Any],
                       manifest_path: str | Path | None = None) -> list[str]:
    """Log the manifest and feature tables as the run's dataset inputs; returns their names."""
    inputs = dataset_inputs(provenance, manifest_path)
    if inputs:
        tracking.client.log_inputs(tracking.run_id, datasets=inputs)
    return [i.dataset.name for i in inputs]


@contextlib.contextmanager
def system_metrics(tracking: Tracking, interval_s: float = 10.0) -> Iterator[None]:
    """Sample CPU, memory, disk, network and (with NVML, on NVIDIA) GPU use into the run as `system/*`.

    MLflow's own monitor thread samples every `interval_s`; one last sample is logged when
    the block ends, so even a training shorter than the interval records its machine load.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(tracking.run_id, sampling_interval=interval_s, resume_logging=True,
                                   tracking_uri=tracking.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()  # stops the thread and flushes what it sampled
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
