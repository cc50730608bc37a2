"""Import wall time and peak RSS at real dataset sizes, and training time per epoch.

Random features at the published sizes and dimensions:
- GCNet layout, utterance-level [d] vectors: IEMOCAP 5,531 utterances (a 1024, t 1024, v 342),
  MOSI 2,199, MOSEI 22,856 (a 512, t 1024, v 1024; GCNet's wav2vec/DeBERTa/MA-Net dims).
- MMSA unaligned pickles: MOSI 2,199 (text (50, 768), audio (375, 5), vision (500, 20)),
  MOSEI 22,856 (text (50, 768), audio (500, 74), vision (500, 35)). A full MOSEI pickle is
  ~8.5 GB of float32; `--mmsa-mosei-scale` imports a fraction of its rows and the script
  prints the measured figures and the linear extrapolation to full size.

Each import runs in a fresh subprocess. `peak_rss_gb` is ru_maxrss from wait4, which on Linux
starts from the parent's own peak RSS at fork (the fixture writing), so it is at least that;
`vmhwm_gb` is the child's own peak RSS (VmHWM after exec). Both count the file pages of
memory-mapped arrays (page cache the kernel can drop), so the child also reports the peak of
RssAnon (`peak_anon_gb`, anonymous memory: what cannot be reclaimed without swap), sampled
from /proc/self/status every 50 ms by a thread; a spike shorter than that can be missed.
The epoch probe (`--train-steps N`, in its own child, with the same RssAnon sampler) fits the
train-split feature statistics, runs N real training steps (forward, loss, backward, AdamW on
the default model config) and one 7-combination validation pass, and scales to an epoch.

    .venv/bin/python benchmarks/bench_import.py --only gcnet_iemocap mmsa_mosi
    .venv/bin/python benchmarks/bench_import.py --train-steps 5
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GCNET = {
    "gcnet_iemocap": {"dataset": "iemocap4", "n": 5531, "dims": {"audio": 1024, "text": 1024, "video": 342}},
    "gcnet_mosi": {"dataset": "mosi", "n": 2199, "dims": {"audio": 512, "text": 1024, "video": 1024}},
    "gcnet_mosei": {"dataset": "mosei", "n": 22856, "dims": {"audio": 512, "text": 1024, "video": 1024}},
}
MMSA = {
    "mmsa_mosi": {"dataset": "mosi", "n": 2199, "shapes": {"text": (50, 768), "audio": (375, 5), "vision": (500, 20)}},
    "mmsa_mosei": {"dataset": "mosei", "n": 22856, "shapes": {"text": (50, 768), "audio": (500, 74), "vision": (500, 35)}},
}


def write_gcnet(root: Path, dataset: str, n: int, dims: dict[str, int], seed: int = 0) -> dict:
    """Label pickle + one [d] .npy per utterance and modality; IEMOCAP ids over 5 sessions."""
    rng = np.random.default_rng(seed)
    ids, labels, speakers, sentences = {}, {}, {}, {}
    per_dialogue = 40
    n_dialogues = -(-n // per_dialogue)
    for k in range(n_dialogues):
        vid = f"Ses{k % 5 + 1:02d}F_impro{k:03d}" if dataset.startswith("iemocap") else f"video{k:05d}"
        count = min(per_dialogue, n - k * per_dialogue)
        tags = ["FM"[j % 2] for j in range(count)]
        ids[vid] = [f"{vid}_{t}{j:03d}" for j, t in enumerate(tags)]
        labels[vid] = (rng.integers(0, 4, count).tolist() if dataset.startswith("iemocap")
                       else np.round(rng.uniform(-3, 3, count), 3).tolist())
        speakers[vid], sentences[vid] = tags, ["words"] * count
    vids = sorted(ids)
    if dataset.startswith("iemocap"):
        payload = [ids, labels, speakers, sentences, set(vids[: int(0.8 * len(vids))]), set(vids[int(0.8 * len(vids)):])]
    else:
        a, b = int(0.7 * len(vids)), int(0.8 * len(vids))
        payload = [ids, labels, speakers, sentences, vids[:a], vids[a:b], vids[b:]]
    root.mkdir(parents=True, exist_ok=True)
    label_path = root / "labels.pkl"
    label_path.write_bytes(pickle.dumps(payload, protocol=4))
    folders = {}
    for m, d in dims.items():
        folder = root / "features" / m
        folder.mkdir(parents=True)
        for vid in vids:
            for uid in ids[vid]:
                np.save(folder / f"{uid}.npy", rng.standard_normal(d, dtype=np.float32))
        folders[m] = str(folder)
    return {"format": "gcnet", "dataset": dataset, "label_path": str(label_path), "feature_dirs": folders,
            "max_len": {"a": 500, "t": 50, "v": 500}}


def write_mmsa(root: Path, dataset: str, n: int, shapes: dict[str, tuple[int, int]], seed: int = 0) -> dict:
    """An unaligned MMSA pickle with zero padding past random true lengths and *_lengths arrays."""
    rng = np.random.default_rng(seed)
    sizes = {"train": int(0.7 * n), "valid": int(0.1 * n)}
    sizes["test"] = n - sizes["train"] - sizes["valid"]
    data = {}
    for split, size in sizes.items():
        part = {"id": np.array([f"{split}{i // 8:05d}$_${i % 8}" for i in range(size)]),
                "regression_labels": rng.uniform(-3, 3, size).astype(np.float32)}
        for key, (t, d) in shapes.items():
            lengths = rng.integers(t // 4, t + 1, size)
            arr = rng.standard_normal((size, t, d), dtype=np.float32)
            for i0 in range(0, size, 2048):  # zero the padding in chunks (a full bool mask would double memory)
                arr[i0:i0 + 2048][np.arange(t)[None, :] >= lengths[i0:i0 + 2048, None]] = 0.0
            part[key] = arr
            if key != "text":
                part[f"{key}_lengths"] = lengths
        data[split] = part
    path = root / "unaligned_50.pkl"
    with path.open("wb") as handle:
        pickle.dump(data, handle, protocol=4)
    return {"format": "mmsa", "dataset": dataset, "pickle_path": str(path), "max_len": {"a": None, "t": None, "v": None}}


CHILD = """
import json, sys, time
from benchmarks.bench_import import peak_sampler
from pipeline.importers.stage import ImportConfig, import_dataset

stop, peak = peak_sampler()
cfg = ImportConfig.from_params(json.loads(sys.argv[1]))
t0 = time.perf_counter()
summary = import_dataset(cfg, sys.argv[2] + "/manifest.parquet", sys.argv[2] + "/features")
wall = time.perf_counter() - t0
stop()
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
print(json.dumps({"wall_s": wall, "rows": summary["rows"], "peak_anon_gb": peak["RssAnon"] / 1024**2,
                  "peak_vmrss_sampled_gb": peak["VmRSS"] / 1024**2, "vmhwm_gb": hwm / 1024**2,
                  "shapes": {k: v["sequence_shape"] for k, v in summary["tables"].items()}}))
"""


def run_import(params: dict, out: Path) -> dict:
    """Import in a child process; its own peak RSS comes from wait4's rusage."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(params), str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"import child failed ({proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gb"] = usage.ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    result["table_bytes_gb"] = sum(p.stat().st_size for p in (out / "features").glob("*.arrow")) / 1024**3
    return result


EPOCH_CHILD = """
import json, sys, threading
sys.path.insert(0, sys.argv[1])
from benchmarks.bench_import import epoch_time, peak_sampler
stop, peak = peak_sampler()
result = epoch_time(*json.loads(sys.argv[2]))
stop()
result.update(peak_anon_gb=peak["RssAnon"] / 1024**2, peak_vmrss_sampled_gb=peak["VmRSS"] / 1024**2)
print(json.dumps(result))
"""


def peak_sampler(interval: float = 0.05):
    """Start a thread that tracks this process's peak VmRSS / RssAnon (KiB); returns (stop, peak dict)."""
    import threading

    peak = {"VmRSS": 0, "RssAnon": 0}
    done = threading.Event()

    def sample() -> None:
        while True:
            with open("/proc/self/status") as f:
                now = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in peak}
            for k in peak:
                peak[k] = max(peak[k], now[k])
            if done.wait(interval):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join()

    return stop, peak


def epoch_in_child(out: Path, steps: int, strategy: str, val_rows: int) -> dict:
    """`epoch_time` in a fresh interpreter, so its peak memory is the training's own."""
    args = json.dumps([str(out), steps, strategy, val_rows])
    done = subprocess.run([sys.executable, "-c", EPOCH_CHILD, str(ROOT), args], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def epoch_time(out: str | Path, steps: int, task_strategy: str, val_rows: int = 0) -> dict:
    """Time `steps` real training steps at batch 32 (default model) and scale to one epoch.

    Does what the train stage does before and around them: train-split feature
    statistics (a pass over every train row), then one 7-combination validation pass
    over `val_rows` validation samples (0 = all) through Lightning, timed separately.
    """
    import torch

    from pipeline.methods.registry import build_network
    from pipeline.splits import build_splits
    from pipeline.training.config import TrainConfig
    from pipeline.training.data import MultimodalData, feature_statistics, train_prior
    from pipeline.training.lit_module import MethodModule
    from pipeline.training.loop import _trainer, _val_loader, build_model_config
    from pipeline.training.samplers import BatchDataset, HomogeneousBatchSampler

    out = Path(out)
    torch.set_num_threads(1)
    split_params = {"strategy": task_strategy, "fold": 0, "seed": 0, "missing_rates": [0.0]}
    build_splits(out / "manifest.parquet", out / "features", out / "splits", split_params)
    data = MultimodalData.load(out / "manifest.parquet", out / "features", out / "splits", include=("train", "val"))
    train, val = data.subset("train"), data.subset("val")
    torch.manual_seed(0)
    model = build_network(build_model_config(data, TrainConfig(), ("a", "t", "v")))
    t0 = time.perf_counter()
    model.set_input_statistics(feature_statistics(train))
    stats_s = time.perf_counter() - t0
    module = MethodModule(model, prior=train_prior(data))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sampler = HomogeneousBatchSampler(train.view_natural(), 32, 0)
    dataset = BatchDataset(train)
    keys = sampler.draw_epoch(0)
    t0 = time.perf_counter()
    for key in keys[:steps]:
        batch = dataset[key]
        _, l_task, aux = module.model_step(batch)
        optim.zero_grad()
        sum((w * v for w, v in aux.values()), l_task).backward()
        optim.step()
    per_step = (time.perf_counter() - t0) / min(steps, len(keys))
    if val_rows:
        val = val.take(np.arange(min(val_rows, len(val))))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _trainer(1, [], tmp).validate(module, _val_loader(val, 256), verbose=False)
    val_s = time.perf_counter() - t0
    return {"train_rows": len(train), "batches_per_epoch": len(keys), "s_per_step": per_step,
            "est_epoch_train_s": per_step * len(keys), "feature_stats_s": stats_s, "val_rows": len(val),
            "val_7_combinations_s": val_s, "est_epoch_s": per_step * len(keys) + val_s * len(data.subset("val")) / len(val),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[*GCNET, *MMSA], default=[*GCNET, *MMSA])
    parser.add_argument("--mmsa-mosei-scale", type=float, default=0.25, help="fraction of MOSEI rows in the MMSA pickle")
    parser.add_argument("--train-steps", type=int, default=0, help="training steps to time per dataset (0 = skip)")
    parser.add_argument("--val-rows", type=int, default=0, help="validation samples in the timed 7-combination pass (0 = all)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="bench-import-"))
    for name in args.only:
        root = base / name
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        scale = 1.0
        if name in GCNET:
            spec = GCNET[name]
            params = write_gcnet(root / "src", spec["dataset"], spec["n"], spec["dims"])
        else:
            spec = MMSA[name]
            scale = args.mmsa_mosei_scale if name == "mmsa_mosei" else 1.0
            (root / "src").mkdir(exist_ok=True)
            params = write_mmsa(root / "src", spec["dataset"], int(spec["n"] * scale), spec["shapes"])
        made = time.perf_counter() - t0
        result = run_import(params, root / "out")
        result.update(name=name, fixture_s=made, scale=scale)
        if scale != 1.0:
            result["extrapolated_full"] = {"wall_s": result["wall_s"] / scale, "peak_rss_gb": result["peak_rss_gb"] / scale,
                                           "vmhwm_gb": result["vmhwm_gb"] / scale, "peak_anon_gb": result["peak_anon_gb"] / scale,
                                           "table_bytes_gb": result["table_bytes_gb"] / scale}
        if args.train_steps:
            strategy = "loso" if spec["dataset"].startswith("iemocap") else "manifest"
            result["train"] = epoch_in_child(root / "out", args.train_steps, strategy, args.val_rows)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
