"""Throughput of the batched torch front end against librosa on the same clips, in one run.

    python benchmarks/frontend.py [--clips 16] [--repeats 5]

librosa computes one clip at a time (melspectrogram + log), as a per-file preprocessing script
would; ``asc.features.LogMel`` takes the whole batch. The torch figure is also given with one
thread, since librosa's FFT is single-threaded. Both use the DCASE 2021 defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import librosa
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asc.features import FeatureConfig, LogMel  # noqa: E402

CLIP_SECONDS = 10.0


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each run, interleaved round by round so load changes hit all alike."""
    for run in runs.values():
        run()  # warm-up: allocator, FFT plans, lazy imports
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def make_clips(config: FeatureConfig, count: int) -> np.ndarray:
    """Noise plus a chirp per clip, so every mel band carries energy."""
    num_samples = int(CLIP_SECONDS * config.sample_rate)
    rng = np.random.default_rng(0)
    chirp = librosa.chirp(fmin=50, fmax=16000, sr=config.sample_rate, length=num_samples)
    noise = rng.standard_normal((count, num_samples))
    return (0.3 * chirp + 0.05 * noise).astype(np.float32)


def librosa_log_mel(clips: np.ndarray, config: FeatureConfig) -> np.ndarray:
    kwargs = config.librosa_kwargs()
    mels = [librosa.feature.melspectrogram(y=clip, **kwargs) for clip in clips]
    return np.log(np.stack(mels) + config.log_eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=16, help="clips per batch (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    args = parser.parse_args()

    config = FeatureConfig()
    clips = make_clips(config, args.clips)
    batch = torch.from_numpy(clips)
    module = LogMel(config).eval()
    threads = torch.get_num_threads()

    def torch_log_mel() -> torch.Tensor:
        with torch.inference_mode():
            return module(batch)

    def torch_one_thread() -> torch.Tensor:
        torch.set_num_threads(1)
        try:
            return torch_log_mel()
        finally:
            torch.set_num_threads(threads)

    reference = librosa_log_mel(clips, config)
    ours = torch_log_mel()[:, 0].double().numpy()
    seconds = median_seconds(
        {
            "librosa, per clip": lambda: librosa_log_mel(clips, config),
            f"asc LogMel, batched, {threads} threads": torch_log_mel,
            "asc LogMel, batched, 1 thread": torch_one_thread,
        },
        args.repeats,
    )

    print(
        f"front end: {args.clips} clips x {CLIP_SECONDS:g} s at {config.sample_rate} Hz -> "
        f"{tuple(ours.shape)} log-mel per batch, median of {args.repeats} interleaved repeats"
    )
    difference = np.abs(ours - reference).max() / np.abs(reference).max()
    print(f"log-mel max |torch - librosa| / max |librosa|: {difference:.1e}")
    librosa_s = seconds["librosa, per clip"]
    for name, elapsed in seconds.items():
        rate = args.clips / elapsed
        print(f"{name:<34} {rate:8.1f} clips/s  {librosa_s / elapsed:5.2f}x librosa")


if __name__ == "__main__":
    main()
