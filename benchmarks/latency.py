"""Per-clip latency of BC-ResNet-Mod on this CPU: torch eager fp32, ONNX fp32, ONNX int8 (naive and
planned mixed precision), torchao PT2E int8 in torch, at 1 and 2 threads, in one run.

    python benchmarks/latency.py [--width 40] [--prune 0.5] [--repeats 20] [--run RUN_DIR] [--profile]
    python benchmarks/latency.py --bundle BUNDLE [--threads 1 2] [--repeats 30]
    python benchmarks/latency.py --qat [--width 40] [--freq-norm resnorm] [--threads 1] [--repeats 30]

Weights are random (BN statistics from a few forward passes on noise), which is fine for
latency; agreement on random weights and noise inputs is only a smoke test. ``--run`` adds the
agreement that matters: a trained run's model, calibrated on its training clips and compared on
its eval clips. Input: one 10-s clip at 44.1 kHz as log-mel (256 x 431, n_fft 2048, hop 1024),
batch 1. Every variant of one thread count is timed round-robin (each repetition runs all of
them once) because the machine is shared; ratios are from the same loop. ``--profile`` prints
onnxruntime's per-op-type kernel time for fp32 and both int8 graphs (1 thread); ``--steps`` times
the int8-friendly rewrites one by one. ``--bundle`` times an exported (external front end) bundle's
model against the fp32 graph of the run it came from, side by side per thread count, and prints
what its export measured (agreement on held-out clips, the int8 search, the precision decision).
``--qat`` puts the model through the repo's QAT path instead (ranges observed on the calibration
clips, no weight training) and times its int8 QDQ graph before and after each int8-friendly rewrite
next to ONNX fp32, with each step's logit change against the un-rewritten QAT graph, plus the shipped
graph with its frequency-wise norms bypassed (``norms_cut_out``: wrong logits, only the time the
norms' float passes cost, so the bound on what integer norms could buy). ``--freq-norm`` picks the
random model's frequency-wise norm (default ``resnorm``, the recipes').
Every run prints the CPU model and its int8 flags first: the ratios are only true of that CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asc.bench import Timing, cpu_line, interleaved, session_options  # noqa: E402
from asc.bundle_manifest import BundleManifest  # noqa: E402
from asc.compress.prune import prune_channels  # noqa: E402
from asc.export.onnx import export_frontend, ort_session, save_onnx, torch_to_onnx  # noqa: E402
from asc.export.precision import (  # noqa: E402
    NAIVE_PLAN,
    QAT_REWRITES,
    REWRITES,
    PrecisionPlan,
    node_groups,
    plan_precision,
    quantize_planned,
    rewrite_for_int8,
)
from asc.export.verify import compare_logits  # noqa: E402
from asc.feature_spec import FastLogMel, FeatureConfig  # noqa: E402
from asc.models import build_model  # noqa: E402
from asc.models.norms import norm_names  # noqa: E402
from asc.onnx_graph import prune_dead_nodes, tensor_consumers, tensor_producers  # noqa: E402

CLIP_SECONDS = 10.0


def random_model(width: int, shape: tuple[int, int], seed: int = 0, freq_norm: str = "resnorm") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("bcresnet_mod", 10, width=width, freq_norm=freq_norm)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 1, *shape) * 3 - 4)
    return model.eval()


def log_mel_like(count: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Noise with a log-mel's scale and a per-band tilt, so per-bin statistics differ by bin."""
    rng = np.random.default_rng(seed)
    tilt = np.linspace(0.0, -6.0, shape[0])[:, None]
    return (rng.standard_normal((count, 1, *shape)) * 2.0 - 4.0 + tilt).astype(np.float32)


def export_variants(name: str, model: torch.nn.Module, calibration: list[np.ndarray], work: Path,
                    plan: PrecisionPlan) -> dict[str, Path]:
    example = torch.from_numpy(np.concatenate(calibration[:2]))
    fp32 = save_onnx(torch_to_onnx(model, example, input_name="log_mel"), work / f"{name}_fp32.onnx")
    return {"fp32": fp32,
            "int8 naive": quantize_planned(fp32, work / f"{name}_naive.onnx", calibration, NAIVE_PLAN),
            "int8 planned": quantize_planned(fp32, work / f"{name}_planned.onnx", calibration, plan)}


def pt2e_int8(model: torch.nn.Module, shape: tuple[int, int], calibration: list[np.ndarray]) -> torch.nn.Module:
    """torchao PT2E int8 graph (the project's ORT-shaped quantizer), run by torch itself."""
    from asc.compress.quant import QATConfig, convert_qat, prepare_qat

    qat = prepare_qat(model, (1, *shape), QATConfig())
    qat.eval()  # dropout off, BN running statistics; then observe ranges: a post-training calibration
    for quantizer in qat.fake_quantizers():
        quantizer.enable_observer(True)
    with torch.no_grad():
        for batch in calibration:
            qat(torch.from_numpy(batch))
    return convert_qat(qat)


def torch_call(module: torch.nn.Module, x: np.ndarray) -> Callable[[], object]:
    tensor = torch.from_numpy(x)

    def call() -> object:
        with torch.inference_mode():
            return module(tensor)

    return call


def profile_ops(path: Path, feed: np.ndarray, runs: int = 10) -> dict[str, float]:
    """Mean kernel milliseconds per op type over ``runs`` runs (1 thread, after one warm-up)."""
    options = session_options(1)
    options.enable_profiling = True
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: feed})
    for _ in range(runs):
        session.run(None, {name: feed})
    trace = Path(session.end_profiling())
    totals: dict[str, float] = defaultdict(float)
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1e3 / (runs + 1)
    trace.unlink()
    return dict(totals)


def print_table(title: str, timings: dict[str, Timing], threads: int) -> None:
    torch_ms, onnx_ms = timings["torch eager fp32"].median_ms, timings["ONNX fp32"].median_ms
    print(f"\n{title}, {threads} thread{'s' if threads > 1 else ''} (median of {next(iter(timings.values())).runs})")
    print(f"  {'variant':<28} {'ms':>8} {'p90':>8} {'vs torch':>9} {'vs ONNX fp32':>12} {'RTF':>8}")
    for name, t in timings.items():
        print(f"  {name:<28} {t.median_ms:8.2f} {t.p90_ms:8.2f} {t.median_ms / torch_ms:8.2f}x "
              f"{t.median_ms / onnx_ms:11.2f}x {t.median_ms / 1e3 / CLIP_SECONDS:8.5f}")


def agreement_lines(paths: dict[str, Path], inputs: np.ndarray, label: str) -> None:
    reference = ort_session(paths["fp32"]).run(None, {"log_mel": inputs})[0]
    for name in ("int8 naive", "int8 planned"):
        logits = ort_session(paths[name]).run(None, {"log_mel": inputs})[0]
        a = compare_logits(reference, logits, reference_name="ONNX fp32", candidate_name=name)
        print(f"  {label} {name:<13} top-1 agreement with ONNX fp32 {a.top1_agreement:6.1%} on {a.clips} clips, "
              f"max |dlogit| {a.max_abs_diff:.3f} (max |logit| {a.reference_scale:.2f})")


def run_agreement(run_dir: Path, work: Path, plan: PrecisionPlan, clips: int, search_bar: float | None) -> None:
    """Calibrate on the run's training clips, compare int8 with fp32 on its eval clips; with
    ``search_bar``, also let :func:`plan_precision` search plans at that agreement bar."""
    from asc.export.bundle import open_run, run_clipset, sample_clips, split_dataset

    run = open_run(run_dir)
    clipset = run_clipset(run, progress=False)
    train = sample_clips(split_dataset(run, clipset, run.config.data.train_split, as_features=True, progress=False),
                         64, split="train")
    evaluation = sample_clips(split_dataset(run, clipset, run.config.data.eval_split, as_features=True,
                                            progress=False), clips, split="eval")
    calibration = list(train.batches())
    inputs = np.concatenate(list(evaluation.batches()))
    paths = export_variants("run", run.model, calibration, work, plan)
    print(f"\nagreement of the trained run {run_dir} (calibration: 64 training clips):")
    agreement_lines(paths, inputs, "trained")
    if search_bar is not None:
        print(f"\nplan search on the trained run, input {tuple(inputs.shape[1:])}:")
        print(plan_precision(paths["fp32"], calibration, inputs, min_agreement=search_bar, repeats=10,
                             work_dir=work).format())


def time_variants(models: dict[str, torch.nn.Module], paths: dict[str, dict[str, Path]],
                  pt2e: torch.nn.Module | None, feed: np.ndarray, threads: int, repeats: int, width: int) -> None:
    torch.set_num_threads(threads)
    for label, model in models.items():
        calls: dict[str, Callable[[], object]] = {"torch eager fp32": torch_call(model, feed)}
        for name, path in paths[label].items():
            session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
            calls[f"ONNX {name}"] = (lambda s=session: s.run(None, {"log_mel": feed}))
        if pt2e is not None and not label:
            calls["torch PT2E int8"] = torch_call(pt2e, feed)
        print_table(f"{label}c={width}", interleaved(calls, repeats=repeats), threads)
    torch.set_num_threads(1)


def frontend_share(features: FeatureConfig, paths: dict[str, Path], feed: np.ndarray, work: Path,
                   repeats: int) -> None:
    """Front-end time of one clip next to the model's: the runtime's FastLogMel and in-graph ONNX, 1 thread."""
    clip = (np.random.default_rng(0).standard_normal((1, int(CLIP_SECONDS * features.sample_rate))) * 0.1
            ).astype(np.float32)
    frontend = ort_session(export_frontend(features, clip.shape[1], work / "frontend.onnx"))
    external = FastLogMel(features)
    fp32, planned = ort_session(paths["fp32"]), ort_session(paths["int8 planned"])
    t = interleaved({"external": lambda: external(clip),
                     "onnx": lambda: frontend.run(None, {"audio": clip}),
                     "fp32": lambda: fp32.run(None, {"log_mel": feed}),
                     "planned": lambda: planned.run(None, {"log_mel": feed})}, repeats=repeats)
    for name in ("external", "onnx"):
        ms = t[name].median_ms
        print(f"\nfront end for one {CLIP_SECONDS:g}-s clip, 1 thread, {name}: {ms:.2f} ms; share of end to end: "
              f"{ms / (ms + t['fp32'].median_ms):.0%} with ONNX fp32, {ms / (ms + t['planned'].median_ms):.0%} "
              "with int8 planned")


def step_table(fp32: Path, calibration: list[np.ndarray], feed: np.ndarray, work: Path, repeats: int) -> None:
    """What each rewrite bought: cumulative plans timed side by side with fp32 (1 thread)."""
    steps = {"naive (all int8, no rewrites)": NAIVE_PLAN, "norms + input front float": PrecisionPlan(rewrites=())}
    for i in range(1, len(REWRITES) + 1):
        steps[f"+ {REWRITES[i - 1]}"] = PrecisionPlan(rewrites=REWRITES[:i])
    calls: dict[str, Callable[[], object]] = {}
    for i, (name, plan) in enumerate({"fp32": None, **steps}.items()):
        path = fp32 if plan is None else quantize_planned(fp32, work / f"step{i}.onnx", calibration, plan)
        session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        calls[name] = (lambda s=session: s.run(None, {"log_mel": feed}))
    timings = interleaved(calls, repeats=repeats)
    print(f"\nint8 step by step, 1 thread (median of {repeats}, same loop):")
    for name, t in timings.items():
        print(f"  {name:<36} {t.median_ms:8.2f} ms  {t.median_ms / timings['fp32'].median_ms:5.2f}x ONNX fp32")


def qat_export(model: torch.nn.Module, shape: tuple[int, int], calibration: list[np.ndarray], path: Path) -> Path:
    """``model`` through the project's QAT path, ranges observed on ``calibration``, exported as int8 QDQ."""
    from asc.compress.quant import observed_int8_graph
    from asc.export.onnx import export_onnx

    return export_onnx(observed_int8_graph(model, (1, *shape), calibration),
                       torch.from_numpy(np.concatenate(calibration[:2])), path, input_name="log_mel")


SHIPPED = "  + freq mean as int8 conv (asc export)"
QAT_STEPS: dict[str, tuple[str, ...]] = {
    "QAT int8 + stacked int8 band conv": ("subspectral_bands",),
    "  + stem space-to-depth": ("subspectral_bands", "stem_space_to_depth"),
    SHIPPED: QAT_REWRITES,
    "  + norm affine on input (not exported)": REWRITES,
}
"""Cumulative rewrites of a QAT graph, each exact in real arithmetic (docs/export-latency.md §16-18); the
last is what ``asc export`` leaves out of QAT graphs (asc.export.precision.QAT_REWRITES)."""


NORMS_CUT = "  shipped with norms cut (timing only)"


def norms_cut_out(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with each frequency-wise norm bypassed: a timing bound, not a model (its logits are wrong).

    The codes that enter a norm go straight to what read its quantized output (through the MaxPool
    where one follows the norm), so every float pass of the norms (dequantize, statistics, affine,
    quantize) is gone: what integer norms could save at most. Returns the graph and the norms cut.
    """
    model = copy.deepcopy(model)
    nodes = model.graph.node
    producer, readers = tensor_producers(model.graph), tensor_consumers(model.graph)
    norm_output = set(node_groups(model).get("norm_output", []))
    cut = 0
    for add in [node for node in nodes if node.name in norm_output and node.op_type == "Add"]:
        after = readers.get(add.output[0], [])
        pool = after[0] if [n.op_type for n in after] == ["MaxPool"] else None
        quantizers = [n for n in readers.get((pool or add).output[0], []) if n.op_type == "QuantizeLinear"]
        shifted = producer[producer[add.input[0]].input[0]]  # Add(Mul(Sub(x, shift), scale), offset)
        dequantize = producer.get(shifted.input[0])  # the input norm's x is the float log-mel: it is not tagged
        if len(quantizers) != 1 or dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        codes = dequantize.input[0]
        if pool is not None:
            pool.input[0], codes = codes, pool.output[0]
        for node in nodes:
            node.input[:] = [codes if name == quantizers[0].output[0] else name for name in node.input]
        cut += 1
    prune_dead_nodes(model.graph)
    return model, cut


def qat_table(width: int, shape: tuple[int, int], calibration: list[np.ndarray], feed: np.ndarray, work: Path,
              thread_counts: list[int], repeats: int, agree_clips: int, freq_norm: str) -> None:
    """ONNX fp32 against the QAT int8 graph before and after the rewrites, round-robin per thread count."""
    start = time.perf_counter()
    model = random_model(width, shape, freq_norm=freq_norm)
    fp32 = save_onnx(torch_to_onnx(model, torch.from_numpy(np.concatenate(calibration[:2])), input_name="log_mel"),
                     work / "fp32.onnx")
    qat = qat_export(model, shape, calibration[:4], work / "qat.onnx")
    paths = {"ONNX fp32": fp32, "QAT int8 (as exported)": qat}
    for i, (name, rewrites) in enumerate(QAT_STEPS.items()):
        rewritten, report = rewrite_for_int8(onnx.load(str(qat)), rewrites)
        paths[name] = save_onnx(rewritten, work / f"qat_step{i}.onnx")
        print(f"{name.strip()}: {report.applied}")
    cut_model, cut = norms_cut_out(onnx.load(str(paths[SHIPPED])))
    if cut:
        paths[NORMS_CUT] = save_onnx(cut_model, work / "qat_norms_cut.onnx")
        print(f"{NORMS_CUT.strip()}: {cut} norms bypassed")
    print(f"(QAT graph built and rewritten in {time.perf_counter() - start:.0f} s)")
    for threads in thread_counts:
        sessions = {name: ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
                    for name, path in paths.items()}
        timings = interleaved({name: (lambda s=s: s.run(None, {"log_mel": feed})) for name, s in sessions.items()},
                              repeats=repeats)
        base, qat_ms = timings["ONNX fp32"].median_ms, timings["QAT int8 (as exported)"].median_ms
        print(f"\nc={width} QAT, {threads} thread{'s' if threads > 1 else ''} (median of {repeats}, same loop; "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
        for name, t in timings.items():
            print(f"  {name:<40} {t.median_ms:8.2f} ms  p10 {t.p10_ms:8.2f}  {t.median_ms / base:5.2f}x ONNX fp32  "
                  f"{t.median_ms / qat_ms:5.2f}x QAT int8")
    inputs = log_mel_like(agree_clips, shape, seed=99)
    print(f"\nlogit change against the un-rewritten QAT graph ({agree_clips} clips; fused = integer kernels, "
          "Q/DQ = float simulation):")
    for fused in (True, False):
        reference = ort_session(qat, fused=fused).run(None, {"log_mel": inputs})[0]
        scale = float(np.abs(reference).max())
        for name in QAT_STEPS:
            logits = ort_session(paths[name], fused=fused).run(None, {"log_mel": inputs})[0]
            change = np.abs(logits - reference).max(axis=1)
            print(f"  {'fused' if fused else 'Q/DQ '} {name.strip():<38} max {change.max():.4f}  median "
                  f"{np.median(change):.4f}  (max |logit| {scale:.2f})  top-1 same "
                  f"{(logits.argmax(1) == reference.argmax(1)).mean():.1%}")


def print_profile(paths: dict[str, Path], feed: np.ndarray) -> None:
    profiles = {name: profile_ops(path, feed) for name, path in paths.items()}
    ops = sorted(set().union(*profiles.values()), key=lambda op: -max(p.get(op, 0.0) for p in profiles.values()))
    print("\nper-op-type kernel time, ms per clip, 1 thread (onnxruntime profiler)")
    print(f"  {'op type':<22}" + "".join(f"{name:>14}" for name in profiles))
    for op in ops:
        print(f"  {op:<22}" + "".join(f"{p.get(op, 0.0):14.2f}" for p in profiles.values()))
    print(f"  {'total':<22}" + "".join(f"{sum(p.values()):14.2f}" for p in profiles.values()))


def bundle_latency(bundle: Path, thread_counts: list[int], repeats: int, work: Path) -> None:
    """A bundle's shipped model against its run's fp32 graph, round-robin per thread count (batch 1)."""
    from asc.export import open_run

    manifest = BundleManifest.read(bundle)
    if manifest.frontend_in_graph:
        raise SystemExit(f"{bundle}: export it with the external front end to time the model alone")
    run = open_run(manifest.source["run"], manifest.source["checkpoint"])
    shape = [int(d) for d in manifest.input_shape[1:]]
    fp32 = save_onnx(torch_to_onnx(run.model, torch.zeros(2, *shape), input_name=manifest.input_name),
                     work / "fp32.onnx")
    feed = log_mel_like(1, (shape[1], shape[2]), seed=1000)
    m, source = manifest.metrics, manifest.source
    print(f"{bundle}: {manifest.precision}, input {'x'.join(map(str, shape))}; parity on {m['clips']} held-out "
          f"clips: top-1 {m['top1_agreement']:.2%} vs {m['agreement_with']}, max |dlogit| "
          f"{m['max_abs_logit_diff']:.3g}")
    if source.get("precision_decision"):
        print(f"  decision: {source['precision_decision']['reason']}")
    searched = source.get("int8_search")
    if searched:
        print(f"  search: {searched['plan']['calibration']} calibration (tried {searched['calibrations']}), "
              f"{len(searched['float_tensors'])} of {searched['candidates']} tensors float, "
              f"{searched['agreement']:.2%} on {searched['search_clips']} search clips")
        for tensor in searched["float_tensors"]:
            print(f"    float {tensor['tensor']} ({tensor['producer']}): removed {tensor['error_removed']:.1%}")
    for threads in thread_counts:
        sessions = {name: ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
                    for name, path in (("ONNX fp32", fp32), (f"bundle {manifest.precision}",
                                                             manifest.model_path(bundle)))}
        calls = {name: (lambda s=s: s.run(None, {manifest.input_name: feed})) for name, s in sessions.items()}
        timings = interleaved(calls, repeats=repeats)
        base = timings["ONNX fp32"].median_ms
        for name, t in timings.items():
            print(f"  {threads} thread{'s' if threads > 1 else ' '} {name:<14} {t.median_ms:8.2f} ms  "
                  f"{t.median_ms / base:5.2f}x ONNX fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=40)
    parser.add_argument("--prune", type=float, default=0.5, help="channel-pruning ratio of the pruned model (0: none)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calibration", type=int, default=16, help="calibration clips (random)")
    parser.add_argument("--agree-clips", type=int, default=64, help="random clips for the agreement smoke test")
    parser.add_argument("--run", type=Path, help="a trained run folder: agreement on its own eval clips")
    parser.add_argument("--run-clips", type=int, default=400)
    parser.add_argument("--search", action="store_true",
                        help="also run plan_precision (slow): on the --run model at --min-agreement, else on the "
                             "random model with no agreement bar (its choice is then timed too)")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--no-pt2e", action="store_true", help="skip the torchao PT2E int8 model (~1 min to build)")
    parser.add_argument("--profile", action="store_true", help="per-op-type kernel time, fp32 vs int8 (1 thread)")
    parser.add_argument("--steps", action="store_true", help="time the rewrites one by one (cumulative, 1 thread)")
    parser.add_argument("--bundle", type=Path, help="time this bundle's model against its run's fp32 graph, only")
    parser.add_argument("--freq-norm", default="resnorm", choices=norm_names("freq"),
                        help="the random model's frequency-wise norm (default: resnorm, the recipes')")
    parser.add_argument("--qat", action="store_true",
                        help="time the QAT int8 graph before and after the int8 rewrites against ONNX fp32, only")
    args = parser.parse_args()
    print(f"cpu: {cpu_line()}; onnxruntime {ort.__version__}")
    if args.bundle is not None:
        with tempfile.TemporaryDirectory(prefix="asc-latency-") as tmp:
            bundle_latency(args.bundle, args.threads, args.repeats, Path(tmp))
        return

    features = FeatureConfig()
    shape = (features.n_mels, features.num_frames(int(CLIP_SECONDS * features.sample_rate)))
    torch.set_num_threads(1)
    calibration = [log_mel_like(1, shape, seed) for seed in range(args.calibration)]
    feed = log_mel_like(1, shape, seed=1000)
    if args.qat:
        print(f"BC-ResNet-Mod c={args.width}, freq_norm {args.freq_norm}, random weights through QAT range "
              f"observation, input 1x1x{shape[0]}x{shape[1]}, torch {torch.__version__}")
        with tempfile.TemporaryDirectory(prefix="asc-latency-") as tmp:
            qat_table(args.width, shape, calibration, feed, Path(tmp), args.threads, args.repeats,
                      min(args.agree_clips, 16), args.freq_norm)
        return
    plan = PrecisionPlan()
    print(f"BC-ResNet-Mod c={args.width}, freq_norm {args.freq_norm}, random weights, input 1x1x{shape[0]}x{shape[1]} "
          f"({CLIP_SECONDS:g}-s clip at {features.sample_rate} Hz), onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}")
    print(f"planned int8: {plan.describe()}")

    with tempfile.TemporaryDirectory(prefix="asc-latency-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        model = random_model(args.width, shape, freq_norm=args.freq_norm)
        models = {"": model}
        if args.prune > 0:
            models[f"pruned {args.prune:g} "] = prune_channels(model, torch.from_numpy(feed), args.prune).eval()
        paths = {label: export_variants(f"m{i}", m, calibration, work, plan)
                 for i, (label, m) in enumerate(models.items())}
        if args.search and args.run is None:
            report = plan_precision(paths[""]["fp32"], calibration[:8], log_mel_like(32, shape, seed=7), rounds=1,
                                    min_agreement=0.0, repeats=10, work_dir=work)
            print(report.format())
            if report.chosen.plan is not None:
                paths[""]["int8 searched"] = quantize_planned(paths[""]["fp32"], work / "searched.onnx", calibration,
                                                              report.chosen.plan)
        pt2e = None
        if not args.no_pt2e:
            try:
                pt2e = pt2e_int8(model, shape, calibration[:4])
            except Exception as error:  # noqa: BLE001 -- report any failure of the optional variant
                print(f"PT2E int8 in torch: failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
        print(f"(built every variant in {time.perf_counter() - start:.0f} s)")

        for threads in args.threads:
            time_variants(models, paths, pt2e, feed, threads, args.repeats, args.width)
        frontend_share(features, paths[""], feed, work, args.repeats)
        print("\nagreement (int8 vs ONNX fp32):")
        for label in models:
            agreement_lines(paths[label], log_mel_like(args.agree_clips, shape, seed=99),
                            f"random-weight {label}c={args.width}:")
        if args.run is not None:
            run_agreement(args.run, work, plan, args.run_clips, args.min_agreement if args.search else None)
        if args.steps:
            step_table(paths[""]["fp32"], calibration, feed, work, args.repeats)
        if args.profile:
            print_profile(paths[""], feed)


if __name__ == "__main__":
    main()
