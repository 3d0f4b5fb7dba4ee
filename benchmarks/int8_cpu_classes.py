"""Does an int8 ONNX file compute the same logits on every CPU class, x86 and ARM64? fp32 vs int8, per CPU.

onnxruntime's MLAS picks its int8 kernels from CPUID: AMX or AVX-512/AVX VNNI (``vpdpbusd``, exact
int32 sums) where the CPU has them, otherwise AVX2 ``vpmaddubsw``, which adds two u8*s8 products
into a *saturating* int16. So one file can agree with fp32 on a VNNI Xeon and not on an AVX2 EPYC
(docs/export-latency.md §10). This script runs the same files and inputs natively and under
``qemu-x86_64-static -cpu MODEL`` (user-mode emulation: CPUID says MODEL, so MLAS takes that
CPU's kernels; QEMU 7.2's TCG has AVX2 but no AVX-512) and prints, per CPU class, top-1
agreement and max |Δlogit| of each int8 file against the fp32 file on that CPU, accuracy when
labels are given, and how far each int8 file moves between CPU classes. Timings under emulation
mean nothing; only numbers are compared.

Phones are ARM64, where MLAS has other int8 kernels again: plain NEON (``-cpu cortex-a53``),
dot product ``udot/sdot`` and i8mm ``ummla/smmla`` (``-cpu max``). ``--arm64-cpu`` runs the same
worker under ``qemu-aarch64-static -cpu MODEL`` in a Debian arm64 userland that this script sets
up once, without root-only steps or binfmt, and caches (``--arm64-cache``, default
``~/.cache/asc/arm64``): ``debootstrap --foreign --arch arm64 --variant=minbase --include=python3
bookworm``, its .debs unpacked without a second stage, and aarch64 wheels of onnxruntime 1.27.0
and numpy (onnxruntime >= 1.28 segfaults at import under qemu 7.2). With ``--arm64-cpu`` the same
onnxruntime version also runs natively on x86 (``native-1.27.0``), to tell "another CPU" from
"another version"; ``--probe-ops`` adds one-op int8 graphs to tell which kernel differs
(docs/export-latency.md §11). Not part of CI: slow. The CPU classes run as separate processes,
``--jobs`` of them at once (default: one per core; each emulated process uses one core).

    # a bundle as the runtime runs it (model.onnx and model.ort), on its run's eval clips
    python benchmarks/int8_cpu_classes.py --bundle BUNDLE --clips 200 --qemu-cpu EPYC --arm64-cpu cortex-a53 max
    # from a trained run: exports fp32 and planned int8 with 7-bit and 8-bit weights (needs torch)
    python benchmarks/int8_cpu_classes.py --run RUN --clips 400 --qemu-cpu Haswell EPYC
    # any fp32/int8 pair on saved inputs (torch-free): x.npy (n, ...) float32, optional y.npy labels
    python benchmarks/int8_cpu_classes.py --fp32 a.onnx --int8 b.onnx c.onnx --inputs x.npy --labels y.npy

The per-CPU worker (``--worker``) imports only numpy and onnxruntime, so emulation starts fast.
It opens every file as :class:`asc.runtime.Classifier` does (one thread, sequential, all graph
optimisations), which it cannot import: the ARM64 userland has no scipy, soundfile or torch.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
"""CPU features that decide which int8 kernels MLAS runs."""


# ---------------------------------------------------------------------------------------------
# What the CPU says (the worker runs this natively or under qemu, where CPUID is emulated)

# x86-64 SysV: cpuid(leaf=edi, subleaf=esi) -> out[4] at rdx (eax, ebx, ecx, edx)
_CPUID_CODE = bytes([
    0x53,                    # push rbx
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x49, 0x89, 0xD0,        # mov r8, rdx
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])


def _cpuid_function() -> object:
    memory = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    memory.write(_CPUID_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    function = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(address)
    function._memory = memory  # type: ignore[attr-defined]  # keep the page mapped
    return function


def cpuid_report() -> dict[str, object]:
    """Brand string and int8-relevant feature bits as the CPUID instruction reports them here."""
    if platform.machine() in ("aarch64", "arm64"):
        return arm64_hwcaps()
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"model": platform.machine(), "flags": {}}
    cpuid = _cpuid_function()
    out = (ctypes.c_uint32 * 4)()

    def regs(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
        cpuid(leaf, sub, out)  # type: ignore[operator]
        return out[0], out[1], out[2], out[3]

    top = regs(0)[0]
    brand = b"".join(b"".join(r.to_bytes(4, "little") for r in regs(leaf)) for leaf in (0x80000002, 0x80000003,
                                                                                        0x80000004))
    l7 = regs(7, 0) if top >= 7 else (0, 0, 0, 0)
    l7s1 = regs(7, 1) if top >= 7 else (0, 0, 0, 0)
    flags = {"avx2": bool(l7[1] >> 5 & 1), "avx512f": bool(l7[1] >> 16 & 1), "avx512bw": bool(l7[1] >> 30 & 1),
             "avx512_vnni": bool(l7[2] >> 11 & 1), "avx_vnni": bool(l7s1[0] >> 4 & 1),
             "amx_int8": bool(l7[3] >> 25 & 1)}
    return {"model": brand.rstrip(b"\0").decode(errors="replace").strip(), "flags": flags}


ARM64_FLAGS = ("asimd", "asimddp", "i8mm")
"""ARM64 features (Linux HWCAP bits) that decide which int8 kernels MLAS runs."""


def arm64_hwcaps() -> dict[str, object]:
    """``getauxval(AT_HWCAP/AT_HWCAP2)`` int8 bits: under qemu-user they are the emulated core's."""
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    hwcap, hwcap2 = libc.getauxval(16), libc.getauxval(26)  # AT_HWCAP, AT_HWCAP2
    flags = {"asimd": bool(hwcap >> 1 & 1), "asimddp": bool(hwcap >> 20 & 1), "i8mm": bool(hwcap2 >> 13 & 1)}
    return {"model": f"aarch64 (HWCAP {hwcap:#x}, HWCAP2 {hwcap2:#x})", "flags": flags}


def u8s8_kernel(flags: dict[str, bool]) -> str:
    """The U8S8 GEMM kernel family MLAS dispatches to for these CPUID/HWCAP flags (inferred, not queried)."""
    if "asimd" in flags:
        if flags.get("i8mm"):
            return "ARM64 i8mm ummla/smmla (exact int32)"
        if flags.get("asimddp"):
            return "ARM64 dot product udot/sdot (exact int32)"
        return "ARM64 NEON umull/smull widening (exact int32)"
    if flags.get("amx_int8"):
        return "AMX (exact int32)"
    if flags.get("avx512_vnni"):
        return "AVX-512 VNNI vpdpbusd (exact int32)"
    if flags.get("avx_vnni"):
        return "AVX-VNNI vpdpbusd (exact int32)"
    if flags.get("avx512bw"):
        return "AVX-512BW vpmaddubsw (int16 pairs, saturating)"
    if flags.get("avx2"):
        return "AVX2 vpmaddubsw (int16 pairs, saturating)"
    return "SSE (16-bit widening)"


def host_lscpu() -> dict[str, object]:
    """``lscpu``'s model name and int8 flags: the host kernel's view, the same inside qemu-user."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"model": "unknown (no lscpu)", "flags": {}}
    model = re.search(r"^Model name:\s*(.+)$", text, re.MULTILINE)
    listed = re.search(r"^Flags:\s*(.+)$", text, re.MULTILINE)
    flags = set(listed.group(1).split()) if listed else set()
    return {"model": model.group(1).strip() if model else "unknown", "flags": {f: f in flags for f in INT8_FLAGS}}


# ---------------------------------------------------------------------------------------------
# Worker: numpy + onnxruntime only


MEANING = ".meaning"
"""Suffix of an int8 file's logits with ``session.disable_quant_qdq=1``: float ops computing what
its Q/DQ graph means, the same on every CPU; an integer kernel that matches it is exact."""


def worker(folder: Path, tag: str) -> None:
    """Logits of every ``*.onnx``/``*.ort`` in ``folder`` on ``folder/inputs.npy`` -> ``logits_<tag>.npz``.

    It also writes each int8 file's Q/DQ meaning (:data:`MEANING`). A file this
    onnxruntime cannot load (an ORT format file from a newer one) is listed under ``unloadable``.
    """
    import onnxruntime as ort

    inputs = np.load(folder / "inputs.npy")
    logits, unloadable = {}, {}
    files = sorted([*folder.glob("*.onnx"), *folder.glob("*.ort")])
    runs = [(path, True) for path in files] + [(path, False) for path in files if path.stem.startswith("int8")]
    for path, fused in runs:
        options = ort.SessionOptions()  # asc.runtime.Classifier's settings
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if not fused:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 -- any load failure is reported, not fatal
            unloadable[path.name] = " ".join(str(error).split())[:200]
            continue
        name = session.get_inputs()[0].name
        logits[path.stem + ("" if fused else MEANING)] = np.concatenate(
            [session.run(None, {name: inputs[i:i + 32]})[0] for i in range(0, len(inputs), 32)])
    np.savez(folder / f"logits_{tag}.npz", **logits)
    (folder / f"cpu_{tag}.json").write_text(json.dumps({**cpuid_report(), "onnxruntime": ort.__version__,
                                                        "unloadable": unloadable}))


def run_worker(folder: Path, tag: str, prefix: list[str], site: Path | None = None) -> dict[str, object]:
    """Run :func:`worker` with the python that ``prefix`` names (natively, or under qemu), ``site`` first on its path."""
    command = [*prefix, str(Path(__file__).resolve()), "--worker", str(folder), tag]
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"} if site is not None else None
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        noise = "TCG doesn't support requested feature"
        errors = "\n".join(line for line in done.stderr.splitlines() if noise not in line)
        raise SystemExit(f"worker for {tag} failed ({done.returncode}): {errors[-2000:]}")
    return json.loads((folder / f"cpu_{tag}.json").read_text())


# ---------------------------------------------------------------------------------------------
# An emulated ARM64 userland (Debian arm64 + aarch64 wheels), set up once and cached

ARM64_ORT = "onnxruntime==1.27.0"
"""The newest onnxruntime that imports under qemu-aarch64 7.2 (1.28 and newer segfault, compression.md §9)."""
DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Arm64:
    """A cached arm64 root (python3.11) plus a site folder with onnxruntime and numpy for it."""

    cache: Path

    @property
    def root(self) -> Path:
        return self.cache / "root"

    @property
    def site(self) -> Path:
        return self.cache / "site"

    @property
    def python(self) -> Path:
        return self.root / "usr/bin/python3.11"

    def ready(self) -> bool:
        return self.python.is_file() and (self.site / "onnxruntime").is_dir() and (self.site / "numpy").is_dir()

    def command(self, cpu: str) -> list[str]:
        """The argv prefix that runs the arm64 python on emulated ``cpu`` (qemu's ``-L`` finds its libraries)."""
        qemu = shutil.which("qemu-aarch64-static") or "qemu-aarch64-static"
        return [qemu, "-cpu", cpu, "-L", str(self.root), str(self.python)]

    def setup(self, mirror: str = DEBIAN_MIRROR) -> Arm64:
        """Build the userland unless cached: debootstrap's first stage, its .debs unpacked, the wheels unzipped."""
        if self.ready():
            return self
        for tool in ("debootstrap", "dpkg-deb", "qemu-aarch64-static"):
            if shutil.which(tool) is None:
                raise SystemExit(f"{tool} not found: apt-get install -y debootstrap qemu-user-static")
        self.cache.mkdir(parents=True, exist_ok=True)
        partial = self.cache / "root.partial"
        if not (self.root / "usr/bin").is_dir():
            shutil.rmtree(partial, ignore_errors=True)
            print(f"arm64: debootstrap (first stage) into {partial}", flush=True)
            subprocess.run(["debootstrap", "--foreign", "--arch", "arm64", "--variant=minbase", "--include=python3",
                            "bookworm", str(partial), mirror], check=True, stdout=subprocess.DEVNULL)
            for deb in sorted((partial / "var/cache/apt/archives").glob("*.deb")):  # no second stage needed
                subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
            os.replace(partial, self.root)
        wheel_site(self.site, "aarch64", ARM64_ORT)
        if not self.ready():
            raise SystemExit(f"arm64 userland in {self.cache} is incomplete; delete the folder and run again")
        return self


def wheel_site(site: Path, arch: str, onnxruntime: str) -> Path:
    """``site`` holding cp311 manylinux wheels of ``onnxruntime`` and numpy for ``arch``, unzipped (cached)."""
    if (site / "onnxruntime").is_dir() and (site / "numpy").is_dir():
        return site
    wheels = site.with_name(site.name + ".wheels")
    print(f"pip download {onnxruntime} numpy ({arch}, cp311) into {wheels}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--platform", f"manylinux_2_28_{arch}", "--platform", f"manylinux2014_{arch}",
                    "--python-version", "3.11", "--implementation", "cp", "-d", str(wheels), onnxruntime, "numpy"],
                   check=True)
    shutil.rmtree(site, ignore_errors=True)
    for wheel in sorted(wheels.glob("*.whl")):
        shutil.unpack_archive(wheel, site, format="zip")
    return site


# ---------------------------------------------------------------------------------------------
# Inputs: a trained run (through the exporter, needs torch) or files


def from_run(run_dir: Path, folder: Path, clips: int, calibration_clips: int) -> np.ndarray:
    """Export the run's fp32 CNN and its planned int8 with 7- and 8-bit weights; return eval labels."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's asc, as the other scripts
    import torch

    from asc.export.bundle import open_run, run_clipset, sample_clips, split_dataset
    from asc.export.onnx import FEATURE_INPUT, nodes_inside, save_onnx, torch_to_onnx
    from asc.export.precision import PrecisionPlan, quantize_planned
    from asc.models import FreqNorm

    run = open_run(run_dir)
    clipset = run_clipset(run, progress=False)
    frames = run.features.num_frames(run.clip_samples)
    proto = torch_to_onnx(run.model.eval(), torch.zeros(2, 1, run.features.n_mels, frames), input_name=FEATURE_INPUT)
    norms = nodes_inside(proto, FreqNorm)
    fp32 = save_onnx(proto, folder / "fp32.onnx")
    train = split_dataset(run, clipset, run.config.data.train_split, as_features=True, progress=False)
    calibration = sample_clips(train, calibration_clips, split=run.config.data.train_split)
    for bits in (8, 7):
        quantize_planned(fp32, folder / f"int8_w{bits}.onnx", calibration.batches(), PrecisionPlan(weight_bits=bits),
                         float_nodes=norms)
    held_out = sample_clips(split_dataset(run, clipset, run.config.data.eval_split, as_features=True, progress=False),
                            clips, split=run.config.data.eval_split)
    np.save(folder / "inputs.npy", np.concatenate(list(held_out.batches())))
    np.save(folder / "labels.npy", np.asarray(held_out.targets))
    return np.asarray(held_out.targets)


GATE_REFERENCE = "gate_reference.npy"
"""Logits of a QAT run's torch graph on the inputs: the export gate's reference for its bundle."""


def from_bundle(bundle: Path, folder: Path, clips: int) -> np.ndarray:
    """The bundle's deployed files, and its run's fp32 CNN and eval log-mels as the reference; return labels.

    The bundle's ``model.onnx`` becomes ``int8_bundle.onnx`` (``fp32_bundle.onnx`` if fp32) and its
    ``model.ort`` ``<same>_ort.ort``: exactly the files an app runs. For a QAT run the fp32 CNN is
    its float twin (the QAT-trained float weights), since its finalized model is an int8 graph;
    the graph's own logits, the reference the export gate used, go to :data:`GATE_REFERENCE`.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from asc.bundle_manifest import BundleManifest
    from asc.export.bundle import open_run, run_clipset, sample_clips, split_dataset
    from asc.export.onnx import (
        FEATURE_INPUT,
        is_quantized_graph,
        save_onnx,
        torch_to_onnx,
    )
    from asc.train.evaluate import load_run_model

    manifest = BundleManifest.read(bundle)
    if manifest.frontend_in_graph:
        raise SystemExit(f"{bundle}: the front end is in the graph; export with --frontend external to compare "
                         "on log-mels")
    run = open_run(Path(manifest.source["run"]), manifest.source.get("checkpoint", "last"))
    clipset = run_clipset(run, progress=False)
    frames = run.features.num_frames(run.clip_samples)
    example = torch.zeros(2, 1, run.features.n_mels, frames)
    reference = load_run_model(run.run_dir, "last", trainable=True)[0] if is_quantized_graph(run.model) else run.model
    reference.eval()  # not chained: an exported graph's eval() returns None
    save_onnx(torch_to_onnx(reference, example, input_name=FEATURE_INPUT), folder / "fp32.onnx")
    stem = f"{manifest.precision}_bundle"
    shutil.copyfile(bundle / manifest.model_file, folder / f"{stem}.onnx")
    if manifest.ort_file:
        shutil.copyfile(bundle / manifest.ort_file, folder / f"{stem}_ort.ort")
    held_out = sample_clips(split_dataset(run, clipset, run.config.data.eval_split, as_features=True, progress=False),
                            clips, split=run.config.data.eval_split)
    np.save(folder / "inputs.npy", np.concatenate(list(held_out.batches())))
    if is_quantized_graph(run.model):  # what `asc export` gates a QAT bundle against, computed here once
        with torch.no_grad():
            np.save(folder / GATE_REFERENCE,
                    np.concatenate([run.model(torch.from_numpy(batch)).numpy() for batch in held_out.batches()]))
    return np.asarray(held_out.targets)


PROBES = ("stem", "pointwise", "depthwise", "dense", "add", "mul", "maxpool", "mean", "concat")
"""One-op int8 graphs after a dense stem conv: which int8 kernels compute differently on a CPU class."""


def write_probes(folder: Path, channels: int = 16, seed: int = 0) -> None:
    """``probe_<op>.onnx``: a float graph ``stem conv (1->C, 3x3) -> op`` on ``inputs.npy``, quantized as the
    exporter quantizes (7-bit weights, U8S8, per channel), so every op runs as its own int8 kernel."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from asc.export.onnx import quantize_int8

    rng = np.random.default_rng(seed)
    inputs = np.load(folder / "inputs.npy")

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                       name)

    def conv(x: str, out: str, w: str, **attrs: object) -> onnx.NodeProto:
        return helper.make_node("Conv", [x, w, w + "_b"], [out], **attrs)

    c = channels
    inits = [weight("w0", c, 1, 3, 3), weight("w0_b", c), weight("w1", c, c, 1, 1), weight("w1_b", c),
             weight("w2", c, 1, 3, 1), weight("w2_b", c), weight("w3", c, c, 3, 3), weight("w3_b", c),
             numpy_helper.from_array(np.array([2], np.int64), "axes")]
    tails = {
        "stem": [helper.make_node("Identity", ["s"], ["y"])],
        "pointwise": [conv("s", "y", "w1")],
        "depthwise": [conv("s", "y", "w2", group=c, pads=[1, 0, 1, 0])],
        "dense": [conv("s", "y", "w3", pads=[1, 1, 1, 1])],
        "add": [conv("s", "p", "w1"), helper.make_node("Add", ["s", "p"], ["y"])],
        "mul": [conv("s", "p", "w1"), helper.make_node("Mul", ["s", "p"], ["y"])],
        "maxpool": [helper.make_node("MaxPool", ["s"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
        "mean": [helper.make_node("ReduceMean", ["s", "axes"], ["y"], keepdims=1)],
        "concat": [conv("s", "p", "w1"), helper.make_node("Concat", ["s", "p"], ["y"], axis=1)],
    }
    stem = [conv("x", "s0", "w0", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["s0"], ["s"])]
    for name, tail in tails.items():
        used = {x for node in stem + tail for x in node.input}
        graph = helper.make_graph(stem + tail, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   ["n", *inputs.shape[1:]])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [init for init in inits if init.name in used])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)  # ORT 1.27 reads <= 10
        fp32 = folder / f"probe_{name}.fp32"
        onnx.save(model, str(fp32))
        quantize_int8(fp32, folder / f"probe_{name}.onnx", [inputs[i:i + 16] for i in range(0, len(inputs), 16)])
        fp32.unlink()


def probe_report(folder: Path, tags: list[str]) -> list[str]:
    """Per probe and CPU class: the share of output values that differ from native, and the largest difference."""
    native = dict(np.load(folder / "logits_native.npz"))
    lines = [f"{'int8 op probe':<14} " + " ".join(f"{tag:>26}" for tag in tags[1:])]
    for name in sorted(n for n in native if n.startswith("probe_")):
        cells = []
        for tag in tags[1:]:
            others = np.load(folder / f"logits_{tag}.npz")
            if name not in others:
                cells.append("does not load")
                continue
            diff = np.abs(others[name] - native[name])
            cells.append(f"{(diff > 0).mean():>7.2%} differ, max {diff.max():.1e}")
        lines.append(f"{name[6:]:<14} " + " ".join(f"{c:>26}" for c in cells))
    return lines


def from_files(fp32: Path, int8: list[Path], inputs: Path, folder: Path) -> None:
    shutil.copyfile(fp32, folder / "fp32.onnx")
    for path in int8:
        shutil.copyfile(path, folder / (path.name if path.stem.startswith("int8") else f"int8_{path.name}"))
    np.save(folder / "inputs.npy", np.load(inputs).astype(np.float32))


def operands(path: Path) -> str:
    """The exporter's int8 operand record (model metadata), read with onnxruntime."""
    import onnxruntime as ort

    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    record = json.loads(meta.get("asc.int8_operands", "null"))
    return "no record" if record is None else (f"weights {record['weight_range']}, int16 pair peak "
                                               f"{record['int16_pair_peak']} (safe: {record['int16_safe']})")


# ---------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Row:
    cpu: str
    model: str
    agreement: float
    max_diff: float
    accuracy: float | None
    meaning_diff: float | None  #: max |Δlogit| against the file's Q/DQ meaning (int8 files)
    gate_agreement: float | None  #: top-1 agreement with the export gate's reference, when not fp32 (QAT)


def compare(folder: Path, tags: list[str], labels: np.ndarray | None) -> list[Row]:
    """Per CPU class and file: top-1 agreement and max |Δlogit| against fp32 *on that CPU*.

    A QAT bundle's gate compares it with its run's torch graph, not with the float twin that is
    the fp32 file here, so that agreement gets its own column (:data:`GATE_REFERENCE`).
    """
    meanings = {name[:-len(MEANING)]: values for name, values in np.load(folder / "logits_native.npz").items()
                if name.endswith(MEANING)}
    gate = np.load(folder / GATE_REFERENCE).argmax(1) if (folder / GATE_REFERENCE).is_file() else None
    rows = []
    for tag in tags:
        logits = {name: values for name, values in np.load(folder / f"logits_{tag}.npz").items()
                  if not name.endswith(MEANING) and not name.startswith("probe_")}
        reference = logits.pop("fp32")
        if labels is not None:
            rows.append(Row(tag, "fp32", 1.0, 0.0, float((reference.argmax(1) == labels).mean()), None, None))
        for name, values in logits.items():
            meaning = meanings.get(name.removesuffix("_ort"))
            rows.append(Row(tag, name, float((values.argmax(1) == reference.argmax(1)).mean()),
                            float(np.abs(values - reference).max()),
                            None if labels is None else float((values.argmax(1) == labels).mean()),
                            None if meaning is None else float(np.abs(values - meaning).max()),
                            None if gate is None else float((values.argmax(1) == gate).mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "TAG"), help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help="trained run folder (exports fp32 + int8 7/8-bit weights; torch)")
    parser.add_argument("--bundle", type=Path, help="a bundle (external front end): its model.onnx/model.ort against "
                        "its run's fp32 CNN on the run's eval clips (torch)")
    parser.add_argument("--clips", type=int, default=400, help="held-out clips of the run's eval split")
    parser.add_argument("--calibration-clips", type=int, default=128)
    parser.add_argument("--fp32", type=Path, help="fp32 ONNX file (instead of --run)")
    parser.add_argument("--int8", type=Path, nargs="+", default=[], help="int8 ONNX files of the same model")
    parser.add_argument("--inputs", type=Path, help="inputs .npy (n, ...) float32 for --fp32/--int8")
    parser.add_argument("--labels", type=Path, help="optional labels .npy (n,) for accuracy")
    parser.add_argument("--qemu-cpu", nargs="*", default=["Haswell"],
                        help="CPU models to emulate with qemu-x86_64-static (default Haswell; none: native only)")
    parser.add_argument("--arm64-cpu", nargs="*", default=[],
                        help="ARM64 cores to emulate with qemu-aarch64-static, e.g. cortex-a53 (NEON only) max "
                             "(dot product, i8mm); sets up the cached arm64 userland on first use")
    parser.add_argument("--arm64-cache", type=Path, default=Path.home() / ".cache/asc/arm64")
    parser.add_argument("--debian-mirror", default=DEBIAN_MIRROR)
    parser.add_argument("--probe-ops", action="store_true",
                        help=f"also run one-op int8 graphs ({', '.join(PROBES)}) to find which kernels differ")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="CPU classes run at once, one process each (default: one per core)")
    parser.add_argument("--keep", type=Path, help="keep the files and logits in this folder")
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1])
        return
    sources = sum(x is not None for x in (args.run, args.bundle, args.fp32))
    if sources != 1 or (args.fp32 is not None and (not args.int8 or not args.inputs)):
        parser.error("give --run RUN, --bundle BUNDLE, or --fp32 FILE --int8 FILE... --inputs X.npy")

    arm64 = Arm64(args.arm64_cache).setup(args.debian_mirror) if args.arm64_cpu else None
    with tempfile.TemporaryDirectory(prefix="asc-int8-cpu-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if args.run is not None:
            labels = from_run(args.run, folder, args.clips, args.calibration_clips)
        elif args.bundle is not None:
            labels = from_bundle(args.bundle, folder, args.clips)
        else:
            from_files(args.fp32, args.int8, args.inputs, folder)
            labels = None if args.labels is None else np.load(args.labels)
        if args.probe_ops:
            write_probes(folder)
        qemu = shutil.which("qemu-x86_64-static")
        cpus: list[tuple[str, list[str], Path | None]] = [("native", [sys.executable], None)]
        if args.qemu_cpu and qemu is None:
            print("qemu-x86_64-static not found (apt-get install qemu-user-static): native only")
        elif args.qemu_cpu:
            cpus += [(f"qemu-{model}", [qemu, "-cpu", model, sys.executable], None) for model in args.qemu_cpu]
        if arm64 is not None:  # the same onnxruntime natively: separates "other CPU" from "other version"
            same = wheel_site(args.arm64_cache / f"x86_64-{ARM64_ORT.replace('==', '-')}", "x86_64", ARM64_ORT)
            cpus.append((f"native-{ARM64_ORT.split('==')[1]}", [sys.executable], same))
            cpus += [(f"arm64-{model}", arm64.command(model), arm64.site) for model in args.arm64_cpu]

        host = host_lscpu()
        print(f"host (lscpu): {host['model']}; " + " ".join(f"{f}={'yes' if v else 'no'}"
                                                          for f, v in host["flags"].items()))
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:  # each worker is its own process
            reports = list(pool.map(lambda cpu: run_worker(folder, *cpu), cpus))
        seen = {tag: report for (tag, _, _), report in zip(cpus, reports)}
        for tag, info in seen.items():
            flags = info["flags"]
            names = ARM64_FLAGS if "asimd" in flags else INT8_FLAGS
            print(f"{tag:>16}: CPUID '{info['model']}', onnxruntime {info['onnxruntime']}; "
                  + " ".join(f"{f}={'yes' if flags.get(f) else 'no'}" for f in names)
                  + f" -> MLAS U8S8: {u8s8_kernel(flags)}")
            for name, reason in info.get("unloadable", {}).items():
                print(f"{'':>16}  {name} does not load here: {reason}")
        inputs = np.load(folder / "inputs.npy", mmap_mode="r")
        print(f"\n{len(inputs)} inputs of shape {tuple(inputs.shape[1:])}")
        for path in sorted(folder.glob("int8*.onnx")):
            print(f"{path.stem}: {operands(path)}")
        rows = compare(folder, list(seen), labels)
        gated = any(row.gate_agreement is not None for row in rows)
        print(f"\n{'cpu':>16} {'model':<16} {'top-1 vs fp32':>13} {'max |Δlogit|':>12} {'vs Q/DQ meaning':>15}" +
              ("" if labels is None else f" {'accuracy':>9}")
              + (f" {'top-1 vs torch graph (gate)':>27}" if gated else ""))
        for row in rows:
            meaning = "" if row.meaning_diff is None else f"{row.meaning_diff:.4f}"
            accuracy = "" if row.accuracy is None else f" {row.accuracy:>9.1%}"
            gate = "" if not gated else f" {'' if row.gate_agreement is None else f'{row.gate_agreement:.1%}':>27}"
            print(f"{row.cpu:>16} {row.model:<16} {row.agreement:>13.1%} {row.max_diff:>12.4f} {meaning:>15}"
                  + accuracy + gate)
        native = {n: v for n, v in np.load(folder / "logits_native.npz").items() if not n.startswith("probe_")}
        for tag in list(seen)[1:]:
            other = dict(np.load(folder / f"logits_{tag}.npz"))
            for name, values in native.items():
                if name in other:
                    same = float((values.argmax(1) == other[name].argmax(1)).mean())
                    print(f"{name} native vs {tag}: top-1 equal {same:.1%}, max |Δlogit| "
                          f"{float(np.abs(values - other[name]).max()):.2e}")
        if args.probe_ops:
            print("\n" + "\n".join(probe_report(folder, list(seen))))


if __name__ == "__main__":
    main()
