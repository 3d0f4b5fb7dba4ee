"""A trained QAT run's int8 graph as converted and as ``asc export`` ships it, against fp32 and planned PTQ, in one run.

    python benchmarks/qat_rewrites.py RUN BASE [--clips 600] [--threads 1 2] [--repeats 200]

``RUN`` is a compressed run whose finalized model is a PT2E QAT graph (``asc compress --method qat``,
``pqk``, ``prune+qat`` …); ``BASE`` is a float run of the same architecture, whose ONNX fp32 graph
is the latency reference. For each file the script prints its top-1 agreement with the QAT model
in torch on ``--clips`` evaluation clips and, for the QAT files, the median and largest |Δlogit|
against it (onnxruntime's integer kernels, so the figures are only true of this CPU class), then
times the files round-robin in one loop per thread count (batch 1):

- the base's ONNX fp32 graph (the reference of every ratio);
- the base quantized after training under the default :class:`PrecisionPlan` (calibrated on 64 of
  its training clips), the post-training int8 a QAT export should be at least as fast as;
- the QAT graph as converted;
- the QAT graph with the rewrites ``asc export`` applies (``QAT_REWRITES``), what it ships;
- the same with the norm affine moved onto the norm's input too (all ``REWRITES``, §16's export).

docs/export-latency.md §16 and §17 have the figures. The CPU line and the load average come first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asc.bench import cpu_line, interleaved, session_options
from asc.export import (
    open_run,
    run_clipset,
    sample_clips,
    save_onnx,
    split_dataset,
    torch_to_onnx,
)
from asc.export.onnx import is_quantized_graph, ort_session
from asc.export.precision import QAT_REWRITES, REWRITES, quantize_planned, rewrite_for_int8, session_logits

BATCH = 50
CALIBRATION_CLIPS = 64


def _torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + BATCH])).numpy() for i in range(0, len(x), BATCH)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a compressed run with a QAT graph")
    parser.add_argument("base", type=Path, help="a float run of the same architecture (the fp32 reference)")
    parser.add_argument("--clips", type=int, default=600, help="evaluation clips for the agreement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"cpu: {cpu_line()}; onnxruntime {ort.__version__}; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")
    run, base = open_run(args.run), open_run(args.base)
    if not is_quantized_graph(run.model):
        parser.error(f"{args.run}: its finalized model is not a QAT graph; compress it with --method qat (or pqk)")
    clipset = run_clipset(run, progress=False)  # the QAT run was compressed from the base: same corpus
    splits = run.config.data
    evaluation = split_dataset(run, clipset, splits.eval_split, as_features=True, progress=False)
    x = np.concatenate(list(sample_clips(evaluation, args.clips, split=splits.eval_split).batches()))
    train = split_dataset(run, clipset, splits.train_split, as_features=True, progress=False)
    calibration = list(sample_clips(train, CALIBRATION_CLIPS, split=splits.train_split).batches())
    example = torch.zeros(2, *x.shape[1:])
    qat = torch_to_onnx(run.model, example, input_name="log_mel")
    with tempfile.TemporaryDirectory(prefix="asc-qat-rewrites-") as tmp:
        work = Path(tmp)
        fp32 = save_onnx(torch_to_onnx(base.model, example, input_name="log_mel"), work / "fp32.onnx")
        shipped, affine_moved = (rewrite_for_int8(qat, rewrites)[0] for rewrites in (QAT_REWRITES, REWRITES))
        files = {"ONNX fp32 (base)": fp32,
                 "planned PTQ int8 (base)": quantize_planned(fp32, work / "ptq.onnx", calibration),
                 "QAT int8 as converted": save_onnx(qat, work / "qat.onnx"),
                 "QAT int8 rewritten (asc export)": save_onnx(shipped, work / "rewritten.onnx"),
                 "+ norm affine on input (§16)": save_onnx(affine_moved, work / "affine.onnx")}
        qat_logits, base_top1 = _torch_logits(run.model, x), _torch_logits(base.model, x).argmax(1)
        print(f"\ntop-1 agreement with the torch model, {len(x)} '{splits.eval_split}' clips:")
        ptq = session_logits(ort_session(files["planned PTQ int8 (base)"]), x, BATCH)
        print(f"  {'planned PTQ int8 (base)':<36} {(ptq.argmax(1) == base_top1).mean():.2%} (with the base model)")
        for name in list(files)[2:]:  # the QAT files
            logits = session_logits(ort_session(files[name]), x, BATCH)
            change = np.abs(logits - qat_logits).max(axis=1)
            print(f"  {name:<36} {(logits.argmax(1) == qat_logits.argmax(1)).mean():.2%} (with the QAT model; "
                  f"|dlogit| median {np.median(change):.4f}, max {change.max():.4f})")
        feed = x[:1]
        for threads in args.threads:
            calls = {name: partial(ort.InferenceSession(str(path), session_options(threads),
                                                        providers=["CPUExecutionProvider"]).run, None, {"log_mel": feed})
                     for name, path in files.items()}
            timings = interleaved(calls, repeats=args.repeats)
            fp32 = timings["ONNX fp32 (base)"].median_ms
            print(f"\n{threads} thread{'s' if threads > 1 else ''}, batch 1, median of {args.repeats} (one loop):")
            for name, timing in timings.items():
                print(f"  {name:<36} {timing.median_ms:7.3f} ms  {timing.median_ms / fp32:5.2f}x ONNX fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
