"""Suite-wide settings: offline model loading, one torch thread (2-core CI; threads fight), no telemetry."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")  # Prefect/DVC telemetry off; there is no network anyway
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("IMER_NO_PREFECT", "1")  # Prefect tests (tests/prefect_server.py) clear this themselves
