"""Dialogue context at IEMOCAP size: epoch time (dialogue vs utterance) and memory against dialogue length.

Prints figures, asserts nothing (targets of issue 14):
- a `train.context: dialogue` epoch within 1.5x of an utterance epoch on the same features:
  5,531 utterances in ~151 dialogues, random features of the GCNet dims (1024 / 1024 / 342,
  one vector per utterance). Seconds per epoch = (time of an E2-epoch run - time of an
  E1-epoch run) / (E2 - E1), so set-up, statistics and the final save cancel out; validation
  is included (both modes validate every epoch).
- memory linear in dialogue length: the bytes autograd keeps for backward in one forward pass
  of the context encoder, over a fixed number of utterances arranged in dialogues of length L.
  Per utterance, a linear encoder keeps a constant; attention probabilities add H * L floats per
  utterance (the L x L scores of its dialogue), which the figures show separately.

Usage: python -m benchmarks.bench_context [--utterances 5531] [--dialogues 151] [--epochs 1 3]
       [--lengths 16 32 64 128 256 512] [--skip-epochs] [--skip-memory]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GCNET_DIMS = {"a": 1024, "t": 1024, "v": 342}


def epoch_seconds(root: Path, context: str, epochs: tuple[int, int], utterances: int, dialogues: int) -> float:
    from pipeline.splits import build_splits
    from pipeline.train import train_model
    from pipeline.training.data import MultimodalData
    from tests.factories import make_feature_dataset

    data_dir = root / "data"
    if not (data_dir / "splits").exists():
        turns = max(1, round(utterances / dialogues))
        make_feature_dataset(data_dir, n=utterances, seq_len=1, dims=GCNET_DIMS, missing_share=0.1, seed=0,
                             dialogue_turns=turns)
        build_splits(data_dir / "manifest.parquet", data_dir / "features", data_dir / "splits", {"seed": 1})
    cfg = {"seed": 1, "patience": 100, "context": context, "mlflow": {"enabled": False}, "num_threads": 0}
    times = []
    for e in epochs:
        data = MultimodalData.load(data_dir / "manifest.parquet", data_dir / "features", data_dir / "splits",
                                   include=("train", "val"))
        start = time.perf_counter()
        train_model(data, {**cfg, "max_epochs": e}, root / f"{context}-{e}")
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (epochs[1] - epochs[0])


def saved_bytes(length: int, utterances: int, d: int = 128) -> dict[str, float]:
    """Bytes autograd saves in one context-encoder forward: utterances in dialogues of `length` turns."""
    from pipeline.methods.config import ModelConfig
    from pipeline.methods.context import ContextEncoder, dense_layout

    cfg = ModelConfig(input_dims={"a": 1, "t": 1, "v": 1}, seq_lens={"a": 1, "t": 1, "v": 1}, d_fusion=d,
                      context="dialogue")
    enc = ContextEncoder(cfg, d)
    n = (utterances // length) * length
    ids = np.repeat(np.arange(n // length), length)
    layout = dense_layout(ids, np.tile(np.arange(length), n // length), np.tile(["a", "b"], n // 2 + 1)[:n])
    from pipeline.methods.mcla import set_active_combination

    set_active_combination(enc, 6)
    h = torch.randn(n, d, requires_grad=True)
    total, quadratic = [0], [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        size = t.numel() * t.element_size()
        total[0] += size
        if t.dim() >= 3 and t.shape[-1] == t.shape[-2] == length and length > 1:  # (.., L, L) scores / masks
            quadratic[0] += size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc(h, layout).sum().backward()
    return {"per_utterance_bytes": total[0] / n, "attention_share": quadratic[0] / max(total[0], 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=5531)
    ap.add_argument("--dialogues", type=int, default=151)
    ap.add_argument("--epochs", type=int, nargs=2, default=(1, 3))
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--skip-epochs", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)
    if not args.skip_epochs:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            per = {c: epoch_seconds(root, c, tuple(args.epochs), args.utterances, args.dialogues)
                   for c in ("utterance", "dialogue")}
        print(f"epoch seconds ({args.utterances} utterances, ~{args.dialogues} dialogues, GCNet dims, CPU threads "
              f"{torch.get_num_threads()}): utterance {per['utterance']:.2f}  dialogue {per['dialogue']:.2f}  "
              f"ratio {per['dialogue'] / per['utterance']:.2f}x (target <= 1.5x)")
    if not args.skip_memory:
        print("context encoder, bytes kept for backward per utterance (d=128, 1 layer, 4 heads):")
        for length in args.lengths:
            row = saved_bytes(length, 4096)
            print(f"  dialogue length {length:4d}: {row['per_utterance_bytes']:9.0f} B/utterance, "
                  f"attention scores {100 * row['attention_share']:5.1f} %")


if __name__ == "__main__":
    main()
