"""A training run records its dataset inputs (manifest + feature tables, with digests) and system metrics."""
from __future__ import annotations

import time

import pytest

from pipeline.tracking.runs import log_dataset_inputs, start_run, system_metrics
from pipeline.training.data import MultimodalData
from pipeline.splits import build_splits
from tests.factories import make_feature_dataset


def test_dataset_inputs_and_system_metrics_land_in_the_run(tmp_path):
    manifest, features = make_feature_dataset(tmp_path, n=40, seed=2)
    build_splits(manifest, features, tmp_path / "splits", {"seed": 1})
    provenance = MultimodalData.load(manifest, features, tmp_path / "splits").provenance
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = start_run({"tracking_uri": uri, "experiment": "imer", "artifact_root": str(tmp_path / "art")},
                         {"lr": 0.1}, provenance, repo_dir=tmp_path)
    names = log_dataset_inputs(tracking, provenance, manifest)
    with system_metrics(tracking, interval_s=0.2):
        time.sleep(0.6)
    tracking.end()

    run = tracking.client.get_run(tracking.run_id)
    logged = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(logged) == sorted(names) and "manifest" in logged and len(logged) == 1 + len(provenance["features"])
    assert logged["manifest"].dataset.digest == provenance["manifest_sha256"][:32]
    assert logged["manifest"].dataset.source and manifest.name in logged["manifest"].dataset.source
    for modality, info in provenance["features"].items():
        entry = logged[f"features/{modality}"]
        tags = {t.key: t.value for t in entry.tags}
        assert tags["imer.sha256"] == info["file_sha256"] and tags["mlflow.data.context"] == "train"
        assert tags.get("imer.config_hash") == info.get("config_hash")
    metrics = run.data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0
    assert metrics["system/system_memory_usage_megabytes"] > 0


@pytest.mark.gpu
def test_system_metrics_include_the_gpu(tmp_path):
    """On an NVIDIA machine (NVML via nvidia-ml-py) the run also gets GPU utilisation and memory."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = start_run({"tracking_uri": uri, "experiment": "imer", "artifact_root": str(tmp_path / "art")},
                         {}, {}, repo_dir=tmp_path)
    with system_metrics(tracking, interval_s=0.2):
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):
            x = x @ x.T / 4096
        torch.cuda.synchronize()
    tracking.end()
    metrics = tracking.client.get_run(tracking.run_id).data.metrics
    assert metrics["system/gpu_0_memory_usage_megabytes"] > 0
    assert "system/gpu_0_utilization_percentage" in metrics
