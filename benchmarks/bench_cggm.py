"""CGGM step-time overhead: one training step (forward, backward, AdamW step) with and without CGGM.

Default-corpus sizes (acoustic 16x50, textual 32x384, visual 16x300; d_model 64, d_fusion 128,
batch 32), homogeneous batches whose combination cycles through all 7 (as DPFT's sampler
draws them), CPU unless --device says otherwise. Prints median ms per step per setting and
the overhead against the baseline. Not a test.

Run: `python benchmarks/bench_cggm.py [--steps 200] [--threads 1] [--device cpu]`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.core.modalities import MASKS
from pipeline.methods import MCULoRANet, ModelConfig, orthogonality_loss, task_loss
from pipeline.training.cggm import CGGM
from pipeline.training.cggm_signal import CGGMConfig

DIMS, LENS = {"a": 50, "t": 384, "v": 300}, {"a": 16, "t": 32, "v": 16}
SETTINGS = {
    "baseline": None,
    "cggm lr+logit (default)": {},
    "cggm grad+logit": {"apply": "grad"},
    "cggm lr+weight_grad": {"direction": "weight_grad"},
    "cggm lr, direction off": {"direction": "off"},
}


def batches(n: int, batch_size: int, device: torch.device, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        c = i % 7
        present = torch.as_tensor(MASKS[c]).expand(batch_size, 3)  # (B, 3)
        feats = {m: torch.randn(batch_size, LENS[m], DIMS[m], generator=g).to(device) for m in "atv"}
        lens = {m: torch.where(present[:, j], torch.randint(1, LENS[m] + 1, (batch_size,), generator=g), 0).to(device)
                for j, m in enumerate("atv")}
        out.append({"features": feats, "lengths": lens, "mask": present.clone().to(device), "combination": c,
                    "target": torch.randint(0, 4, (batch_size,), generator=g).to(device)})
    return out


class Setup:
    """A fresh network (same init), optimizer and optional CGGM for one setting."""

    def __init__(self, overrides: dict | None, device: torch.device):
        torch.manual_seed(0)
        self.model = MCULoRANet(ModelConfig(input_dims=DIMS, seq_lens=LENS, n_outputs=4)).to(device).train()
        self.cggm = None if overrides is None else CGGM.for_model(CGGMConfig(enabled=True, **overrides),
                                                                  self.model).to(device)
        groups = ([p for p in self.model.parameters() if p.requires_grad] if self.cggm is None
                  else self.cggm.param_groups(self.model, 1e-3, 1e-2))
        self.opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=1e-2)
        self.device = device

    def step(self, batch: dict) -> float:
        """Seconds for one full training step."""
        model, cggm, opt = self.model, self.cggm, self.opt
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(batch["features"], batch["lengths"], batch["mask"], batch["combination"])
        loss = task_loss(out.prediction, batch["target"], "classification")
        loss = loss + 0.1 * orthogonality_loss(out.r_spec, out.r_com, out.modality_mask)
        if cggm is not None:
            for w, v in cggm.loss_terms(out, batch).values():
                loss = loss + w * v
        loss.backward()
        if cggm is not None:
            cggm.before_optimizer_step(opt)
        opt.step()
        if cggm is not None:
            cggm.after_optimizer_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds of 7 steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = batches(7, args.batch_size, device)  # one batch per combination, reused every round
    setups = {name: Setup(overrides, device) for name, overrides in SETTINGS.items()}
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    rounds = args.warmup + max(1, args.steps // 7)
    for r in range(rounds):  # interleaved round by round, so a noisy neighbour hits every setting alike
        for name, setup in setups.items():
            ts = [setup.step(b) for b in data]
            if r >= args.warmup:
                times[name].append(sum(ts) / len(ts))
    base = statistics.median(times["baseline"])
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{7 * len(times['baseline'])} timed steps per setting (median over rounds of 7, ms per step)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:26s} {1e3 * med:8.2f} ms   overhead {100 * (med / base - 1):+6.1f} %")


if __name__ == "__main__":
    main()
