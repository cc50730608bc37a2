"""CGGM step-time overhead: one training step (forward, backward, AdamW step) with and without CGGM.

Default-corpus sizes (acoustic 16x50, textual 32x384, visual 16x300; d_model 64, d_fusion 128,
batch 32), homogeneous batches whose combination cycles through all 7 (as DPFT's sampler
draws them), CPU unless --device says otherwise. Prints median ms per step per setting and
the overhead against the baseline. Not a test.

Run: `PYTHONPATH=. python benchmarks/bench_cggm.py [--steps 210] [--threads 1] [--device cpu] [--e2e 3]`
(--e2e N also times `train_model` for N epochs with and without CGGM, validation included).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.core.modalities import MASKS
from pipeline.methods import MCULoRANet, ModelConfig, orthogonality_loss, task_loss
from pipeline.training.cggm import CGGM
from pipeline.training.cggm_parts import CGGMConfig

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
                  else self.cggm.groups(self.model, 1e-3, 1e-2))
        self.opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=1e-2)
        self.device = device

    def step(self, batch: dict) -> tuple[float, float]:
        """(wall, process CPU) seconds for one full training step; CPU time is less hurt by busy neighbours."""
        model, cggm, opt = self.model, self.cggm, self.opt
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        out = model(batch["features"], batch["lengths"], batch["mask"], batch["combination"])
        loss = task_loss(out.prediction, batch["target"], "classification")
        loss = loss + 0.1 * orthogonality_loss(out.r_spec, out.r_com, out.modality_mask)
        if cggm is not None:
            for w, v in cggm.loss_terms(None, out, batch).values():
                loss = loss + w * v
        loss.backward()
        if cggm is not None:
            cggm.before_optimizer_step(opt)
        opt.step()
        if cggm is not None:
            cggm.after_optimizer_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, time.process_time() - c


def end_to_end(epochs: int, repeats: int) -> None:
    """Wall time of `train_model` (training, 7-combination validation, DPFT) with and without CGGM."""
    import logging
    import tempfile
    from pathlib import Path

    from pipeline.splits import build_splits
    from pipeline.train import train_model
    from pipeline.training.data import MultimodalData
    from tests.factories import make_feature_dataset

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, features = make_feature_dataset(root, n=600, sessions=10, seq_len=LENS, dims=DIMS,
                                                  missing_share=0.06, seed=0)
        build_splits(manifest, features, root / "splits", {"seed": 1})
        data = MultimodalData.load(manifest, features, root / "splits", include=("train", "val"))
        params = {"seed": 1, "max_epochs": epochs, "patience": epochs, "mlflow": {"enabled": False}}
        walls: dict[str, list[float]] = {"baseline": [], "cggm (defaults)": []}
        for r in range(repeats):  # interleaved
            for name in walls:
                extra = {"cggm": {"enabled": True}} if name != "baseline" else {}
                t = time.perf_counter()
                train_model(data, {**params, **extra}, root / f"{name}-{r}".replace(" ", "_"))
                walls[name].append(time.perf_counter() - t)
        print(f"train_model, {len(data.subset('train'))} train / {len(data.subset('val'))} val rows, "
              f"{epochs} epochs (median of {repeats} runs, s)")
        base = statistics.median(walls["baseline"])
        for name, ws in walls.items():
            print(f"  {name:26s} {statistics.median(ws):8.2f} s    overhead {100 * (statistics.median(ws) / base - 1):+6.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds of 7 steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--e2e", type=int, default=0, metavar="EPOCHS",
                        help="also time train_model end to end for EPOCHS epochs (0 = skip)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = batches(7, args.batch_size, device)  # one batch per combination, reused every round
    setups = {name: Setup(overrides, device) for name, overrides in SETTINGS.items()}
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
    rounds = args.warmup + max(1, args.steps // 7)
    for r in range(rounds):  # interleaved round by round, so a noisy neighbour hits every setting alike
        for name, setup in setups.items():
            ts = [setup.step(b) for b in data]
            if r >= args.warmup:
                times[name].append(sum(t for t, _ in ts) / len(ts))
                cpu[name].append(sum(c for _, c in ts) / len(ts))
    base, base_cpu = statistics.median(times["baseline"]), statistics.median(cpu["baseline"])
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{7 * len(times['baseline'])} timed steps per setting (median over rounds of 7, ms per step)")
    for name, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        print(f"  {name:26s} wall {1e3 * med:8.2f} ms ({100 * (med / base - 1):+6.1f} %)   "
              f"cpu {1e3 * med_cpu:8.2f} ms ({100 * (med_cpu / base_cpu - 1):+6.1f} %)")
    if args.e2e:
        end_to_end(args.e2e, repeats=3)


if __name__ == "__main__":
    main()
