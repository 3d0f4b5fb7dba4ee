"""Latency of an exported bundle on this machine: per-clip time, real-time factor, load time, front-end share.

Torch-free (numpy, scipy, onnxruntime, librosa through :mod:`asc.feature_spec`), so it runs where the
bundle is deployed. The machine this project runs on is shared, so everything is timed in one
round-robin loop (each repetition runs every variant at every thread count once): a load spike
then slows all of them alike instead of one, and the thread-count policy compares like with like.

What is timed for one clip of the bundle's length, batch 1:

* ``end_to_end``: audio in, logits out. For an external front end that is the numpy log-mel
  the runtime uses (:class:`asc.feature_spec.FastLogMel`) followed by the model; for an in-graph
  front end, the one graph.
* ``frontend`` and ``model``: the two halves alone. For an in-graph bundle the graph is cut at
  the tensor the front-end nodes (named ``frontend.*`` by the exporter) hand to the CNN, and
  each half runs as its own onnxruntime session.
* ``load``: creating a session from ``model.onnx`` and, when the bundle has one, ``model.ort``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from asc.bundle_manifest import BundleManifest
from asc.errors import ConfigError
from asc.feature_spec import FastLogMel
from asc.runtime import bundle_frontend, model_bytes, open_session, session_options

K = TypeVar("K", bound=Hashable)

FRONTEND_PREFIX = "frontend."
"""Node-name prefix of the front end inside an in-graph bundle (``asc.export.onnx.compose_frontend``)."""


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated runs, in milliseconds."""

    median_ms: float
    p90_ms: float
    runs: int
    #: the fast tail: on a shared machine, what a run gets when nothing else holds the core
    p10_ms: float = float("nan")

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(float(np.median(ms)), float(np.percentile(ms, 90)), len(ms), float(np.percentile(ms, 10)))


@dataclass(frozen=True)
class ThreadResult:
    """One clip through the bundle at one intra-op thread count."""

    threads: int
    end_to_end: Timing
    model: Timing | None  #: the CNN alone on log-mel input; None when an in-graph graph cannot be cut
    frontend: Timing | None  #: the front end alone; None likewise
    clip_seconds: float

    @property
    def real_time_factor(self) -> float:
        """Processing time over audio time (0.01: one second of audio takes 10 ms)."""
        return self.end_to_end.median_ms / 1e3 / self.clip_seconds

    @property
    def frontend_share(self) -> float | None:
        """Front-end time over front end + model time, both measured alone in the same loop."""
        if self.frontend is None or self.model is None:
            return None
        return self.frontend.median_ms / (self.frontend.median_ms + self.model.median_ms)


@dataclass(frozen=True)
class LoadTiming:
    file: str
    size_bytes: int
    load: Timing


@dataclass(frozen=True)
class BundleBench:
    bundle_dir: Path
    precision: str
    frontend_in_graph: bool
    clip_seconds: float
    results: tuple[ThreadResult, ...]
    loads: tuple[LoadTiming, ...]

    @property
    def recommended_threads(self) -> int:
        """The ``runtime.intra_op_threads`` these timings call for (:func:`recommend_intra_op_threads`)."""
        return recommend_intra_op_threads({r.threads: r.end_to_end for r in self.results})


THREAD_GAIN = 0.15
"""How much faster (median) a clip must get before :func:`recommend_intra_op_threads` spends another
core on it: an app's own work, or a neighbour's, is worth more than a few per cent of a 10-ms call."""


def recommend_intra_op_threads(timings: Mapping[int, Timing], min_gain: float = THREAD_GAIN) -> int:
    """The thread-count policy: the fewest threads, unless more cut the median by ``min_gain``.

    ``timings`` must come from one round-robin loop (:func:`interleaved`). Small models stay at one
    thread even where two are allowed, because thread hand-offs cost more than the split work saves.
    """
    if not timings:
        raise ConfigError("bench: no timings to choose a thread count from")
    chosen = min(timings)
    for count in sorted(timings):
        if timings[count].median_ms <= timings[chosen].median_ms * (1 - min_gain):
            chosen = count
    return chosen


INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
"""CPU features that decide which int8 kernels onnxruntime's MLAS runs (x86, then ARM64 dot product/i8mm)."""


def cpu_line(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``MODEL; int8 flags: ...`` for this machine: every latency figure is only true of its CPU."""
    model, flags = "unknown CPU", set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model name") and model == "unknown CPU":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return f"{model}; int8 flags: {' '.join(f for f in INT8_FLAGS if f in flags) or 'none'}"


def _session(model: Path | bytes, threads: int) -> ort.InferenceSession:
    return open_session(model, session_options(threads))


def interleaved(calls: dict[K, Callable[[], object]], *, repeats: int, warmup: int = 2,
                clock: Callable[[], float] = time.perf_counter) -> dict[K, Timing]:
    """Time each call ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    ``clock`` is wall time; ``time.thread_time`` instead counts only the CPU time of the calling
    thread, which a busy machine's preemptions do not inflate (for single-threaded work only).
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    seconds: dict[K, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = clock()
            call()
            seconds[name].append(clock() - start)
    return {name: Timing.of(values) for name, values in seconds.items()}


def split_frontend(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto, str] | None:
    """Cut an in-graph bundle's graph into (front end, CNN, name of the tensor between them).

    None when the graph has no single tensor crossing from ``frontend.*`` nodes to the rest. The
    halves are assembled directly (no shape inference: the exporter strips intermediate shapes,
    and onnx's own extractor needs them).
    """
    graph = model.graph
    front_nodes = [node for node in graph.node if node.name.startswith(FRONTEND_PREFIX)]
    produced = {out for node in front_nodes for out in node.output}
    crossing = sorted({name for node in graph.node if not node.name.startswith(FRONTEND_PREFIX)
                       for name in node.input if name in produced})
    if len(crossing) != 1 or not front_nodes:
        return None
    boundary = helper.make_tensor_value_info(crossing[0], onnx.TensorProto.FLOAT, None)
    rest = [node for node in graph.node if not node.name.startswith(FRONTEND_PREFIX)]
    return (_subgraph(model, front_nodes, list(graph.input), [boundary]),
            _subgraph(model, rest, [boundary], list(graph.output)), crossing[0])


def _subgraph(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    used = {name for node in nodes for name in node.input}
    inits = [init for init in model.graph.initializer if init.name in used]
    graph = helper.make_graph(nodes, model.graph.name, inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _load_timing(path: Path, repeats: int) -> LoadTiming:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        _session(path, 1)
        seconds.append(time.perf_counter() - start)
    return LoadTiming(path.name, path.stat().st_size, Timing.of(seconds))


def _clip_calls(model_path: Path, manifest: BundleManifest, frontend: FastLogMel | None,
                parts: tuple[onnx.ModelProto, onnx.ModelProto, str] | None, clip: np.ndarray,
                threads: int) -> dict[str, Callable[[], object]]:
    """What to time for one clip: ``end_to_end`` and, where separable, ``frontend`` and ``model``.

    ``frontend`` is the external front end, None for an in-graph bundle.
    """
    name = manifest.input_name
    session = _session(model_path, threads)
    if frontend is not None:
        mel = frontend(clip)
        return {"end_to_end": lambda: session.run(None, {name: frontend(clip)}),
                "frontend": lambda: frontend(clip),
                "model": lambda: session.run(None, {name: mel})}
    if parts is None:
        return {"end_to_end": lambda: session.run(None, {name: clip})}
    front, cnn = _session(parts[0].SerializeToString(), threads), _session(parts[1].SerializeToString(), threads)
    cnn_feed = {parts[2]: front.run(None, {name: clip})[0]}
    return {"end_to_end": lambda: session.run(None, {name: clip}),
            "frontend": lambda: front.run(None, {name: clip}),
            "model": lambda: cnn.run(None, cnn_feed)}


def bench_bundle(bundle_dir: str | os.PathLike[str], threads: Sequence[int] = (1, 2), *, repeats: int = 20,
                 warmup: int = 2, load_repeats: int = 5, seed: int = 0) -> BundleBench:
    """Measure a bundle folder (see the module docstring for what is timed).

    The clip is seeded noise at -20 dBFS: these models' run time does not depend on the content.
    """
    if repeats < 1 or load_repeats < 1 or warmup < 0:
        raise ConfigError(f"bench: repeats={repeats} and load_repeats={load_repeats} must be >= 1, "
                          f"warmup={warmup} >= 0")
    if not threads or any(t < 1 for t in threads):
        raise ConfigError(f"bench: thread counts must be >= 1, got {list(threads)}")
    bundle_dir = Path(bundle_dir)
    manifest = BundleManifest.read(bundle_dir)
    model_path = manifest.model_path(bundle_dir)  # model.onnx, or the xz container when only it was shipped
    clip = (np.random.default_rng(seed).standard_normal((1, manifest.clip_samples)) * 0.1).astype(np.float32)
    parts = split_frontend(onnx.load_from_string(model_bytes(model_path))) if manifest.frontend_in_graph else None
    frontend = bundle_frontend(bundle_dir, manifest)
    # Every thread count in one round-robin loop, so the policy compares them under the same load;
    # the runtime's workers sleep when idle, so the other counts' sessions do not steal cores.
    calls = {(count, part): call for count in dict.fromkeys(threads)
             for part, call in _clip_calls(model_path, manifest, frontend, parts, clip, count).items()}
    timings = interleaved(calls, repeats=repeats, warmup=warmup)
    results = [ThreadResult(count, timings[count, "end_to_end"], timings.get((count, "model")),
                            timings.get((count, "frontend")), manifest.clip_seconds)
               for count in dict.fromkeys(threads)]
    files = [model_path] + ([bundle_dir / manifest.ort_file] if manifest.ort_file
                            and (bundle_dir / manifest.ort_file).is_file() else [])
    loads = tuple(_load_timing(path, load_repeats) for path in files)
    return BundleBench(bundle_dir, manifest.precision, manifest.frontend_in_graph, manifest.clip_seconds,
                       tuple(results), loads)


def format_bench(bench: BundleBench) -> str:
    """A small table for the terminal."""
    where = "in the graph" if bench.frontend_in_graph else "external (numpy, FastLogMel)"
    lines = [f"{bench.bundle_dir}: {bench.precision}, front end {where}, {bench.clip_seconds:g}-s clips, batch 1",
             f"  cpu: {cpu_line()}, onnxruntime {ort.__version__}",
             (f"  {'threads':>7}  {'end-to-end ms':>13}  {'p90':>7}  {'RTF':>8}  {'x real time':>11}  "
              f"{'front end ms':>12}  {'model ms':>8}  {'front-end share':>15}")]
    for r in bench.results:
        front = f"{r.frontend.median_ms:12.2f}" if r.frontend else f"{'n/a':>12}"
        model = f"{r.model.median_ms:8.2f}" if r.model else f"{'n/a':>8}"
        share = f"{r.frontend_share:15.1%}" if r.frontend_share is not None else f"{'n/a':>15}"
        lines.append(f"  {r.threads:>7}  {r.end_to_end.median_ms:13.2f}  {r.end_to_end.p90_ms:7.2f}  "
                     f"{r.real_time_factor:8.4f}  {1 / r.real_time_factor:11.0f}  {front}  {model}  {share}")
    for load in bench.loads:
        lines.append(f"  load {load.file}: {load.load.median_ms:.1f} ms ({load.size_bytes / 1000:.1f} KB)")
    if len(bench.results) > 1:
        lines.append(f"  threads for this machine: {bench.recommended_threads} (the fewest unless more cut the "
                     f"median by {THREAD_GAIN:.0%}; bundle.json runtime.intra_op_threads, --threads overrides)")
    return "\n".join(lines)
