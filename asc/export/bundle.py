"""From a trained run to a verified, deployable bundle folder.

A bundle is everything an app needs and nothing from training: ``model.onnx`` (fp32 or int8
QDQ, names compacted and constants stored once), ``model.onnx.xz`` (the same bytes in xz: what an
app ships when download size matters, unpacked once), ``model.ort`` and
``required_operators.config`` when onnxruntime can convert it, ``bundle.json``
(:class:`~asc.bundle_manifest.BundleManifest`) and ``parity.json``
(:class:`~asc.export.verify.ParityReport`).

The folder appears only whole and only verified: everything is written into a hidden sibling
folder, checked, and then renamed into place, so a failed or refused export leaves no partial
bundle and keeps the previous one.

One bundle per DCASE 2025 device model is exported here; :func:`asc.bundle_manifest.combine_bundles`
(``asc bundle combine``, torch-free) then joins them with the general model's into one bundle.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

import asc
from asc.bench import cpu_line
from asc.bundle_manifest import (
    MANIFEST_NAME,
    PARITY_NAME,
    BundleManifest,
    atomic_dir,
    check_destination,
)
from asc.compress.grid import QuantGrid
from asc.config import RunConfig, load_config
from asc.data.clips import ClipSet
from asc.data.loader import ClipDataset
from asc.errors import AscError, ConfigError
from asc.export.grid import check_int8_widths, grid_int8
from asc.export.onnx import (
    CALIBRATIONS,
    FEATURE_INPUT,
    FRONTEND_INPUT,
    OUTPUT,
    OrtFiles,
    compact_onnx,
    compose_frontend,
    convert_to_ort,
    export_frontend,
    int8_operands,
    is_quantized_graph,
    model_bytes,
    nodes_inside,
    pack_onnx,
    save_onnx,
    torch_to_onnx,
)
from asc.export.precision import (
    QAT_REWRITES,
    PrecisionPlan,
    quantize_planned,
    rewrite_for_int8,
)
from asc.export.search import SearchReport, search_int8
from asc.export.verify import (
    DEFAULT_MIN_AGREEMENT,
    Candidate,
    ClipSample,
    ParityReport,
    compare_logits,
    enforce_gate,
    measure_parity,
    onnx_outputs,
)
from asc.feature_spec import FRONTEND_ARRAYS_NAME, FrontendArrays
from asc.features import FeatureConfig, LogMel
from asc.models import FreqNorm
from asc.run_files import DIGEST_KEY, deployed_file, file_digest
from asc.train.data import clipset_devices, make_dataset, open_clipset, split_clips
from asc.train.evaluate import load_run_model

Frontend = Literal["in-graph", "external"]
FRONTENDS: tuple[str, ...] = ("in-graph", "external")
ExportPrecision = Literal["auto", "fp32", "int8"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "int8")
"""``auto``: int8 when it passes the parity gate on held-out clips, else fp32 (the reason recorded)."""
SEARCH_CLIPS = 256
"""Eval-split clips outside the parity sample that the int8 search may use (0: no search)."""
MODEL_NAME = "model.onnx"


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class TrainedRun:
    """A run folder's deployable model with its checkpoint metadata and config."""

    run_dir: Path
    checkpoint: str
    config: RunConfig
    model: nn.Module
    state: dict[str, Any]
    digest: str
    """SHA-256 of the run's deployed file (:func:`asc.run_files.deployed_file`) when the model was read:
    ``asc classify RUN`` compares it to tell a stale bundle."""

    @property
    def features(self) -> FeatureConfig:
        return FeatureConfig.from_dict(self.state["features"])

    @property
    def labels(self) -> list[str]:
        return list(self.state["labels"])

    @property
    def clip_samples(self) -> int:
        return int(self.state["num_samples"])


_STATE_KEYS = ("features", "labels", "num_samples", "model_spec")


def open_run(run_dir: str | Path, checkpoint: str = "last") -> TrainedRun:
    """Load a run folder for export; every problem is one AscError naming the path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AscError(f"{run_dir}: no such run folder; point at a folder written by `asc train`")
    if not (run_dir / "config.yaml").is_file():
        raise AscError(f"{run_dir}: not a run folder (no config.yaml); point at a folder written by `asc train`")
    if not checkpoint or Path(checkpoint).name != checkpoint or checkpoint.startswith("."):
        raise ConfigError(f"checkpoint must be a name in {run_dir / 'checkpoints'} such as 'last' or 'best', "
                          f"got {checkpoint!r}")
    model, state = load_run_model(run_dir, checkpoint)
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise AscError(f"{run_dir / 'checkpoints' / (checkpoint + '.pt')}: checkpoint lacks {missing}; "
                       "it was written by an incompatible asc version, retrain the run")
    config = load_config(RunConfig, run_dir / "config.yaml")
    return TrainedRun(run_dir, checkpoint, config, model, state, file_digest(deployed_file(run_dir, checkpoint)))


def run_clipset(run: TrainedRun, *, progress: bool = True) -> ClipSet:
    """The run's own dataset, refused when its classes are no longer the model's."""
    clipset = open_clipset(run.config.data, progress=progress)
    if clipset.labels != run.labels:
        raise AscError(f"{run.run_dir}: the run's data now has labels {clipset.labels}, the model was trained on "
                       f"{run.labels}; restore the run's dataset")
    return clipset


def split_dataset(run: TrainedRun, clipset: ClipSet, split: str, *, as_features: bool,
                  progress: bool = True) -> ClipDataset:
    """A split of the run's data, built and cached exactly as training and evaluation build it."""
    return make_dataset(split_clips(clipset, split), clipset, clipset_devices(clipset), config=run.config.data,
                        features=run.features, num_samples=run.clip_samples, as_features=as_features,
                        progress=progress)


def sample_clips(dataset: ClipDataset, count: int | None, *, split: str, seed: int = 0,
                 exclude: ClipSample | None = None) -> ClipSample:
    """``count`` clips drawn without replacement (all when None), in dataset order.

    Random rather than the first ``count``: splits are often sorted by scene or device.
    ``exclude``: a sample of the same split whose clips may not be drawn (the int8 search clips
    must not be the clips the gate is measured on).
    """
    pool = np.arange(len(dataset))
    if exclude is not None:
        pool = np.setdiff1d(pool, exclude.indices)
    count = len(pool) if count is None else min(count, len(pool))
    indices = np.sort(np.random.default_rng(seed).choice(pool, size=count, replace=False))
    return ClipSample(dataset.source, indices, np.asarray(dataset.targets)[indices],
                      [dataset.clips[int(i)].device for i in indices], list(dataset.labels), split)


# ---------------------------------------------------------------------------------------------
# Export


def _check_options(precision: str, frontend: str, calibration_clips: int, parity_clips: int | None,
                   min_agreement: float, search_clips: int) -> None:
    if search_clips < 0:
        raise ConfigError(f"search_clips must be 0 (no int8 search) or more, got {search_clips}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if frontend not in FRONTENDS:
        raise ConfigError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    if calibration_clips < 1:
        raise ConfigError(f"calibration_clips must be at least 1, got {calibration_clips}")
    if parity_clips is not None and parity_clips < 1:
        raise ConfigError(f"parity_clips must be at least 1 (or None for the whole split), got {parity_clips}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"min_agreement must be in [0, 1], got {min_agreement}")


def export_run(run_dir: str | Path, out_dir: str | Path, *, checkpoint: str = "last",
               precision: ExportPrecision = "auto", frontend: Frontend = "external", int8: PrecisionPlan | None = None,
               calibration_clips: int = 256, parity_clips: int | None = 512, search_clips: int = SEARCH_CLIPS,
               min_agreement: float = DEFAULT_MIN_AGREEMENT, force: bool = False,
               ort_format: bool = True, ort_target: Literal["arm", "amd64"] | None = None,
               progress: bool = True) -> BundleManifest:
    """Export ``run_dir``'s model (``checkpoints/<checkpoint>.pt``) as a verified bundle in ``out_dir``.

    The options are :func:`export_trained`'s.
    """
    return export_trained(open_run(run_dir, checkpoint), out_dir, precision=precision, frontend=frontend, int8=int8,
                          calibration_clips=calibration_clips, parity_clips=parity_clips, search_clips=search_clips,
                          min_agreement=min_agreement, force=force, ort_format=ort_format, ort_target=ort_target,
                          progress=progress)


def export_trained(run: TrainedRun, out_dir: str | Path, *, precision: ExportPrecision = "auto",
                   frontend: Frontend = "external", int8: PrecisionPlan | None = None,
                   calibration_clips: int = 256, parity_clips: int | None = 512, search_clips: int = SEARCH_CLIPS,
                   min_agreement: float = DEFAULT_MIN_AGREEMENT, force: bool = False, ort_format: bool = True,
                   ort_target: Literal["arm", "amd64"] | None = None, progress: bool = True) -> BundleManifest:
    """Write a verified bundle of ``run``'s model into ``out_dir`` (replacing an older bundle).

    * ``frontend="in-graph"``: one graph from raw PCM ``(batch, clip_samples)`` to logits, the
      front end kept float; ``"external"``: the CNN on log-mels, features computed by the app.
    * ``precision="int8"``: post-training QDQ quantization under the mixed-precision plan ``int8``
      (:func:`~asc.export.precision.quantize_planned`; default: the plan measured fastest on x86,
      docs/export-latency.md) calibrated on ``calibration_clips`` training clips; a model that already
      is an int8 QAT graph is exported as is. With ``search_clips`` > 0 the int8 file comes from
      :func:`~asc.export.search.search_int8`: the calibration that agrees best and the fewest
      tensors kept float that reach ``min_agreement`` on up to ``search_clips`` eval-split clips
      *outside* the parity sample (none left: no search, noted).
    * ``precision="auto"`` (the default): int8 as above when it passes the gate on the parity
      clips, else fp32; ``source.precision_decision`` in ``bundle.json`` says which and why, and
      the reason for fp32 is printed on stderr. A QAT graph is int8 either way.
    * Parity runs on ``parity_clips`` clips of the eval split (None: all). A deployed model whose
      top-1 agreement with its source is below ``min_agreement`` is refused unless ``force``.
    * ``ort_format`` adds ``model.ort`` when onnxruntime converts it (``ort_target="arm"`` for
      phones); a failed conversion is noted in ``parity.json``, not fatal.
    """
    _check_options(precision, frontend, calibration_clips, parity_clips, min_agreement, search_clips)
    out_dir = Path(out_dir)
    check_destination(out_dir)
    calibrations = CALIBRATIONS if int8 is None else (int8.calibration,)  # a given plan keeps its calibration
    int8 = int8 or PrecisionPlan()
    in_graph = frontend == "in-graph"
    run.model.eval()  # not chained: an exported graph's eval() may return None
    qat_graph = is_quantized_graph(run.model)
    if qat_graph and precision == "fp32":
        raise AscError(f"{run.run_dir}: the model is an int8 quantization-aware-trained graph; export it as int8 "
                       "(--int8)")
    requested = precision
    if qat_graph:
        precision = "int8"
    clipset = run_clipset(run, progress=progress)
    eval_split = run.config.data.eval_split
    parity = sample_clips(split_dataset(run, clipset, eval_split, as_features=not in_graph, progress=progress),
                          parity_clips, split=eval_split)
    quantize = precision in ("int8", "auto") and not qat_graph
    grid = _method_grid(run) if quantize else None
    decision = None
    if grid is not None and precision == "auto":
        try:
            check_int8_widths(grid)
        except AscError as error:  # a QKD run below 8 bits: its simulated accuracy is the result, fp32 ships
            decision = {"requested": requested, "chosen": "fp32", "reason": f"{error}; shipped fp32"}
            precision, quantize, grid = "fp32", False, None
            print(f"asc export: {decision['reason']}", file=sys.stderr)
    search = None
    if quantize and search_clips and grid is None:
        search = sample_clips(split_dataset(run, clipset, eval_split, as_features=True, progress=progress),
                              search_clips, split=eval_split, seed=1, exclude=parity)

    with tempfile.TemporaryDirectory(prefix="asc-export-") as tmp, atomic_dir(out_dir) as stage:
        notes: list[str] = []
        built = _model_files(run, Path(tmp), quantize=quantize, grid=grid, in_graph=in_graph, int8=int8, clipset=clipset,
                             calibration_clips=calibration_clips, search=search, calibrations=calibrations,
                             min_agreement=min_agreement, notes=notes, progress=progress)
        files = dict(built.files)
        known: dict[str, np.ndarray] = {}
        if precision == "auto":
            decision, known["onnx_fp32"] = _decide(requested, files, parity, min_agreement, progress=progress)
            precision = decision["chosen"]
            if precision == "fp32":
                del files["onnx_int8"]
                known.clear()  # the fp32 file ships compacted: the gate measures the shipped file
                print(f"asc export: {decision['reason']}", file=sys.stderr)
        deployed = "onnx_int8" if precision == "int8" else "onnx_fp32"
        shipped = onnx.load(str(files[deployed]))
        compact_onnx(shipped)  # the gate below measures the compacted file: the one that ships
        files[deployed] = save_onnx(shipped, stage / MODEL_NAME)
        container = pack_onnx(files[deployed])
        candidates = [Candidate(name, path, "onnx_fp32" if name == "onnx_int8" and "onnx_fp32" in files else "torch")
                      for name, path in files.items()]
        ort_files: OrtFiles | None = None
        if ort_format:
            try:
                ort_files = convert_to_ort(files[deployed], stage, target_platform=ort_target)
                candidates.append(Candidate("ort", ort_files.model, deployed))
            except Exception as error:  # noqa: BLE001 -- an optional artefact: any converter failure is a note
                notes.append(f"ORT format conversion failed: {' '.join(str(error).split())[:300]}")
        reference = nn.Sequential(LogMel(run.features), run.model) if in_graph else run.model
        report = measure_parity(reference, candidates, parity, deployed=deployed, min_agreement=min_agreement,
                                force=force, progress=progress, notes=notes, known=known,
                                frontend=(LogMel(run.features), built.frontend) if built.frontend else None)
        enforce_gate(report, out_dir, advice=_GATE_ADVICE[precision])
        if ort_files is not None and report.comparison("ort").top1_agreement < min_agreement:
            ort_files.model.unlink()
            ort_files.operators.unlink()
            report = replace(report, notes=[*report.notes, "model.ort dropped: it disagrees with model.onnx"])
            ort_files = None
        calibrated_with = built.search.plan.calibration if built.search else int8.calibration
        quantization = (None if precision == "fp32" else "qat" if qat_graph else f"grid-{grid.method}" if grid
                        else f"ptq-{calibrated_with}")
        sizes = {**model_bytes(files[deployed]).to_dict(), "container": container.stat().st_size,
                 "ort": ort_files.model.stat().st_size if ort_files else None}
        manifest = _manifest(run, precision, in_graph, report, deployed,
                             ort_file=ort_files.model.name if ort_files else None, quantization=quantization,
                             calibration_clips=built.calibration_clips, int8=int8_operands(files[deployed]),
                             container_file=container.name, sizes=sizes, decision=decision,
                             search=built.search)
        if not in_graph:
            FrontendArrays.compute(run.features).save(stage / FRONTEND_ARRAYS_NAME)
        (stage / PARITY_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (stage / MANIFEST_NAME).write_text(manifest.to_json())
        BundleManifest.read(stage)  # what the runtime will read must read back
    return manifest


_GATE_ADVICE = {
    "int8": "write it anyway with --force, or train with QAT (asc compress --method qat) or keep more layers float",
    "fp32": "the fp32 export is broken, please report this model (--force writes it anyway)",
}


@dataclass(frozen=True)
class _ModelFiles:
    files: dict[str, Path]  #: "onnx_fp32" and/or "onnx_int8"
    frontend: Path | None  #: the front end's own graph, when it went into the models
    calibration_clips: int | None  #: training clips that calibrated post-training int8
    search: SearchReport | None = None  #: what the int8 search chose, when it ran


def _method_grid(run: TrainedRun) -> QuantGrid | None:
    """The grid a quantization method trained the deployed model on (PSG, QKD), if any.

    Only the deployed module (``last``: the finalized one) sits on that grid; an earlier
    checkpoint of the same run is calibrated afresh like any float model.
    """
    return QuantGrid.read(run.run_dir) if run.checkpoint == "last" else None


def _model_files(run: TrainedRun, scratch: Path, *, quantize: bool, grid: QuantGrid | None, in_graph: bool,
                 int8: PrecisionPlan, clipset: ClipSet, calibration_clips: int, search: ClipSample | None,
                 calibrations: tuple[str, ...], min_agreement: float, notes: list[str],
                 progress: bool) -> _ModelFiles:
    """The ONNX files to check, by name, built in ``scratch``.

    One path for every case: the CNN on log-mels is exported (a QAT graph is already int8),
    quantized when asked (on the method's own ``grid`` when it trained one, else calibrated), and
    joined to the front end when it goes in the graph, so the int8 CNN is the same file with or
    without the front end. What quantization kept float goes into ``notes``: a norm that was not
    found would be quantized, which the gate then shows.
    """
    features = run.features
    example = torch.zeros(2, 1, features.n_mels, features.num_frames(run.clip_samples))
    exported = torch_to_onnx(run.model, example, input_name=FEATURE_INPUT, output_name=OUTPUT)
    calibrated, searched = None, None
    if is_quantized_graph(run.model):
        rewritten, rewrites = rewrite_for_int8(exported, QAT_REWRITES)  # trained int8 kept exactly
        files = {"onnx_int8": save_onnx(rewritten, scratch / "cnn_int8.onnx")}
        notes.append("int8: the QAT graph with its trained scales, rewritten for the int8 kernels ("
                     + ", ".join(f"{name} x{count}" for name, count in rewrites.applied.items() if count) + ")")
    else:
        norm_nodes = nodes_inside(exported, FreqNorm)  # found before save strips the names; always float
        files = {"onnx_fp32": save_onnx(exported, scratch / "cnn_fp32.onnx")}
        if quantize:
            split = run.config.data.train_split
            calibration = sample_clips(split_dataset(run, clipset, split, as_features=True, progress=progress),
                                       calibration_clips, split=split)
            int8_path, calibrated = scratch / "cnn_int8.onnx", len(calibration)
            if grid is not None:
                files["onnx_int8"] = grid_int8(run.run_dir, int8_path, example, calibration=calibration.batches())
                notes.append(f"int8: on the {grid.method} run's own grid ({len(grid.layers)} layers' integers and "
                             f"scales from quant_grid.json), inputs without a grid calibrated on {calibrated} "
                             f"'{split}' clips; no search")
                return _joined(run, scratch, files, in_graph, calibrated, None)
            if search is not None and len(search):
                searched = search_int8(files["onnx_fp32"], int8_path, list(calibration.batches()),
                                       np.concatenate(list(search.batches())), plan=int8, calibrations=calibrations,
                                       min_agreement=min_agreement, float_nodes=norm_nodes)
                files["onnx_int8"] = int8_path
                notes.append(searched.format())
            else:
                files["onnx_int8"] = quantize_planned(files["onnx_fp32"], int8_path, calibration.batches(), int8,
                                                      float_nodes=norm_nodes)
                notes.append("int8: no search (no eval clips outside the parity sample, or search_clips=0)")
            notes.append(f"int8: {len(norm_nodes)} frequency-norm nodes kept float, calibrated on {calibrated} "
                         f"'{split}' clips ({searched.plan.calibration if searched else int8.calibration})")
    return _joined(run, scratch, files, in_graph, calibrated, searched)


def _joined(run: TrainedRun, scratch: Path, files: dict[str, Path], in_graph: bool, calibrated: int | None,
            searched: SearchReport | None) -> _ModelFiles:
    """``files`` as they ship: alone, or behind the front end's graph when it goes in the graph."""
    if not in_graph:
        return _ModelFiles(files, None, calibrated, searched)
    frontend = export_frontend(run.features, run.clip_samples, scratch / "frontend.onnx")
    joined = {name: compose_frontend(frontend, path, scratch / f"{name}.onnx") for name, path in files.items()}
    return _ModelFiles(joined, frontend, calibrated, searched)


def _decide(requested: str, files: dict[str, Path], parity: ClipSample, min_agreement: float, *,
            progress: bool) -> tuple[dict[str, Any], np.ndarray]:
    """``precision="auto"``: int8 when its top-1 agreement with fp32 on the held-out parity clips
    passes the gate, else fp32; the record (with a one-line reason) goes into ``bundle.json``.
    Also returns the fp32 file's logits, which the parity report reuses (the file does not change)."""
    reference = onnx_outputs(files["onnx_fp32"], parity, desc="decide fp32", progress=progress)
    agreement = compare_logits(reference, onnx_outputs(files["onnx_int8"], parity, desc="decide int8",
                                                       progress=progress),
                               reference_name="onnx_fp32", candidate_name="onnx_int8")
    passed = agreement.top1_agreement >= min_agreement
    reason = (f"int8 agrees with fp32 on {agreement.top1_agreement:.2%} of {len(parity)} held-out clips "
              f"(gate {min_agreement:.0%}): "
              + ("shipped int8" if passed else "shipped fp32; --int8 --force writes int8 anyway"))
    return ({"requested": requested, "chosen": "int8" if passed else "fp32", "reason": reason,
             "int8_top1_agreement": agreement.top1_agreement, "clips": len(parity), "min_agreement": min_agreement},
            reference)


def _manifest(run: TrainedRun, precision: str, in_graph: bool, report: ParityReport, deployed: str, *,
              ort_file: str | None, quantization: str | None, calibration_clips: int | None,
              int8: dict[str, Any] | None, container_file: str, sizes: dict[str, int | None],
              decision: dict[str, Any] | None, search: SearchReport | None) -> BundleManifest:
    features = run.features
    gated = report.comparison(deployed)
    input_shape: list[int | str] = (["batch", run.clip_samples] if in_graph else
                                    ["batch", 1, features.n_mels, features.num_frames(run.clip_samples)])
    return BundleManifest(
        labels=run.labels, sample_rate=features.sample_rate, clip_samples=run.clip_samples,
        frontend=features.to_dict(), frontend_in_graph=in_graph, precision=precision,  # type: ignore[arg-type]
        input_name=FRONTEND_INPUT if in_graph else FEATURE_INPUT, input_shape=input_shape, output_name=OUTPUT,
        model_file=MODEL_NAME, ort_file=ort_file, frontend_file=None if in_graph else FRONTEND_ARRAYS_NAME,
        container_file=container_file,
        metrics={
            "split": report.split, "clips": report.clips,
            "accuracy": report.accuracy[deployed], "reference_accuracy": report.accuracy["torch"],
            "top1_agreement": gated.top1_agreement, "agreement_with": gated.reference,
            "max_abs_logit_diff": gated.max_abs_diff, "parity_gate_passed": report.gate.passed,
            "forced": report.gate.forced and not report.gate.passed,
            "verified_on": f"{cpu_line()}; onnxruntime {onnxruntime.__version__}",  # int8 kernels differ by CPU
            "convs": report.census.convs, "qlinear_convs": report.census.qlinear_convs,
            "frontend_max_abs_diff": report.frontend_max_abs_diff,
            "bytes": sizes,
        },
        source={
            "run": str(run.run_dir.resolve()), "checkpoint": run.checkpoint, "epoch": run.state.get("epoch"),
            "model": run.state["model_spec"], DIGEST_KEY: run.digest, "quantization": quantization,
            "calibration_clips": calibration_clips, "int8_operands": int8,
            "precision_decision": decision, "int8_search": search.to_dict() if search else None,
        },
        asc_version=asc.__version__,
    )


# ---------------------------------------------------------------------------------------------
# Command


def _size(path: Path) -> str:
    return f"{path.name} {path.stat().st_size / 1000:.1f} KB"


def format_summary(bundle_dir: str | Path, manifest: BundleManifest) -> str:
    """A few lines for the terminal: files, parity, accuracy and the QLinearConv census."""
    bundle_dir = Path(bundle_dir)
    m = manifest.metrics
    files = [_size(bundle_dir / name) for name in (manifest.model_file, manifest.container_file, manifest.ort_file)
             if name]
    sizes = m.get("bytes")
    if sizes and sizes.get("nonzero_int8_weights"):
        files.append(f"{sizes['nonzero_int8_weights'] / 1000:.1f} KB of non-zero int8 weights")
    shape = "x".join(str(d) for d in manifest.input_shape)
    groups = ", ".join(f"{g} {a:.1%}" for g, a in m["accuracy"]["per_group"].items())
    lines = [
        (f"{bundle_dir}: {manifest.precision}, front end {'in the graph' if manifest.frontend_in_graph else 'external'}"
         f", input {manifest.input_name} {shape}"),
        f"  files: {', '.join(files)}",
        f"  parity on {m['clips']} '{m['split']}' clips: top-1 agreement with {m['agreement_with']} "
        f"{m['top1_agreement']:.2%}, max |dlogit| {m['max_abs_logit_diff']:.3g}"
        + (" (FORCED past the gate)" if m["forced"] else ""),
        *([f"  measured on: {m['verified_on']}"] if "verified_on" in m else []),
        f"  accuracy: {m['accuracy']['accuracy']:.1%} (torch {m['reference_accuracy']['accuracy']:.1%})"
        + (f"; {groups}" if groups else ""),
    ]
    if manifest.precision == "int8":
        lines.append(f"  int8 convs: {m['qlinear_convs']} of {m['convs']} run as QLinearConv")
        searched = manifest.source.get("int8_search")
        if searched:
            lines.append(f"  int8 search: {searched['plan']['calibration']} calibration, "
                         f"{len(searched['float_tensors'])} of {searched['candidates']} tensors kept float")
    decision = manifest.source.get("precision_decision")
    if decision:
        lines.append(f"  precision: {decision['reason']}")
    return "\n".join(lines)


def run_export_command(run_dir: str | Path, out_dir: str | Path, *, int8: bool = False,
                       precision: ExportPrecision | None = None, frontend: Frontend = "external",
                       force: bool = False, checkpoint: str = "last", calibration_clips: int = 256,
                       parity_clips: int | None = 512, search_clips: int = SEARCH_CLIPS,
                       progress: bool = True) -> BundleManifest:
    """``asc export``: write the bundle and print its summary (errors propagate as AscError).

    The precision is ``precision`` when given (``auto``: int8 when it passes the gate, else fp32),
    else int8 with ``int8`` (``--int8``: int8 or refused at the gate), else the precision the model
    was trained for: int8 for a QAT graph (which passes the gate since its biases sit on the
    kernels' grid, docs/export-latency.md §15), fp32 for a float run.
    """
    run = open_run(run_dir, checkpoint)
    precision = precision or ("int8" if int8 or is_quantized_graph(run.model) else "fp32")
    manifest = export_trained(run, out_dir, precision=precision, frontend=frontend, force=force,
                              calibration_clips=calibration_clips, parity_clips=parity_clips,
                              search_clips=search_clips, progress=progress)
    print(format_summary(out_dir, manifest))
    return manifest
