"""Seconds per training step of each method (prints figures; no asserts).

Rows: MCULoRA (from_scratch step: every parameter trains, homogeneous batch cycling the 7
combinations) against Wander stage 1 (the plain backbone, random modality dropout) and Wander
stage 2 live and with the cached backbone (frozen encoders; mixed-combination dropout batch).
Target (issue 9): Wander stage 2 with the cache <= 0.3x an MCULoRA step.
MPLMM rows: stage 2 (frozen backbone, prompts + generator + input projections + head train) on the
same mixed-combination batch, backbone `imer` (target <= 1.5x MCULoRA) and `mult` (target <= 7x).

Shapes: `default` = the default corpus's extractors (as bench_adapters.py), `mosi` = MMSA MOSI
(COVAREP 5, BERT 768, Facet 20) at the configs/mosi.yaml caps 150/50/150.

Usage: python benchmarks/bench_methods.py [--shapes default mosi] [--batch 32] [--reps 10]
       [--device cpu|cuda] [--threads 0]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from pipeline.core.modalities import MASKS as NP_MASKS
from pipeline.methods import MCULoRANet, ModelConfig, task_loss
from pipeline.methods.mplmm import MPLMMNet
from pipeline.methods.wander import WanderNet

SHAPES = {
    "default": ({"a": 16, "t": 32, "v": 16}, {"a": 50, "t": 384, "v": 1024}),
    "mosi": ({"a": 150, "t": 50, "v": 150}, {"a": 5, "t": 768, "v": 20}),
}
MASKS = torch.as_tensor(NP_MASKS)  # (7, 3)


def make_batch(seq: dict, dims: dict, B: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, seq[m], dims[m], generator=g) for m in seq}
    lengths = {m: torch.randint(max(1, seq[m] // 2), seq[m] + 1, (B,), generator=g) for m in seq}
    comb = torch.randint(0, 7, (B,), generator=g)  # random modality dropout: one combination per row
    batch = {"features": feats, "lengths": lengths, "lengths_natural": dict(lengths),
             "mask": torch.ones(B, 3, dtype=torch.bool), "comb": comb,
             "target": torch.randint(0, 4, (B,), generator=g), "index": torch.arange(B)}
    return {k: ({m: x.to(device) for m, x in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items()}


def config(seq: dict, dims: dict, **kw) -> ModelConfig:
    return ModelConfig(input_dims=dims, seq_lens=seq, **kw)


def step_fn(net: torch.nn.Module, b: dict, mode: str) -> Callable[[], None]:
    """One forward + backward + AdamW step on the trainable parameters."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    counter = iter(range(10**9))

    def step() -> None:
        if mode == "homogeneous":
            c = next(counter) % 7
            out = net(b["features"], b["lengths"], b["mask"] & MASKS[c].to(b["mask"].device), c)
        else:
            kw = {"index": b["index"]} if mode == "cached" else {}
            out = net(b["features"], b["lengths"], b["mask"] & MASKS.to(b["mask"].device)[b["comb"]], b["comb"], **kw)
        loss = task_loss(out.prediction, b["target"], "classification")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def interleaved(fns: dict[str, Callable[[], None]], reps: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per call, run round-robin so load drift hits every row alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(shape: str, B: int, reps: int, device: str) -> None:
    seq, dims = SHAPES[shape]
    b = make_batch(seq, dims, B, device)
    torch.manual_seed(0)
    nets = {"mculora": MCULoRANet(config(seq, dims)).to(device).train()}
    wander_cfg = config(seq, dims, method="wander", variant="plain")
    for name, stage in (("wander stage 1", "stage1"), ("wander stage 2 live", "stage2"),
                        ("wander stage 2 cached", "stage2")):
        torch.manual_seed(0)
        net = WanderNet(wander_cfg).to(device)
        net.set_stage(stage)
        nets[name] = net.train()
    for name, backbone in (("mplmm imer stage 2", "imer"), ("mplmm mult stage 2", "mult")):
        torch.manual_seed(0)
        net = MPLMMNet(config(seq, dims, method="mplmm", options={"backbone": backbone}))
        net.set_stage("stage2")
        nets[name] = net.to(device).train()
    t0 = time.perf_counter()
    report = nets["wander stage 2 cached"].enable_cache([b], probe={**b, "combination": b["comb"]})
    build_s = time.perf_counter() - t0
    if not report["cache_backbone"]:
        raise SystemExit(f"cache refused: {report}")
    modes = {"mculora": "homogeneous", "wander stage 1": "dropout", "wander stage 2 live": "dropout",
             "wander stage 2 cached": "cached", "mplmm imer stage 2": "dropout", "mplmm mult stage 2": "dropout"}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    secs = interleaved({k: step_fn(n, b, modes[k]) for k, n in nets.items()}, reps, sync)
    print(f"\n[{shape}] seq={seq} dims={dims} batch={B} device={device} "
          f"(cache build {build_s * 1e3:.0f} ms for {B} rows; probe {report['cache_probe_max_diff']:.1e})")
    base = secs["mculora"]
    for k, s in secs.items():
        c = nets[k].parameter_counts()
        print(f"  {k:22s} {s * 1e3:8.2f} ms/step  {s / base:5.2f}x mculora   "
              f"trainable {c['trainable']:>9,} / total {c['total']:>9,}")
    print(f"  target: wander stage 2 cached <= 0.30x mculora -> {secs['wander stage 2 cached'] / base:.2f}x")
    print(f"  target: mplmm imer stage 2 <= 1.5x mculora -> {secs['mplmm imer stage 2'] / base:.2f}x; "
          f"mplmm mult stage 2 <= 7x -> {secs['mplmm mult stage 2'] / base:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, reps={args.reps} (medians, interleaved)")
    for shape in args.shapes:
        bench(shape, args.batch, args.reps, args.device)


if __name__ == "__main__":
    main()
