"""Prefect orchestration against a real `prefect server start` on 127.0.0.1 (one per session).

Covers: a stage flow's run, tasks and artifact in the API; extraction on Dask equal
to the default runner; chunk retries on transient I/O errors only; permanent chunk
failures kept as missing clips with their reason; dispatch of a stage to a work pool
served by a local process worker; `prefect deploy --all` + worker running `retrain`.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration

from features.runner import ClipJob, ClipOutcome, extract_chunk  # noqa: E402
from flows.extract import consume, prefect_chunk_mapper  # noqa: E402
from pipeline.formats.feature_table import read_feature_table  # noqa: E402
from tests.media_factory import good_clips, make_manifest, write_text  # noqa: E402
from tests.prefect_server import (  # noqa: E402,F401
    PROJECT_ROOT, create_pools, prefect_api, prefect_server, process_worker,
)

N_CLIPS = 6


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def audio_manifest(tmp_path_factory) -> Path:
    """A manifest of N_CLIPS real voiced WAV clips plus one corrupt file."""
    root = tmp_path_factory.mktemp("media")
    rows = good_clips(root, N_CLIPS, modalities=("audio",))
    bad = write_text(root / "audio" / "broken.wav", "not a wav file")
    rows.append({"utterance_id": "u_bad", "session": "s1", "speaker": "spk0", "audio_path": str(bad)})
    return make_manifest(root / "manifest.parquet", rows)


def write_params(path: Path, manifest: Path, out_dir: Path, **orchestration) -> Path:
    """A params file whose paths are absolute (the worker runs in the repo checkout)."""
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["extract_acoustic"].update({
        "manifest": str(manifest), "out": str(out_dir / "acoustic.arrow"), "cache_dir": str(out_dir / "cache"),
        "workers": 1, "chunk_size": 2, "max_failure_share": 0.5, "progress": False,
    })
    params["orchestration"] = {**params.get("orchestration", {}), **orchestration}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def task_runs_of(flow_run_id: UUID):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


# Top-level (picklable) chunk functions for the failure tests.
def flaky_chunk(marker_dir: str, fail_times: int, jobs: list[ClipJob]) -> list[ClipOutcome]:
    """Raises OSError on the first `fail_times` calls (counted in files), then succeeds."""
    calls = len(list(Path(marker_dir).glob("call-*")))
    (Path(marker_dir) / f"call-{calls}").touch()
    if calls < fail_times:
        raise OSError(f"transient read error #{calls}")
    return [ClipOutcome(j.utterance_id, j.content_hash, True, length=1) for j in jobs]


def broken_for(bad_uid: str, fn, jobs: list[ClipJob]) -> list[ClipOutcome]:
    """The real chunk function, except that a chunk holding `bad_uid` fails permanently."""
    if any(j.utterance_id == bad_uid for j in jobs):
        raise ValueError(f"decoder crashed on {bad_uid}")
    return fn(jobs)


# ------------------------------------------------------------------ tests


def test_stage_flow_records_run_tasks_and_artifact(prefect_api, audio_manifest, tmp_path):
    from flows.stage import stage_flow

    params = write_params(tmp_path / "params.yaml", audio_manifest, tmp_path / "out")
    state = stage_flow(stage="extract_acoustic", params_path=str(params), return_state=True)
    assert state.is_completed(), state.message
    with _client() as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        artifacts = client.read_artifacts()
    assert run.state.is_completed() and run.name.startswith("extract_acoustic-")
    chunk_runs = [t for t in task_runs_of(run.id) if t.name.startswith("extract-chunk")]
    assert len(chunk_runs) == -(-(N_CLIPS + 1) // 2)  # every clip with a file, in chunks of 2
    assert all(t.state.is_completed() for t in chunk_runs)
    assert any(a.key == "stage-extract-acoustic" and a.flow_run_id == run.id for a in artifacts)
    table = read_feature_table(tmp_path / "out" / "acoustic.arrow")
    assert table.present.sum() == N_CLIPS and not table.present[list(table.utterance_id).index("u_bad")]


def test_dask_runner_gives_the_same_table(prefect_api, audio_manifest, tmp_path):
    from flows.stage import flow_for_stage

    tables = {}
    for runner in ("default", "dask"):
        params = write_params(tmp_path / f"{runner}.yaml", audio_manifest, tmp_path / runner,
                              extraction_runner=runner, dask_workers=2)
        flow = flow_for_stage("extract_acoustic", str(params))
        state = flow(stage="extract_acoustic", params_path=str(params), return_state=True)
        assert state.is_completed(), state.message
        tables[runner] = read_feature_table(tmp_path / runner / "acoustic.arrow")
    assert type(flow.task_runner).__name__ == "DaskTaskRunner"
    a, b = tables["default"], tables["dask"]
    assert list(a.utterance_id) == list(b.utterance_id)
    np.testing.assert_array_equal(a.present, b.present)
    np.testing.assert_array_equal(a.sequence, b.sequence)
    assert a.failure_reason == b.failure_reason


def test_transient_io_error_is_retried(prefect_api, tmp_path):
    from prefect import flow

    jobs = [ClipJob("u1", "/x/u1.wav", "h1"), ClipJob("u2", "/x/u2.wav", "h2")]

    @flow
    def one_chunk(fail_times: int, retries: int) -> list:
        fn = functools.partial(flaky_chunk, str(tmp_path), fail_times)
        return consume(prefect_chunk_mapper(retries=retries, retry_delay_s=[0])(fn, [jobs]))

    state = one_chunk(fail_times=1, retries=2, return_state=True)
    outcomes = state.result()
    assert [o.present for o in outcomes] == [True, True]
    runs = task_runs_of(state.state_details.flow_run_id)
    assert [t.run_count for t in runs] == [2]  # failed once, retried once

    for f in tmp_path.glob("call-*"):
        f.unlink()
    outcomes = one_chunk(fail_times=5, retries=1)  # retries exhausted: clips kept, marked missing
    assert [(o.utterance_id, o.present) for o in outcomes] == [("u1", False), ("u2", False)]
    assert all(o.failure_reason == "io_error:OSError" and o.extraction_failure for o in outcomes)


def test_permanent_chunk_failure_marks_clips_missing(prefect_api, audio_manifest, tmp_path):
    from prefect import flow

    from flows.extract import run_extraction_stage

    params = yaml.safe_load(write_params(tmp_path / "p.yaml", audio_manifest, tmp_path / "out").read_text())

    @flow
    def extract_with_a_broken_chunk() -> dict:
        inner = prefect_chunk_mapper(retries=2, retry_delay_s=[0])
        mapper = lambda fn, chunks: inner(functools.partial(broken_for, "u0001", fn), chunks)  # noqa: E731
        return run_extraction_stage("acoustic", params["extract_acoustic"], mapper)

    state = extract_with_a_broken_chunk(return_state=True)
    assert state.is_completed(), state.message
    table = read_feature_table(tmp_path / "out" / "acoustic.arrow")
    reasons = dict(zip(table.utterance_id, table.failure_reason))
    assert len(reasons) == N_CLIPS + 1  # no clip lost
    assert reasons["u0001"] == "chunk_failed:ValueError"
    assert reasons["u0000"] == "chunk_failed:ValueError"  # same chunk (chunk_size 2)
    assert reasons["u0002"] is None and table.present.sum() == N_CLIPS - 2
    runs = task_runs_of(state.state_details.flow_run_id)
    assert all(t.run_count == 1 for t in runs)  # permanent failures are not retried


def _deploy(env: dict, names: list[str] | None = None) -> None:
    cmd = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy"]
    cmd += [a for n in names for a in ("--name", n)] if names else ["--all"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def deployed(prefect_server) -> dict:
    """`prefect deploy --all` from prefect.yaml into the test server (pools created first)."""
    from tests.prefect_server import client_env

    url, home = prefect_server
    env = client_env(url, home)
    create_pools(url, ("cpu", "gpu"))
    _deploy(env)
    return env


def test_deploy_all_creates_scheduled_deployments(prefect_api, deployed):
    with _client() as client:
        retrain = client.read_deployment_by_name("retrain/nightly-retrain")
        ingest = client.read_deployment_by_name("ingest-new-clips/ingest-new-clips")
        gpu = client.read_deployment_by_name("imer-stage/stage-on-gpu")
    assert retrain.work_pool_name == "cpu" and gpu.work_pool_name == "gpu"
    assert retrain.schedules[0].schedule.cron == "0 2 * * *"
    assert retrain.schedules[0].schedule.timezone == "Europe/Berlin"
    assert ingest.schedules and gpu.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert gpu.pull_steps == [{"flows.workdir.enter_checkout": {}}]


def test_train_dispatched_to_gpu_pool(prefect_api, deployed, tmp_path):
    """orchestration.train_pool=gpu: `stage_flow("train")` waits for the gpu pool's worker to train."""
    pytest.importorskip("pipeline.train", reason="pipeline/train.py not yet available")
    from flows.stage import stage_flow
    from pipeline.splits import build_splits
    from tests.factories import make_feature_dataset

    manifest, features = make_feature_dataset(tmp_path / "data", n=120)
    build_splits(manifest, features, tmp_path / "splits", {"seed": 0, "missing_rates": [0.0, 0.5]})
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["train"].update({
        "manifest": str(manifest), "features_dir": str(features), "splits_dir": str(tmp_path / "splits"),
        "out_dir": str(tmp_path / "out"), "max_epochs": 1, "batch_size": 16, "mlflow": {"enabled": False},
        "model": {**params["train"]["model"], "d_model": 16, "n_heads": 2, "d_fusion": 16},
        "dpft": {**params["train"]["dpft"], "monitor_size": 16},
    })
    params["orchestration"] = {**params.get("orchestration", {}), "train_pool": "gpu"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))

    with process_worker("gpu", deployed, tmp_path / "worker.log"):
        state = stage_flow(stage="train", params_path=str(path), return_state=True)
    assert state.is_completed(), (tmp_path / "worker.log").read_text()[-3000:]
    summary = state.result()
    with _client() as client:
        run = client.read_flow_run(UUID(summary["dispatched_run"]))
    assert run.work_pool_name == "gpu" and run.state.is_completed()
    assert run.parent_task_run_id is not None  # a subflow run of the caller
    assert (tmp_path / "out" / "models" / "model.pt").exists()


TINY_PIPELINE = {
    "corpus": {"utterances": 40, "sessions": 4},
    "extract_acoustic": {"workers": 1}, "extract_visual": {"workers": 1}, "extract_textual": {"workers": 1},
    "splits": {"missing_rates": [0.0, 0.5]},
    "train": {"max_epochs": 2, "batch_size": 8, "patience": 5, "val_batch_size": 64,
              "model": {"d_model": 16, "n_heads": 2, "d_fusion": 16}, "lora": {"rank": 2, "alpha": 4.0},
              "dpft": {"monitor_size": 16}},
}


def _dvc_stages() -> list[str]:
    """The stages DVC resolves: a `foreach` stage (import@<name>) expands to one per key of the
    params mapping it iterates over, so with no imports declared it is no stage at all."""
    stages = (yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text()) or {}).get("stages", {})
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()) or {}
    names = []
    for name, body in stages.items():
        if isinstance(body, dict) and "foreach" in body:
            value = params
            for key in str(body["foreach"]).strip("${} ").split("."):
                value = (value or {}).get(key)
            names += [f"{name}@{item}" for item in (value or {})]
        else:
            names.append(name)
    return names


@pytest.mark.slow
def test_retrain_deployment_end_to_end(prefect_api, deployed, tmp_path):
    """A worker runs `retrain` from prefect.yaml: every stage of dvc.yaml runs once, then nothing is stale.

    Runs whatever dvc.yaml holds; the registry decision is checked once it has a register stage.
    """
    stages = _dvc_stages()
    if "corpus" not in stages:
        pytest.skip("dvc.yaml has no pipeline yet")
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.deployments import run_deployment

    from tests.repo_copy import make_repo_copy

    repo = make_repo_copy(tmp_path / "repo", TINY_PIPELINE)
    env = {**deployed, "IMER_NO_PREFECT": "0"}
    results, outcomes = [], []
    with process_worker("cpu", env, tmp_path / "worker.log"):
        for _ in range(2):
            run = run_deployment("retrain/nightly-retrain", parameters={"project_dir": str(repo)}, timeout=1800)
            assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
            results.append(run)
            outcomes.append(json.loads((repo / "run" / "last_retrain.json").read_text()))
    first, second = outcomes
    assert first["flow_run_id"] == str(results[0].id)
    assert set(first["stale"]) == set(stages) and set(first["ran"]) == set(stages)
    assert second["stale"] == [] and second["ran"] == []  # nothing stale: no stage work at all
    if "register" in stages:
        assert first["registry"]["decision"] in {"promoted", "kept"}
    with _client() as client:  # the stages DVC ran are flow runs of their own, tagged with the parent
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"parent:{results[0].id}"])))
        second_children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"parent:{results[1].id}"])))
    assert sorted(c.name.split("-")[0] for c in children) == sorted(stages)
    assert all(c.state.is_completed() for c in children) and second_children == []


@pytest.mark.slow
def test_ingest_new_clips_runs_only_extraction_and_upstream(prefect_api, tmp_path):
    """`ingest-new-clips` brings the extraction stages up to date and leaves training alone."""
    stages = _dvc_stages()
    if not {"ingest", "extract_acoustic", "train"} <= set(stages):
        pytest.skip("dvc.yaml lacks the ingest/extraction/train stages")
    from flows.retrain import EXTRACTION_TARGETS, ingest_new_clips_flow
    from tests.repo_copy import make_repo_copy

    repo = make_repo_copy(tmp_path / "repo", TINY_PIPELINE)
    first = ingest_new_clips_flow(project_dir=str(repo))
    assert set(EXTRACTION_TARGETS) | {"corpus", "ingest"} == set(first["ran"])
    assert "train" not in first["stale"] and not (repo / "models").exists()
    second = ingest_new_clips_flow(project_dir=str(repo))
    assert second == {"stale": [], "ran": []}
