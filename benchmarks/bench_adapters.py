"""Cost of the MCLA adapters on CPU (prints figures; no asserts).

1. Training step (forward + backward + AdamW step, homogeneous batch) for variants mculora,
   no_specific and plain. Goal: mculora within 1.15x of no_specific (only the active
   combination's adapter is computed, so the 7 extra adapters should cost ~nothing).
2. Validation under all 7 combinations vs 7 plain forward passes.
3. Mixed-combination batch: "group" vs "gather" serving.

Usage: python benchmarks/bench_adapters.py [--batch 32] [--reps 20] [--threads 0] [--cpu-time]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.methods import MCULoRANet, ModelConfig, task_loss

# Representative feature shapes: eGeMAPS LLD mean+std per segment, MiniLM tokens, HOG+LBP faces.
SEQ = {"a": 16, "t": 32, "v": 16}
DIMS = {"a": 50, "t": 384, "v": 1024}


def make_batch(B: int, seed: int = 0) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, SEQ[m], DIMS[m], generator=g) for m in SEQ}
    lengths = {m: torch.randint(SEQ[m] // 2, SEQ[m] + 1, (B,), generator=g) for m in SEQ}
    return feats, lengths, torch.ones(B, 3, dtype=torch.bool), torch.randint(0, 4, (B,), generator=g)


def build(variant: str, mixed_mode: str = "group") -> MCULoRANet:
    torch.manual_seed(0)
    return MCULoRANet(ModelConfig(input_dims=DIMS, seq_lens=SEQ, variant=variant, mixed_mode=mixed_mode))


NAMES = ("a", "t", "v", "at", "av", "tv", "atv")
MASKS = torch.tensor([[m in name for m in "atv"] for name in NAMES])  # (7, 3)


CLOCK = time.perf_counter  # set to time.process_time by --cpu-time


def interleaved(fns: dict[str, callable], reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, run round-robin so load drift hits all of them alike."""
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_fn(net: MCULoRANet, feats, lengths, mask, target, comb: int | None):
    """One forward+backward+AdamW step; comb None cycles through the 7 combinations."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    counter = iter(range(10**9))

    def step() -> None:
        c = next(counter) % 7 if comb is None else comb
        loss = task_loss(net(feats, lengths, mask & MASKS[c], combination=c).prediction, target, "classification")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time (robust when other jobs share the cores)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    feats, lengths, mask, target = make_batch(args.batch)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, "
          f"seq={SEQ}, dims={DIMS}, reps={args.reps}, "
          f"clock={'process CPU time' if args.cpu_time else 'wall'} (medians, variants interleaved)")
    variants = ("mculora", "no_specific", "plain")
    nets = {v: build(v).train() for v in variants}
    for v, net in nets.items():
        c = net.parameter_counts()
        print(f"  {v:12s} params {c['total']:,} (adapters {c['adapters']:,})")

    for label, comb in (("cycling a..atv", None), ("atv only", 6)):
        fns = {v: train_step_fn(nets[v], feats, lengths, mask, target, comb) for v in variants}
        ms = {k: t * 1e3 for k, t in interleaved(fns, args.reps * (7 if comb is None else 1)).items()}
        print(f"\n1) training step, homogeneous batch, {label}: " +
              ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
        print(f"   mculora / no_specific = {ms['mculora'] / ms['no_specific']:.3f} (goal <= 1.15); "
              f"mculora / plain = {ms['mculora'] / ms['plain']:.3f}")

    def seven(net: MCULoRANet):
        def run() -> None:
            with torch.no_grad():
                for c in range(7):
                    net(feats, lengths, mask & MASKS[c], combination=c)
        return run
    ms = {k: t * 1e3 for k, t in interleaved({v: seven(nets[v].eval()) for v in variants}, args.reps).items()}
    print("\n2) validation forward under all 7 combinations (no_grad): " +
          ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()) +
          f"; mculora / plain = {ms['mculora'] / ms['plain']:.3f}")

    comb = torch.arange(args.batch) % 7
    mixed = {mode: build("mculora", mode).eval() for mode in ("group", "gather")}
    mixed["gather"].load_state_dict(mixed["group"].state_dict())

    def mixed_fn(net: MCULoRANet):
        def run() -> None:
            with torch.no_grad():
                net(feats, lengths, MASKS[comb], combination=comb)
        return run
    ms = {k: t * 1e3 for k, t in interleaved({k: mixed_fn(n) for k, n in mixed.items()}, args.reps).items()}
    print("\n3) mixed-combination batch (all 7 present), eval forward: " +
          ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))


if __name__ == "__main__":
    main()
