"""The runtime's front end and WAV -> label latency, next to the previous implementation, in one run.

    python benchmarks/frontend.py [--width 40] [--repeats 40] [--threads 1 2] [--int8 qat|planned]

Everything is one 10-s clip at 44.1 kHz with the DCASE 2021 settings (256 mels, n_fft 2048, hop
1024), batch 1. The machine this project runs on is shared, so every table is one round-robin loop
(each repetition runs every variant once) and its ratios are from that loop; the load average is
printed with the CPU line.

Times are CPU time of the calling thread (``time.thread_time``), the machine's other jobs
preempting a run do not inflate it; everything in sections 1-2 runs on that one thread (numpy,
scipy's FFT, onnxruntime with one intra-op thread). Wall-clock medians are printed beside them.
Section 3 compares thread counts, so it is wall time.

1. **Front end alone**: librosa (the reference), torch ``LogMel`` at 1 thread (training), the
   previous ``FastLogMel`` and the current one, with their parity with librosa in float64.
2. **WAV -> label at 1 thread**: a 16-bit WAV decoded, framed into the model's window, log-mel,
   onnxruntime, softmax, for a random-weight BC-ResNet-Mod (c = ``--width``) exported fp32 and as
   int8: by default the int8 graph ``asc export`` writes for a QAT run (ranges observed on a few
   clips instead of trained, the same structure and rewrites), with ``--int8 planned`` the planned
   post-training int8 of ``asc export --int8``. The pipeline is timed stage by stage; the
   previous one (libsndfile's float decode with a channel mean, the previous ``FastLogMel``) runs
   in the same loop, and ``Classifier.classify_file`` on a bundle of the same model checks that
   the staged pipeline is what the runtime does. Front-end share = front-end median over
   end-to-end median; real-time factor = end-to-end time over 10 s.
3. **Threads**: fp32 and int8 at each ``--threads`` count, with onnxruntime's default spinning
   workers and with the runtime's sleeping ones (:func:`asc.runtime.session_options`), in one
   loop, and the thread count the policy (:func:`asc.bench.recommend_intra_op_threads`) picks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import librosa
import numpy as np
import onnx
import onnxruntime as ort
import scipy.fft
import scipy.sparse
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latency import qat_export  # benchmarks/latency.py: the QAT path, ranges observed

from asc.audio import fit_length, load_audio, write_audio
from asc.bench import Timing, cpu_line, interleaved, recommend_intra_op_threads
from asc.bundle_manifest import BundleManifest
from asc.export.onnx import FEATURE_INPUT, OUTPUT, save_onnx, torch_to_onnx
from asc.export.precision import (
    QAT_REWRITES,
    PrecisionPlan,
    quantize_planned,
    rewrite_for_int8,
)
from asc.feature_spec import (
    FRONTEND_ARRAYS_NAME,
    FastLogMel,
    FeatureConfig,
    FrontendArrays,
    log_mel,
)
from asc.features import LogMel
from asc.models import build_model
from asc.runtime import Classifier, session_options

CLIP_SECONDS = 10.0
LABELS = [f"scene{i}" for i in range(10)]


class PreviousFastLogMel:
    """``asc.feature_spec.FastLogMel`` before this change (commit 13e539d), kept to time against.

    Whole-clip passes: the padded copy, every windowed frame, the complex spectrum and its
    transposed magnitude are each a fresh multi-MB array.
    """

    def __init__(self, config: FeatureConfig, arrays: FrontendArrays) -> None:
        self.config = config
        self._window = arrays.window
        self._filterbank = scipy.sparse.csr_array(arrays.mel_filterbank)
        self._pad = config.n_fft // 2 if config.center else 0

    def __call__(self, clips: np.ndarray) -> np.ndarray:
        cfg = self.config
        out = np.empty((len(clips), 1, cfg.n_mels, cfg.num_frames(clips.shape[1])), dtype=np.float32)
        for clip, features in zip(clips, out[:, 0]):
            padded = np.pad(clip, self._pad, mode=cfg.pad_mode) if self._pad else clip
            frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft)[:: cfg.hop_length]
            spectrum = scipy.fft.rfft(frames * self._window, axis=-1)
            magnitude = np.abs(spectrum.T, order="C")
            np.square(magnitude, out=magnitude)
            np.log(self._filterbank @ magnitude + np.float32(cfg.log_eps), out=features)
        return out


def previous_decode(path: Path) -> np.ndarray:
    """``asc.audio.load_audio`` before this change: libsndfile's float conversion, then a channel mean."""
    with sf.SoundFile(path) as handle:
        frames = handle.read(dtype="float32", always_2d=True)
    if not np.isfinite(frames).all():
        raise ValueError(f"{path}: non-finite samples")
    return frames.mean(axis=1)


def scene_clip(config: FeatureConfig, seed: int) -> np.ndarray:
    """Noise, a chirp and a tone: every band carries energy, as in a recorded scene."""
    n = int(CLIP_SECONDS * config.sample_rate)
    rng = np.random.default_rng(seed)
    chirp = librosa.chirp(fmin=50, fmax=16000, sr=config.sample_rate, length=n)
    tone = np.sin(2 * np.pi * (300 + 100 * seed) * np.arange(n) / config.sample_rate)
    return (0.2 * chirp + 0.1 * tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


def random_model(width: int, features: np.ndarray) -> torch.nn.Module:
    """BC-ResNet-Mod with random weights and BN statistics from a few real-looking log-mels."""
    torch.manual_seed(0)
    model = build_model("bcresnet_mod", len(LABELS), width=width, freq_norm="resnorm").train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.from_numpy(features))
    return model.eval()


def qat_int8(model: torch.nn.Module, calibration: list[np.ndarray], work: Path) -> Path:
    """The int8 file ``asc export`` writes for a QAT run of ``model``, ranges observed on ``calibration``."""
    exported = qat_export(model, calibration[0].shape[2:], calibration[:4], work / "qat.onnx")
    return save_onnx(rewrite_for_int8(onnx.load(str(exported)), QAT_REWRITES)[0], work / "int8.onnx")


def write_bundle(folder: Path, model: Path, config: FeatureConfig, precision: str, arrays: FrontendArrays) -> Path:
    """A bundle of ``model`` as the exporter lays it out (external front end, shipped arrays)."""
    folder.mkdir()
    (folder / "model.onnx").write_bytes(model.read_bytes())
    arrays.save(folder / FRONTEND_ARRAYS_NAME)
    clip = int(CLIP_SECONDS * config.sample_rate)
    manifest = BundleManifest(labels=LABELS, sample_rate=config.sample_rate, clip_samples=clip,
                              frontend=config.to_dict(), frontend_in_graph=False, precision=precision,  # type: ignore[arg-type]
                              input_name=FEATURE_INPUT, input_shape=["batch", 1, config.n_mels, config.num_frames(clip)],
                              output_name=OUTPUT, frontend_file=FRONTEND_ARRAYS_NAME)
    (folder / "bundle.json").write_text(manifest.to_json())
    return folder


class StagedPipeline:
    """WAV -> label as ``Classifier.classify_file`` does it for one clip, with each stage's time kept."""

    def __init__(self, decode: Callable[[Path], np.ndarray], frontend: Callable[[np.ndarray], np.ndarray],
                 session: ort.InferenceSession, clip_samples: int) -> None:
        self.decode, self.frontend, self.session, self.clip_samples = decode, frontend, session, clip_samples
        self.stages: dict[str, list[float]] = {"decode": [], "front end": [], "model": []}  # CPU seconds

    def __call__(self, path: Path) -> int:
        t0 = time.thread_time()
        audio = self.decode(path)
        t1 = time.thread_time()
        features = self.frontend(fit_length(audio, self.clip_samples)[None])
        t2 = time.thread_time()
        (logits,) = self.session.run([OUTPUT], {FEATURE_INPUT: features})
        t3 = time.thread_time()
        for stage, seconds in zip(self.stages, (t1 - t0, t2 - t1, t3 - t2)):
            self.stages[stage].append(seconds)
        return int(np.argmax(logits[0]))  # softmax is monotonic: the label is the argmax


def load_note() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def frontend_alone(config: FeatureConfig, arrays: FrontendArrays, clip: np.ndarray, repeats: int) -> None:
    module = LogMel(config).eval()
    previous, current = PreviousFastLogMel(config, arrays), FastLogMel(config, arrays)
    batch = clip[None]

    def torch_one_thread() -> torch.Tensor:
        with torch.inference_mode():
            return module(torch.from_numpy(batch))

    frames = np.lib.stride_tricks.sliding_window_view(np.pad(clip, config.n_fft // 2), config.n_fft)[:: config.hop_length]
    windowed = frames * arrays.window
    calls = {"librosa (reference)": lambda: log_mel(clip, config),
             "torch LogMel, 1 thread": torch_one_thread,
             "previous FastLogMel": lambda: previous(batch),
             "FastLogMel": lambda: current(batch),
             "its floor: the rfft alone": lambda: scipy.fft.rfft(windowed, axis=-1)}
    reference = log_mel(clip, config, dtype=np.float64)
    outputs = {"torch LogMel, 1 thread": torch_one_thread().numpy(), "previous FastLogMel": previous(batch),
               "FastLogMel": current(batch)}
    cpu = interleaved(calls, repeats=repeats, clock=time.thread_time)
    wall = interleaved(calls, repeats=repeats)
    print(f"\n1. front end alone, one {CLIP_SECONDS:g}-s clip, 1 thread (median of {repeats}, one loop per clock; "
          f"{load_note()})")
    print(f"  {'implementation':<26} {'CPU ms':>7} {'vs previous':>11} {'wall ms':>8} {'vs previous':>11}  "
          "max |d - librosa f64| / max |ref|")
    for name in calls:
        error = (f"{np.abs(outputs[name][0, 0] - reference).max() / np.abs(reference).max():.1e}"
                 if name in outputs else "-")
        print(f"  {name:<26} {cpu[name].median_ms:7.2f} "
              f"{cpu[name].median_ms / cpu['previous FastLogMel'].median_ms:10.2f}x {wall[name].median_ms:8.2f} "
              f"{wall[name].median_ms / wall['previous FastLogMel'].median_ms:10.2f}x  {error}")


def wav_to_label(config: FeatureConfig, arrays: FrontendArrays, models: dict[str, Path], bundles: dict[str, Path],
                 wav: Path, repeats: int) -> None:
    clip_samples = int(CLIP_SECONDS * config.sample_rate)
    pipelines: dict[str, StagedPipeline] = {}
    classifiers: dict[str, Classifier] = {}
    for precision, path in models.items():
        session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        pipelines[f"{precision} previous"] = StagedPipeline(previous_decode, PreviousFastLogMel(config, arrays),
                                                            session, clip_samples)
        pipelines[f"{precision} now"] = StagedPipeline(lambda p: load_audio(p, config.sample_rate)[0],
                                                       FastLogMel(config, arrays), session, clip_samples)
        classifiers[precision] = Classifier(bundles[precision], threads=1)
    labels = {name: pipeline(wav) for name, pipeline in pipelines.items()}
    for precision, classifier in classifiers.items():  # the staged pipeline is the runtime's
        assert classifier.classify_file(wav).label == LABELS[labels[f"{precision} now"]]
        assert labels[f"{precision} previous"] == labels[f"{precision} now"]
    calls: dict[str, Callable[[], object]] = {name: (lambda p=pipeline: p(wav)) for name, pipeline in pipelines.items()}
    calls.update({f"{precision} Classifier.classify_file": (lambda c=classifier: c.classify_file(wav))
                  for precision, classifier in classifiers.items()})
    for pipeline in pipelines.values():
        for times in pipeline.stages.values():
            times.clear()
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    wall: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):  # round-robin, both clocks of the same runs
        for name, call in calls.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            call()
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    print(f"\n2. WAV -> label, one {CLIP_SECONDS:g}-s 16-bit WAV at {config.sample_rate} Hz, 1 thread "
          f"(median of {repeats}, one loop; {load_note()})")
    print(f"  {'pipeline':<34} {'CPU ms':>7} {'RTF':>7} {'decode':>7} {'front end':>9} {'model':>7} "
          f"{'front-end share':>15} {'+ decode':>8} {'wall ms':>8}")
    for name in calls:
        total, elapsed = Timing.of(cpu[name]).median_ms, Timing.of(wall[name]).median_ms
        line = f"  {name:<34} {total:7.2f} {total / 1e3 / CLIP_SECONDS:7.4f}"
        if name in pipelines:
            stage = {s: Timing.of(v).median_ms for s, v in pipelines[name].stages.items()}
            line += (f" {stage['decode']:7.2f} {stage['front end']:9.2f} {stage['model']:7.2f} "
                     f"{stage['front end'] / total:15.1%} {(stage['decode'] + stage['front end']) / total:8.1%}")
        else:
            line += " " * 51
        print(f"{line} {elapsed:8.2f}")


def thread_table(models: dict[str, Path], feed: np.ndarray, threads: list[int], repeats: int) -> None:
    calls: dict[tuple[str, str, int], Callable[[], object]] = {}
    for precision, path in models.items():
        for count in threads:
            for workers in ("spinning", "sleeping"):
                options = session_options(count, spinning=workers == "spinning")  # spinning: onnxruntime's default
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                calls[precision, workers, count] = (lambda s=session: s.run(None, {FEATURE_INPUT: feed}))
    timings = interleaved(calls, repeats=repeats)
    print(f"\n3. model alone on one clip's log-mel, by intra-op threads (median of {repeats}, one loop; {load_note()})")
    print(f"  {'workers':<9} {'threads':>7} {'fp32 ms':>8} {'int8 ms':>8} {'int8/fp32':>9} {'(p10)':>7} "
          f"{'fp32 vs 1 thr':>13} {'int8 vs 1 thr':>13}")
    for workers in ("spinning", "sleeping"):
        for count in threads:
            fp32, int8 = timings["fp32", workers, count], timings["int8", workers, count]
            print(f"  {workers:<9} {count:>7} {fp32.median_ms:8.2f} {int8.median_ms:8.2f} "
                  f"{int8.median_ms / fp32.median_ms:8.2f}x {int8.p10_ms / fp32.p10_ms:6.2f}x "
                  f"{fp32.median_ms / timings['fp32', workers, threads[0]].median_ms:12.2f}x "
                  f"{int8.median_ms / timings['int8', workers, threads[0]].median_ms:12.2f}x")
    for precision in models:
        chosen = recommend_intra_op_threads({count: timings[precision, "sleeping", count] for count in threads})
        print(f"  policy (runtime options): {precision} runs {chosen} thread{'s' if chosen > 1 else ''}")
    chosen = {p: recommend_intra_op_threads({c: timings[p, "sleeping", c] for c in threads}) for p in models}
    ratio = timings["int8", "sleeping", chosen["int8"]].median_ms / timings["fp32", "sleeping", chosen["fp32"]].median_ms
    print(f"  int8 at its policy threads vs fp32 at its policy threads: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=40, help="BC-ResNet-Mod width c (default 40)")
    parser.add_argument("--repeats", type=int, default=40, help="timed repeats per loop (default 40)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (default 1 2)")
    parser.add_argument("--int8", choices=("qat", "planned"), default="qat",
                        help="int8 model: a QAT run's export (default) or planned post-training int8")
    args = parser.parse_args()

    torch.set_num_threads(1)
    config = FeatureConfig()
    arrays = FrontendArrays.compute(config)
    clip = scene_clip(config, seed=0)
    print(f"cpu: {cpu_line()}; {os.cpu_count()} cores; numpy {np.__version__}, scipy {scipy.__version__}, "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}")
    frontend_alone(config, arrays, clip, args.repeats)

    with tempfile.TemporaryDirectory(prefix="asc-frontend-") as tmp:
        work = Path(tmp)
        calibration = [FastLogMel(config, arrays)(scene_clip(config, seed)[None]) for seed in range(1, 9)]
        model = random_model(args.width, np.concatenate(calibration[:4]))
        example = torch.from_numpy(np.concatenate(calibration[:2]))
        fp32 = save_onnx(torch_to_onnx(model, example, input_name=FEATURE_INPUT), work / "fp32.onnx")
        int8 = (qat_int8(model, calibration, work) if args.int8 == "qat"
                else quantize_planned(fp32, work / "int8.onnx", calibration, PrecisionPlan()))
        models = {"fp32": fp32, "int8": int8}
        bundles = {p: write_bundle(work / f"bundle-{p}", path, config, p, arrays) for p, path in models.items()}
        wav = work / "clip.wav"
        write_audio(wav, clip, config.sample_rate, subtype="PCM_16")
        int8_note = ("a QAT run's export (asc.export.precision.QAT_REWRITES)" if args.int8 == "qat"
                     else f"quantize_planned(PrecisionPlan()): {PrecisionPlan().describe()}")
        print(f"\nmodel: BC-ResNet-Mod c={args.width}, random weights, input 1x1x{config.n_mels}x"
              f"{config.num_frames(len(clip))}; int8 = {int8_note}")
        wav_to_label(config, arrays, models, bundles, wav, args.repeats)
        thread_table(models, FastLogMel(config, arrays)(clip[None]), args.threads, args.repeats)


if __name__ == "__main__":
    main()
