"""Does an int8 ONNX file compute the same logits on every x86 CPU class? fp32 vs int8, per CPU.

onnxruntime's MLAS picks its int8 kernels from CPUID: AMX or AVX-512/AVX VNNI (``vpdpbusd``, exact
int32 sums) where the CPU has them, otherwise AVX2 ``vpmaddubsw``, which adds two u8*s8 products
into a *saturating* int16. So one file can agree with fp32 on a VNNI Xeon and not on an AVX2 EPYC
(docs/export-latency.md §10). This script runs the same files and inputs natively and under
``qemu-x86_64-static -cpu MODEL`` (user-mode emulation: CPUID says MODEL, so MLAS takes that
CPU's kernels; QEMU 7.2's TCG has AVX2 but no AVX-512) and prints, per CPU class, top-1
agreement and max |Δlogit| of each int8 file against the fp32 file on that CPU, accuracy when
labels are given, and how far each int8 file moves between CPU classes. Timings under emulation
mean nothing; only numbers are compared.

    # from a trained run: exports fp32 and planned int8 with 7-bit and 8-bit weights (needs torch)
    python benchmarks/int8_cpu_classes.py --run RUN --clips 400 --qemu-cpu Haswell EPYC
    # any fp32/int8 pair on saved inputs (torch-free): x.npy (n, ...) float32, optional y.npy labels
    python benchmarks/int8_cpu_classes.py --fp32 a.onnx --int8 b.onnx c.onnx --inputs x.npy --labels y.npy

The per-CPU worker (``--worker``) imports only numpy and onnxruntime, so emulation starts fast.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import re
import shutil
import subprocess
import sys
import tempfile
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
    import platform

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


def u8s8_kernel(flags: dict[str, bool]) -> str:
    """The U8S8 GEMM kernel family MLAS dispatches to for these CPUID flags (inferred, not queried)."""
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


def worker(folder: Path, tag: str) -> None:
    """Logits of every ``*.onnx`` in ``folder`` on ``folder/inputs.npy`` -> ``folder/logits_<tag>.npz``."""
    import onnxruntime as ort

    inputs = np.load(folder / "inputs.npy")
    logits = {}
    for path in sorted(folder.glob("*.onnx")):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        logits[path.stem] = np.concatenate([session.run(None, {name: inputs[i:i + 32]})[0]
                                            for i in range(0, len(inputs), 32)])
    np.savez(folder / f"logits_{tag}.npz", **logits)
    (folder / f"cpu_{tag}.json").write_text(json.dumps({**cpuid_report(), "onnxruntime": ort.__version__}))


def run_worker(folder: Path, tag: str, qemu_cpu: str | None) -> dict[str, object]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder), tag]
    if qemu_cpu is not None:
        command = [shutil.which("qemu-x86_64-static") or "qemu-x86_64-static", "-cpu", qemu_cpu, *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        noise = "TCG doesn't support requested feature"
        errors = "\n".join(line for line in done.stderr.splitlines() if noise not in line)
        raise SystemExit(f"worker for {tag} failed ({done.returncode}): {errors[-2000:]}")
    return json.loads((folder / f"cpu_{tag}.json").read_text())


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


def compare(folder: Path, tags: list[str], labels: np.ndarray | None) -> list[Row]:
    rows = []
    for tag in tags:
        logits = dict(np.load(folder / f"logits_{tag}.npz"))
        reference = logits.pop("fp32")
        if labels is not None:
            rows.append(Row(tag, "fp32", 1.0, 0.0, float((reference.argmax(1) == labels).mean())))
        for name, values in logits.items():
            rows.append(Row(tag, name, float((values.argmax(1) == reference.argmax(1)).mean()),
                            float(np.abs(values - reference).max()),
                            None if labels is None else float((values.argmax(1) == labels).mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "TAG"), help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help="trained run folder (exports fp32 + int8 7/8-bit weights; torch)")
    parser.add_argument("--clips", type=int, default=400, help="held-out clips of the run's eval split")
    parser.add_argument("--calibration-clips", type=int, default=128)
    parser.add_argument("--fp32", type=Path, help="fp32 ONNX file (instead of --run)")
    parser.add_argument("--int8", type=Path, nargs="+", default=[], help="int8 ONNX files of the same model")
    parser.add_argument("--inputs", type=Path, help="inputs .npy (n, ...) float32 for --fp32/--int8")
    parser.add_argument("--labels", type=Path, help="optional labels .npy (n,) for accuracy")
    parser.add_argument("--qemu-cpu", nargs="*", default=["Haswell"],
                        help="CPU models to emulate with qemu-x86_64-static (default Haswell; none: native only)")
    parser.add_argument("--keep", type=Path, help="keep the files and logits in this folder")
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1])
        return
    if (args.run is None) == (args.fp32 is None) or (args.fp32 is not None and (not args.int8 or not args.inputs)):
        parser.error("give --run RUN, or --fp32 FILE --int8 FILE... --inputs X.npy")

    with tempfile.TemporaryDirectory(prefix="asc-int8-cpu-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if args.run is not None:
            labels = from_run(args.run, folder, args.clips, args.calibration_clips)
        else:
            from_files(args.fp32, args.int8, args.inputs, folder)
            labels = None if args.labels is None else np.load(args.labels)
        qemu = shutil.which("qemu-x86_64-static")
        cpus: list[tuple[str, str | None]] = [("native", None)]
        if args.qemu_cpu and qemu is None:
            print("qemu-x86_64-static not found (apt-get install qemu-user-static): native only")
        elif args.qemu_cpu:
            cpus += [(f"qemu-{model}", model) for model in args.qemu_cpu]

        host = host_lscpu()
        print(f"host (lscpu): {host['model']}; " + " ".join(f"{f}={'yes' if v else 'no'}"
                                                          for f, v in host["flags"].items()))
        seen = {tag: run_worker(folder, tag, model) for tag, model in cpus}
        for tag, info in seen.items():
            flags = info["flags"]
            print(f"{tag:>16}: CPUID '{info['model']}', onnxruntime {info['onnxruntime']}; "
                  + " ".join(f"{f}={'yes' if flags.get(f) else 'no'}" for f in INT8_FLAGS)
                  + f" -> MLAS U8S8: {u8s8_kernel(flags)}")
        inputs = np.load(folder / "inputs.npy", mmap_mode="r")
        print(f"\n{len(inputs)} inputs of shape {tuple(inputs.shape[1:])}")
        for path in sorted(folder.glob("int8*.onnx")):
            print(f"{path.stem}: {operands(path)}")
        rows = compare(folder, list(seen), labels)
        print(f"\n{'cpu':>16} {'model':<14} {'top-1 vs fp32':>13} {'max |Δlogit|':>12}" +
              ("" if labels is None else f" {'accuracy':>9}"))
        for row in rows:
            print(f"{row.cpu:>16} {row.model:<14} {row.agreement:>13.1%} {row.max_diff:>12.4f}" +
                  ("" if row.accuracy is None else f" {row.accuracy:>9.1%}"))
        native = dict(np.load(folder / "logits_native.npz"))
        for tag in list(seen)[1:]:
            other = dict(np.load(folder / f"logits_{tag}.npz"))
            for name, values in native.items():
                same = float((values.argmax(1) == other[name].argmax(1)).mean())
                print(f"{name} native vs {tag}: top-1 equal {same:.1%}, max |Δlogit| "
                      f"{float(np.abs(values - other[name]).max()):.2e}")


if __name__ == "__main__":
    main()
