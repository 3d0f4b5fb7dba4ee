#!/usr/bin/env python3
"""Training samples/s of BC-ResNet-Mod with the log-mel front end on the hot path vs cached features.

Both variants run the same optimizer steps on the same batches; they alternate round by round so
that load on a shared machine hits both alike, and the ratio comes from one run:

    python benchmarks/train_throughput.py --width 40 --clip-seconds 10 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from asc.features import FeatureConfig, LogMel
from asc.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=40, help="BC-ResNet-Mod width c (default 40: 85,890 params)")
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-mels", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    features = FeatureConfig(n_mels=args.n_mels)
    frontend = LogMel(features)
    samples = int(args.clip_seconds * features.sample_rate)
    waves = torch.randn(args.batch, samples) * 0.1
    with torch.no_grad():
        cached = frontend(waves)
    model = build_model("bcresnet_mod", 10, width=args.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    labels = torch.randint(0, 10, (args.batch,))

    def step(on_hot_path: bool) -> None:
        with torch.no_grad():
            x = frontend(waves) if on_hot_path else cached.clone()
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def round_rate(on_hot_path: bool) -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            step(on_hot_path)
        return args.steps * args.batch / (time.perf_counter() - start)

    step(True)
    step(False)  # warm-up
    hot, warm = [], []
    for _ in range(args.rounds):
        hot.append(round_rate(True))
        warm.append(round_rate(False))
    hot_rate, cached_rate = statistics.median(hot), statistics.median(warm)
    params = sum(p.numel() for p in model.parameters())
    print(f"BC-ResNet-Mod c={args.width} ({params:,} params), input 1 x {cached.shape[2]} x {cached.shape[3]} "
          f"({args.clip_seconds:g}-s clips), batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"front end on the hot path   {hot_rate:8.1f} samples/s   1.00x")
    print(f"cached log-mel features     {cached_rate:8.1f} samples/s   {cached_rate / hot_rate:.2f}x")
    print(f"front end share of a training step: {100 * (1 - hot_rate / cached_rate):.1f} %")


if __name__ == "__main__":
    main()
