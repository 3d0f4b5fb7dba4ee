"""The gated bundle of a PPP run: an ordinary verified bundle plus what personalization needs.

``asc export`` ships a compressed run's finalized module; for a PPP run that is the gated network,
which runs like any model but hides its gates inside. Personalization on a phone
(:mod:`asc.personalize`, torch-free) needs more, so :func:`export_gated` writes:

* everything :func:`~asc.export.bundle.export_trained` writes for the gated network (parity
  against torch, manifest, front-end arrays), except the ORT copy;
* ``model.onnx`` (and its xz container) re-exported with one extra graph output per gate,
  ``gate.<i>``, the clip's 0/1 keep mask, after ``logits`` (the runtime reads ``logits`` by name,
  so the extra outputs change nothing for it). Its logits are checked against the verified file;
* ``ppp.json``: each gate's plan (:class:`asc.personalize.GatePlan`) for cutting closed channels
  out of that graph, checked here by pruning a pattern and comparing with the gated graph.

fp32 only: an int8 graph would need its per-channel scales sliced and its activation ranges
re-calibrated after pruning, which :mod:`asc.personalize` does not do.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from asc.bundle_manifest import (
    MANIFEST_NAME,
    BundleManifest,
    atomic_dir,
    check_destination,
)
from asc.compress.ppp import PPP, PPPOptions, collect_masks, gates_of, insert_gates
from asc.config import read_yaml
from asc.errors import AscError
from asc.export.bundle import (
    MODEL_NAME,
    Frontend,
    TrainedRun,
    export_trained,
    open_run,
    run_clipset,
    sample_clips,
    split_dataset,
)
from asc.export.onnx import (
    CONTAINER_SUFFIX,
    FEATURE_INPUT,
    OUTPUT,
    compact_onnx,
    compose_frontend,
    export_frontend,
    model_bytes,
    pack_onnx,
    save_onnx,
    torch_to_onnx,
)
from asc.export.verify import DEFAULT_MIN_AGREEMENT, ClipSample
from asc.features import FeatureConfig
from asc.personalize import (
    GATE_OUTPUT,
    MAX_ABS_DIFF,
    PLAN_FORMAT,
    PLAN_NAME,
    THRESHOLD,
    GatePlan,
    PlanError,
    fix_gates,
    gate_plans,
    logits,
    prune_graph,
)
from asc.run_files import (
    COMPRESS_PLAN_NAME,
    FLOAT_CHECKPOINT,
    deployed_file,
    file_digest,
)
from asc.train.checkpoint import load_checkpoint


class _WithGates(nn.Module):
    """The gated network returning its logits and every gate's mask (for the export only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        logits, masks = collect_masks(self.model, x)
        return (logits, *masks)


def ppp_options(run_dir: Path) -> PPPOptions:
    """The PPP settings a compressed run was trained with (from its ``compress.yaml``)."""
    path = run_dir / COMPRESS_PLAN_NAME
    methods = read_yaml(path).get("methods", []) if path.is_file() else []
    settings = next((m.get("settings", {}) for m in methods if m.get("name") == PPP.name), None)
    if settings is None:
        raise AscError(f"{run_dir}: not compressed with --method ppp (no ppp in {COMPRESS_PLAN_NAME}); run "
                       f"`asc compress {run_dir} --method ppp` first and personalize its output")
    return PPPOptions(**settings)


def open_gated_run(run_dir: str | Path) -> TrainedRun:
    """A PPP run's gated network: the float twin with its gates put back and the trained weights loaded."""
    run_dir = Path(run_dir)
    options = ppp_options(run_dir)
    run = open_run(run_dir, FLOAT_CHECKPOINT)
    model = run.model
    insert_gates(model, head=options.head)
    trained = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    try:
        model.load_state_dict(trained)
    except RuntimeError as error:
        raise AscError(f"{run_dir / 'checkpoints' / 'last.pt'}: does not fit the gated network "
                       f"({str(error).splitlines()[0]}); re-run the compression") from None
    digest = file_digest(deployed_file(run_dir, "last"))  # what `asc classify RUN` compares, as for any bundle
    return replace(run, checkpoint="last", model=model.eval(), digest=digest)


def gated_onnx(model: nn.Module, example: Tensor, scratch: Path, *,
               frontend: tuple[FeatureConfig, int] | None = None) -> tuple[onnx.ModelProto, list[GatePlan]]:
    """A gated network as compacted ONNX with ``gate.<i>`` outputs after ``logits``, and each gate's plan.

    ``frontend`` (features, clip samples) puts the log-mel front end in the graph.
    """
    exported = torch_to_onnx(_WithGates(model), example, input_name=FEATURE_INPUT, output_name=OUTPUT)
    gates = gates_of(model)
    names = [GATE_OUTPUT.format(index=i) for i in range(len(gates))]
    renames = dict(zip([output.name for output in exported.graph.output[1:]], names, strict=True))
    for node in exported.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for output in exported.graph.output[1:]:
        output.name = renames[output.name]
    if frontend is not None:
        cnn = save_onnx(exported, scratch / "gated_cnn.onnx")
        front = export_frontend(*frontend, scratch / "frontend.onnx")
        exported = onnx.load(str(compose_frontend(front, cnn, scratch / "gated.onnx")))
    compact_onnx(exported)
    try:
        plans = gate_plans(exported, [(name, output, gate.channels)
                                      for (name, gate), output in zip(gates.items(), names, strict=True)])
    except PlanError as error:
        raise AscError(f"{type(model).__name__}: {error}; this gate cannot be pruned exactly, report the model") \
            from None
    return exported, plans


def _batches(clips: ClipSample) -> np.ndarray:
    return np.concatenate(list(clips.batches()))


def check_plans(model: onnx.ModelProto, plans: list[GatePlan], manifest: BundleManifest, inputs: np.ndarray) -> float:
    """Prune every other channel of every gate and compare with the gated graph with those gates fixed."""
    keeps = [np.arange(plan.channels) % 2 == 0 for plan in plans]
    pruned = prune_graph(model, plans, keeps)
    onnx.checker.check_model(pruned, full_check=True)
    return float(np.abs(logits(pruned, manifest, inputs) - logits(fix_gates(model, plans, keeps), manifest,
                                                                  inputs)).max())


def export_gated(run_dir: str | Path, out_dir: str | Path, *, frontend: Frontend = "external",
                 parity_clips: int | None = 512, min_agreement: float = DEFAULT_MIN_AGREEMENT, force: bool = False,
                 progress: bool = True) -> BundleManifest:
    """Write the gated bundle of the PPP run ``run_dir`` into ``out_dir`` (written whole or not at all)."""
    run = open_gated_run(run_dir)
    out_dir = Path(out_dir)
    check_destination(out_dir)
    in_graph = frontend == "in-graph"
    with tempfile.TemporaryDirectory(prefix="asc-gated-") as tmp, atomic_dir(out_dir) as stage:
        verified = Path(tmp) / "verified"
        manifest = export_trained(run, verified, precision="fp32", frontend=frontend, parity_clips=parity_clips,
                                  min_agreement=min_agreement, force=force, ort_format=False, progress=progress)
        for item in verified.iterdir():
            shutil.copyfile(item, stage / item.name)
        features = run.features
        example = torch.zeros(2, 1, features.n_mels, features.num_frames(run.clip_samples))
        model, plans = gated_onnx(run.model, example, Path(tmp),
                                  frontend=(features, run.clip_samples) if in_graph else None)
        path = save_onnx(model, stage / MODEL_NAME)
        container = pack_onnx(path)
        clips = sample_clips(split_dataset(run, run_clipset(run, progress=progress), run.config.data.eval_split,
                                           as_features=not in_graph, progress=progress),
                             min(parity_clips or 64, 64), split=run.config.data.eval_split)
        inputs = _batches(clips)
        before = logits(onnx.load(str(verified / MODEL_NAME)), manifest, inputs)
        change = float(np.abs(logits(model, manifest, inputs) - before).max())
        if not change <= MAX_ABS_DIFF:
            raise AscError(f"{out_dir}: the graph with gate outputs computes other logits than the verified one "
                           f"(max |dlogit| {change:.3g}); report this model")
        difference = check_plans(model, plans, manifest, inputs)
        if not difference <= MAX_ABS_DIFF:
            raise AscError(f"{out_dir}: pruning by the gate plans changes the logits by {difference:.3g}; "
                           "report this model")
        sizes = {**model_bytes(path).to_dict(), "container": container.stat().st_size, "ort": None}
        manifest = replace(manifest, container_file=MODEL_NAME + CONTAINER_SUFFIX,
                           metrics={**manifest.metrics, "bytes": sizes, "gate_plan_max_abs_diff": difference},
                           source={**manifest.source, "ppp": {"gates": len(plans),
                                                              "channels": sum(p.channels for p in plans)}})
        (stage / PLAN_NAME).write_text(json.dumps({"format": PLAN_FORMAT, "threshold": THRESHOLD,
                                                   "gates": [plan.to_dict() for plan in plans]}, indent=2) + "\n")
        (stage / MANIFEST_NAME).write_text(manifest.to_json())
        BundleManifest.read(stage)
    return manifest
