"""Torch-free inference on an exported bundle: numpy, onnxruntime and the shared audio/front-end code.

This is what ``asc classify``, the ``export/`` example and a phone app's Python twin run. It must
import without torch (a test blocks the import), so a deployment machine needs only onnxruntime,
numpy, soundfile and librosa. Everything it needs to know comes from ``bundle.json``.

How a recording becomes one answer:

1. decode, mix to mono and resample to the bundle's rate (:mod:`asc.audio`);
2. cut into clip-length windows every ``hop`` samples (:func:`window_starts`);
3. compute log-mel outside the graph when the bundle's front end is not inside it
   (:class:`asc.feature_spec.FastLogMel`, held to librosa's :func:`asc.feature_spec.log_mel`);
4. run the windows through onnxruntime in batches (a bundle that ships only its xz container,
   ``model.onnx.xz``, is unpacked in memory once, when the session opens);
5. average the windows' log-probabilities and renormalise. Treating windows as independent
   evidence about one scene, that is the normalised product of their probabilities (a geometric
   mean): a label wins by being likely in most windows, and the answer is still a distribution.

A bundle with device-specific models (``bundle.json`` ``device_models``, DCASE 2025) answers with
the recording device's own model when the caller names a device it knows, and with the general
model otherwise; each device's session opens on first use, so an app serving one device loads one.
"""

from __future__ import annotations

import json
import lzma
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.special import log_softmax, softmax

from asc.audio import fit_length, load_audio, resample
from asc.bundle_manifest import GENERAL_MODEL, MANIFEST_NAME, BundleManifest
from asc.errors import AscError, ConfigError
from asc.feature_spec import FastLogMel, FrontendArrays

PathLike = str | os.PathLike[str]

_REEXPORT = "re-export the bundle with `asc export`"


@dataclass(frozen=True)
class Prediction:
    """One label and its probability."""

    label: str
    probability: float


class _Ranked:
    """The best label of a result whose ``top`` predictions are sorted, most likely first."""

    top: tuple[Prediction, ...]

    @property
    def label(self) -> str:
        return self.top[0].label

    @property
    def probability(self) -> float:
        return self.top[0].probability


@dataclass(frozen=True, eq=False)
class WindowResult(_Ranked):
    """The model's answer for one clip-length window of a recording.

    ``start``/``end`` are seconds in the recording; ``end`` stops at the recording's end when the
    window was zero-padded (only a recording shorter than one clip is padded).
    """

    start: float
    end: float
    logits: np.ndarray  #: raw model output, ``(n_labels,)``
    probabilities: np.ndarray  #: softmax of ``logits``
    top: tuple[Prediction, ...]


@dataclass(frozen=True, eq=False)
class ClipResult(_Ranked):
    """The answer for a whole recording: windows aggregated by mean log-probability.

    ``probabilities`` is ``softmax(mean_w log_softmax(logits_w))``; ``windows`` keeps the
    per-window answers in time order (empty when the caller dropped them).
    """

    source: str
    duration: float  #: seconds of audio, at the bundle's sample rate
    probabilities: np.ndarray
    top: tuple[Prediction, ...]
    windows: tuple[WindowResult, ...]
    warnings: tuple[str, ...] = ()  #: why the answer may not mean much (too short, silent)
    model: str = GENERAL_MODEL  #: which of the bundle's models answered: "general" or a device name


SILENCE_DBFS = -80.0
"""Recordings whose peak is below this level are digital silence: the model answers, but only by
its biases. 16-bit dither sits near -90 dBFS, a quiet room recorded by a phone well above -60."""


def input_warnings(audio: np.ndarray, sample_rate: int, clip_samples: int, *,
                   answer: str = "the label") -> tuple[str, ...]:
    """Reasons the model's ``answer`` on ``audio`` says little: under half a window, or silence."""
    found = []
    if len(audio) < clip_samples / 2:
        found.append(f"only {len(audio) / sample_rate:.2f} s of audio, under half the model's "
                     f"{clip_samples / sample_rate:g}-s window; {answer} is a guess from mostly padding")
    peak = max(float(audio.max()), -float(audio.min())) if audio.size else 0.0  # no |audio| copy
    if peak <= 10 ** (SILENCE_DBFS / 20):
        level = "digital silence" if peak == 0 else f"peak {20 * np.log10(peak):.0f} dBFS"
        found.append(f"the recording is silent ({level}); {answer} reflects no sound")
    return tuple(found)


def window_starts(num_samples: int, clip_samples: int, hop_samples: int) -> list[int]:
    """Start samples of the windows that cover ``num_samples`` of audio.

    Windows start every ``hop_samples``. If audio remains after the last whole window, one more
    window is aligned to the end of the recording rather than zero-padded: the model was trained
    on clips full of sound, and a half-silent window would be an input it never saw. Only a
    recording shorter than one clip yields a (single) zero-padded window.
    """
    if clip_samples <= 0 or hop_samples <= 0:
        raise ConfigError(f"windows: clip_samples={clip_samples} and hop_samples={hop_samples} must be > 0")
    if num_samples <= clip_samples:
        return [0]
    starts = list(range(0, num_samples - clip_samples + 1, hop_samples))
    if starts[-1] + clip_samples < num_samples:
        starts.append(num_samples - clip_samples)
    return starts


def top_predictions(probabilities: np.ndarray, labels: list[str], k: int) -> tuple[Prediction, ...]:
    """The ``k`` most probable labels, best first (ties keep label order)."""
    if k < 1:
        raise ConfigError(f"top_k={k} must be >= 1")
    order = np.argsort(-probabilities, kind="stable")[:k]
    return tuple(Prediction(labels[i], float(probabilities[i])) for i in order)


def bundle_frontend(bundle_dir: PathLike, manifest: BundleManifest) -> FastLogMel | None:
    """The numpy front end a bundle needs (None when it is inside the graph), from its shipped
    arrays when it has them, else computed from the spec (bundles of earlier asc versions)."""
    if manifest.frontend_in_graph:
        return None
    arrays = (FrontendArrays.load(Path(bundle_dir) / manifest.frontend_file, manifest.features)
              if manifest.frontend_file else None)
    return FastLogMel(manifest.features, arrays)


@dataclass(frozen=True)
class _Graph:
    """One opened model of the bundle: the file the session loaded and its fixed batch, if any."""

    path: Path
    session: ort.InferenceSession
    fixed_batch: int | None


class Classifier:
    """onnxruntime CPU sessions on a bundle folder, plus the windowing and aggregation around them.

    Each session is created once and reused, so opening costs once and each call only runs the
    model. The general model's session opens with the classifier (a broken bundle fails here, not
    at the first clip); a device model's opens the first time a clip of that device comes.
    ``threads`` is onnxruntime's intra-op thread count (:func:`intra_op_threads`: given, else the
    bundle's measured ``runtime.intra_op_threads``, else 1).
    ``hop_seconds`` defaults to the clip length: adjacent, non-overlapping windows.
    """

    def __init__(
        self,
        bundle_dir: PathLike,
        *,
        threads: int | None = None,
        batch_size: int = 16,
        hop_seconds: float | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ConfigError(f"threads={threads} must be >= 1")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if hop_seconds is not None and not hop_seconds > 0:
            raise ConfigError(f"hop={hop_seconds} seconds must be > 0")
        self.bundle_dir = Path(bundle_dir)
        self.manifest = BundleManifest.read(self.bundle_dir)
        self.features = self.manifest.features
        if self.features.sample_rate != self.manifest.sample_rate:
            raise AscError(
                f"{self.bundle_dir / 'bundle.json'}: front-end sample rate {self.features.sample_rate} "
                f"differs from the bundle's {self.manifest.sample_rate}; {_REEXPORT}"
            )
        self.hop_samples = (
            self.clip_samples if hop_seconds is None else max(1, round(hop_seconds * self.sample_rate))
        )
        self._frontend = bundle_frontend(self.bundle_dir, self.manifest)
        self._check_input_shape()
        self.threads = intra_op_threads(self.bundle_dir, threads)
        self._batch_size = batch_size
        self._graphs: dict[str, _Graph] = {}
        self._graph(GENERAL_MODEL)

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    @property
    def clip_samples(self) -> int:
        return self.manifest.clip_samples

    @property
    def model_path(self) -> Path:
        """The file the general model's session loaded (the ORT file, ONNX file or xz container)."""
        return self._graphs[GENERAL_MODEL].path

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices with their own model in this bundle (empty for an ordinary bundle)."""
        return tuple(self.manifest.device_models)

    @property
    def open_models(self) -> dict[str, Path]:
        """Models whose session is open, in first-use order, each with the file its session loaded."""
        return {name: graph.path for name, graph in self._graphs.items()}

    def model_for(self, device: str | None) -> str:
        """The model that answers for ``device``: its own when the bundle has one, else ``general``."""
        return self.manifest.model_for(device)

    def logits(self, clips: np.ndarray, *, device: str | None = None) -> np.ndarray:
        """Model output ``(n, n_labels)`` for mono clips ``(n, clip_samples)`` at the bundle's rate.

        Runs ``device``'s model (:meth:`model_for`). Applies the front end here when the bundle's
        graph does not contain it, and runs in batches so memory stays bounded on long recordings.
        """
        clips = np.asarray(clips, dtype=np.float32)
        if clips.ndim != 2 or clips.shape[1] != self.clip_samples:
            raise ConfigError(f"logits: expected clips of shape (n, {self.clip_samples}), got {clips.shape}")
        graph = self._graph(self.model_for(device))
        step = graph.fixed_batch or self._batch_size
        outputs = []
        for first in range(0, len(clips), step):
            batch = clips[first : first + step]
            real = len(batch)
            if graph.fixed_batch is not None and real < graph.fixed_batch:
                batch = np.pad(batch, ((0, graph.fixed_batch - real), (0, 0)))
            model_input = batch if self._frontend is None else self._frontend(batch)
            (output,) = graph.session.run([self.manifest.output_name], {self.manifest.input_name: model_input})
            outputs.append(np.asarray(output, dtype=np.float32).reshape(len(batch), -1)[:real])
        logits = np.concatenate(outputs) if outputs else np.zeros((0, len(self.labels)), np.float32)
        if logits.shape[1] != len(self.labels):
            raise AscError(
                f"{graph.path}: model gives {logits.shape[1]} outputs but bundle.json lists "
                f"{len(self.labels)} labels; {_REEXPORT}"
            )
        return logits

    def classify_waveform(
        self,
        waveform: np.ndarray,
        sample_rate: int,
        *,
        top_k: int = 3,
        source: str = "<waveform>",
        device: str | None = None,
    ) -> ClipResult:
        """Classify ``(samples,)`` or ``(channels, samples)`` audio at any rate; channels are averaged.

        ``device`` (the recording device) picks its own model when the bundle has one; an unknown
        device or None gets the general model. The result's ``model`` says which one answered.
        """
        audio = np.asarray(waveform, dtype=np.float32)
        if audio.ndim not in (1, 2):
            raise AscError(f"{source}: expected (samples,) or (channels, samples) audio, got shape {audio.shape}; "
                           "pass a mono or channels-first array")
        if audio.ndim == 2:
            audio = audio.mean(axis=0)
        if audio.size == 0:
            raise AscError(f"{source}: audio has no samples; pass a non-empty recording")
        if not np.isfinite(audio).all():
            raise AscError(f"{source}: audio contains NaN or infinite samples; fix the source signal")
        return self._classify_mono(resample(audio, sample_rate, self.sample_rate), top_k, source, device)

    def classify_file(self, path: PathLike, *, top_k: int = 3, device: str | None = None) -> ClipResult:
        """Classify an audio file with ``device``'s model (as :meth:`classify_waveform`); any problem
        with the file is one :class:`~asc.errors.AudioError`."""
        audio, _ = load_audio(path, self.sample_rate, mono=True)
        return self._classify_mono(audio, top_k, str(path), device)

    # ------------------------------------------------------------------------------ internals

    def _classify_mono(self, audio: np.ndarray, top_k: int, source: str, device: str | None) -> ClipResult:
        starts = window_starts(len(audio), self.clip_samples, self.hop_samples)
        clips = np.stack([fit_length(audio[start : start + self.clip_samples], self.clip_samples)
                          for start in starts])
        logits = self.logits(clips, device=device)
        log_probs = log_softmax(logits.astype(np.float64), axis=1)
        windows = tuple(
            WindowResult(
                start=start / self.sample_rate,
                end=min(start + self.clip_samples, len(audio)) / self.sample_rate,
                logits=window_logits,
                probabilities=np.exp(window_log_probs),
                top=top_predictions(np.exp(window_log_probs), self.labels, top_k),
            )
            for start, window_logits, window_log_probs in zip(starts, logits, log_probs, strict=True)
        )
        probabilities = softmax(log_probs.mean(axis=0))
        return ClipResult(
            source=source,
            duration=len(audio) / self.sample_rate,
            probabilities=probabilities,
            top=top_predictions(probabilities, self.labels, top_k),
            windows=windows,
            warnings=input_warnings(audio, self.sample_rate, self.clip_samples),
            model=self.model_for(device),
        )

    def _graph(self, name: str) -> _Graph:
        """The open session of model ``name``, opened and checked on first use."""
        if name not in self._graphs:
            path, session = self._open_session(name)
            self._graphs[name] = _Graph(path, session, self._check_io(path, session))
        return self._graphs[name]

    def _open_session(self, name: str) -> tuple[Path, ort.InferenceSession]:
        """Prefer the ORT-format file (faster load); fall back to the ONNX file if it will not load.

        An ORT-format file is tied to the onnxruntime version that wrote it, so a newer or older
        runtime may refuse it while the ONNX file still loads.
        """
        options = session_options(self.threads)
        model = self.manifest.models[name]
        model_path, ort_file = model.model_path(self.bundle_dir), model.ort_file
        if ort_file and (self.bundle_dir / ort_file).is_file():
            try:
                return self.bundle_dir / ort_file, open_session(self.bundle_dir / ort_file, options)
            except AscError as error:
                warnings.warn(f"{error}; using {model_path.name} instead", RuntimeWarning, stacklevel=4)
        return model_path, open_session(model_path, options)

    def _check_input_shape(self) -> None:
        """bundle.json's input shape must be what its clip length and front end give."""
        manifest = self.manifest
        if manifest.frontend_in_graph:
            expected: list[int | str] = ["batch", self.clip_samples]
        else:
            expected = ["batch", 1, self.features.n_mels, self.features.num_frames(self.clip_samples)]
        if list(manifest.input_shape[1:]) != expected[1:]:
            raise AscError(
                f"{self.bundle_dir / 'bundle.json'}: input_shape {manifest.input_shape} does not match "
                f"the clip length and front end (expected {expected}); {_REEXPORT}"
            )

    def _check_io(self, where: Path, session: ort.InferenceSession) -> int | None:
        """Check a graph's input/output against bundle.json; return its fixed batch size, if any.

        A graph exported with a fixed batch dimension runs exactly that many windows per call
        (the last batch is zero-padded), whatever ``batch_size`` asks for.
        """
        manifest = self.manifest
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != manifest.input_name:
            raise AscError(f"{where}: model inputs {[i.name for i in inputs]} are not [{manifest.input_name!r}] "
                           f"as bundle.json says; {_REEXPORT}")
        if inputs[0].type != "tensor(float)":
            raise AscError(f"{where}: model input is {inputs[0].type}, expected tensor(float); {_REEXPORT}")
        if _dims(inputs[0].shape) != _dims(manifest.input_shape):
            raise AscError(f"{where}: model input shape {inputs[0].shape} differs from bundle.json's "
                           f"{manifest.input_shape}; {_REEXPORT}")
        outputs = {output.name: output for output in session.get_outputs()}
        if manifest.output_name not in outputs:
            raise AscError(f"{where}: no output named {manifest.output_name!r} (has {sorted(outputs)}); "
                           f"{_REEXPORT}")
        classes = outputs[manifest.output_name].shape[-1] if outputs[manifest.output_name].shape else None
        if isinstance(classes, int) and classes != len(manifest.labels):
            raise AscError(f"{where}: model gives {classes} outputs but bundle.json lists "
                           f"{len(manifest.labels)} labels; {_REEXPORT}")
        batch_dim = inputs[0].shape[0]
        return batch_dim if isinstance(batch_dim, int) else None


RUNTIME_KEY = "runtime"
"""bundle.json object of runtime settings the exporter measured; ``intra_op_threads`` (int, or
absent) is onnxruntime's intra-op thread count to use when the caller names none."""
THREADS_KEY = "intra_op_threads"


def bundle_intra_op_threads(bundle_dir: PathLike) -> int | None:
    """``runtime.intra_op_threads`` of ``bundle_dir/bundle.json``, None when the exporter wrote none.

    Read from the raw JSON because it is a setting for this module, not part of the model's contract.
    """
    path = Path(bundle_dir) / MANIFEST_NAME
    settings = json.loads(path.read_text()).get(RUNTIME_KEY) or {}  # BundleManifest.read has checked the JSON
    if not isinstance(settings, dict):
        raise AscError(f"{path}: {RUNTIME_KEY} is {settings!r}, expected an object such as "
                       f'{{"{THREADS_KEY}": 1}}; {_REEXPORT}')
    threads = settings.get(THREADS_KEY)
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise AscError(f"{path}: {RUNTIME_KEY}.{THREADS_KEY} is {threads!r}, expected an integer >= 1 or no "
                       f"such key; {_REEXPORT} or pass --threads")
    return threads


def intra_op_threads(bundle_dir: PathLike, threads: int | None = None) -> int:
    """The intra-op thread count to run ``bundle_dir`` with: ``threads`` when the caller gives one (the
    CLI's ``--threads``), else the bundle's ``runtime.intra_op_threads`` capped at the cores this
    process may run on (it was measured on another machine), else 1.

    1 is the right start for a phone app and a shared machine: a second thread gains little on these
    small CNNs (docs/export-latency.md §4) and the app keeps its cores; the exporter writes a larger
    count only where it measured a gain (:func:`asc.bench.recommend_intra_op_threads`).
    """
    if threads is not None:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(bundle_intra_op_threads(bundle_dir) or 1, cores)


def session_options(threads: int, *, spinning: bool = False) -> ort.SessionOptions:
    """The session settings of the runtime: ``threads`` intra-op threads that sleep when idle, sequential
    execution, every graph optimization (the int8 speed depends on the NHWC layout transformer).

    onnxruntime's workers spin by default between ops; on a machine whose other cores are busy (an app's
    UI, other jobs) a spinning worker and a descheduled one stall each other, which made 2 threads 1.7x
    slower than 1 and int8 slower than fp32 (docs/export-latency.md §4). Sleeping costs a wake-up per op;
    ``spinning`` restores onnxruntime's default, to measure the two (benchmarks/frontend.py).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only: the runtime's own messages say what matters
    return options


def model_bytes(path: Path) -> bytes:
    """The bytes of a bundle's model file, unpacked in memory (a few ms) when it is the xz container."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.suffix == ".xz" else data


def open_session(model: Path | bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU session on a model file (ONNX, ORT or xz container) or on ONNX bytes; failures are one AscError."""
    where = model if isinstance(model, Path) else "in-memory graph"
    try:
        source = model if isinstance(model, bytes) else model_bytes(model) if model.suffix == ".xz" else str(model)
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 -- onnxruntime's load errors share no base class but Exception
        reason = " ".join(str(error).split())[:300]
        raise AscError(f"{where}: onnxruntime cannot load the model ({reason}); {_REEXPORT}") from None


def _dims(shape: list[int | str | None]) -> list[int | None]:
    """Fixed dimensions as ints, symbolic ones (``"batch"``, ``None``) as ``None``."""
    return [dim if isinstance(dim, int) else None for dim in shape]
