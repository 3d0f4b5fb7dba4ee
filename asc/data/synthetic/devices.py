"""Recording devices: what turns one clean scene segment into device a's, b's ... s6's recording.

A device is a frequency response (smooth tilt and resonances between a high-pass and a low-pass
edge, optionally times a measured microphone impulse response), a gain, soft clipping, a coloured
noise floor and a small time offset. Its parameters are drawn once per corpus from ranges that grow
with the device class: a is nearly flat, b and c are moderately coloured, s1-s3 strongly, and the
evaluation-only s4-s6 lie beyond anything seen in training (steeper tilts, deeper resonances,
narrower bands). Per-clip frequency normalisation cancels a stationary response exactly, which is
what a frequency-normalised model can exploit and a BatchNorm model cannot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from asc.audio import load_audio
from asc.data.clips import DEVICE_GROUPS
from asc.data.synthetic.rng import Stream, stream_rng
from asc.data.synthetic.sources import band_limit_db, shaped_noise, spectral_curve_db
from asc.errors import DatasetError

Range = tuple[float, float]

TRAIN_DEVICES: tuple[str, ...] = DEVICE_GROUPS["real"] + DEVICE_GROUPS["seen"]
ALL_DEVICES: tuple[str, ...] = TRAIN_DEVICES + DEVICE_GROUPS["unseen"]

_IR_SECONDS = 0.25  # measured responses are cut here; their colouration lives in the first ms
_IR_PRE_PEAK = 16  # samples kept before the main peak


@dataclass(frozen=True)
class DeviceClass:
    """Ranges a device's fixed parameters are drawn from (signs of tilt and resonances are random)."""

    tilt: Range  # |dB per octave| around 1 kHz
    resonances: tuple[int, int]  # how many, inclusive
    resonance_db: Range  # |gain| of each
    highpass_hz: Range
    lowpass_hz: Range
    gain_db: Range
    noise_dbfs: Range  # RMS of the self-noise
    drive: Range  # soft-clipping drive
    clip_chance: float  # probability that the device soft-clips at all
    max_offset_ms: float  # recording offset, uniform in +-this, per clip


# Each class reaches beyond the previous one; the unseen class lies outside everything in training.
_FLAT = DeviceClass(
    tilt=(0.0, 0.3), resonances=(0, 1), resonance_db=(0.5, 2), highpass_hz=(20, 40),
    lowpass_hz=(18000, 20000), gain_db=(0, 0), noise_dbfs=(-90, -84),
    drive=(0, 0), clip_chance=0.0, max_offset_ms=0,
)
_REAL = DeviceClass(
    tilt=(0.5, 1.5), resonances=(1, 2), resonance_db=(3, 6), highpass_hz=(100, 200),
    lowpass_hz=(11000, 15000), gain_db=(-4, 4), noise_dbfs=(-80, -74),
    drive=(0, 0), clip_chance=0.0, max_offset_ms=20,
)
_SEEN = DeviceClass(
    tilt=(1.2, 2.5), resonances=(2, 3), resonance_db=(4, 8), highpass_hz=(150, 350),
    lowpass_hz=(7000, 11000), gain_db=(-6, 6), noise_dbfs=(-76, -70),
    drive=(1.5, 3), clip_chance=0.5, max_offset_ms=5,
)
_UNSEEN = DeviceClass(
    tilt=(2.8, 4.0), resonances=(2, 4), resonance_db=(8, 12), highpass_hz=(300, 600),
    lowpass_hz=(4000, 7000), gain_db=(-8, 8), noise_dbfs=(-72, -66),
    drive=(1.5, 3), clip_chance=0.5, max_offset_ms=5,
)

DEVICE_CLASSES: dict[str, DeviceClass] = {
    "a": _FLAT,
    "b": _REAL,
    "c": replace(_REAL, drive=(1.5, 3), clip_chance=1.0),
    "s1": _SEEN,
    "s2": _SEEN,
    "s3": _SEEN,
    "s4": _UNSEEN,
    "s5": _UNSEEN,
    "s6": _UNSEEN,
}


@dataclass(frozen=True)
class Device:
    name: str
    tilt: float
    resonances: tuple[tuple[float, float, float], ...]  # (centre Hz, gain dB, width octaves)
    highpass_hz: float
    lowpass_hz: float
    gain_db: float
    noise_dbfs: float
    noise_tilt: float
    drive: float  # 0 means no soft clipping
    max_offset_ms: float
    impulse_response: str | None = None  # file name, for the record
    ir: np.ndarray | None = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, object]:
        """JSON-ready parameters (everything but the IR samples) for synth.json."""
        record = asdict(self)
        record.pop("ir")
        record["resonances"] = [list(r) for r in self.resonances]
        return record


def make_devices(
    seed: int, sr: int, ir_dir: Path | None, ir_devices: tuple[str, ...]
) -> dict[str, Device]:
    """The nine devices of a corpus, fixed by the seed (and the IR folder's contents)."""
    irs = _assign_impulse_responses(seed, sr, ir_dir, ir_devices) if ir_dir is not None else {}
    devices = {}
    for index, name in enumerate(ALL_DEVICES):
        rng = stream_rng(seed, Stream.DEVICE, index)
        ir_name, ir = irs.get(name, (None, None))
        devices[name] = _draw_device(name, DEVICE_CLASSES[name], rng, ir_name, ir)
    return devices


def _draw_device(
    name: str, cls: DeviceClass, rng: np.random.Generator, ir_name: str | None, ir: np.ndarray | None
) -> Device:
    def draw(bounds: Range) -> float:
        return float(rng.uniform(*bounds))

    def signed(bounds: Range) -> float:
        return draw(bounds) * float(rng.choice((-1.0, 1.0)))

    count = int(rng.integers(cls.resonances[0], cls.resonances[1] + 1))
    resonances = tuple(
        (float(2 ** rng.uniform(np.log2(200), np.log2(8000))), signed(cls.resonance_db), draw((0.25, 0.8)))
        for _ in range(count)
    )
    return Device(
        name=name,
        tilt=signed(cls.tilt),
        resonances=resonances,
        highpass_hz=draw(cls.highpass_hz),
        lowpass_hz=draw(cls.lowpass_hz),
        gain_db=draw(cls.gain_db),
        noise_dbfs=draw(cls.noise_dbfs),
        noise_tilt=draw((-3.0, 0.0)),
        drive=draw(cls.drive) if rng.random() < cls.clip_chance else 0.0,
        max_offset_ms=cls.max_offset_ms,
        impulse_response=ir_name,
        ir=ir,
    )


def _assign_impulse_responses(
    seed: int, sr: int, ir_dir: Path, ir_devices: tuple[str, ...]
) -> dict[str, tuple[str, np.ndarray]]:
    files = sorted(p for p in Path(ir_dir).glob("*") if p.suffix.lower() in (".wav", ".flac"))
    if not files:
        problem = "no such folder" if not Path(ir_dir).is_dir() else "no .wav or .flac impulse responses found"
        raise DatasetError(ir_dir, problem, "point the impulse-response folder (--ir-dir, ir_dir=) at a folder of "
                           "IR files, or leave it out for simulated devices only")
    rng = stream_rng(seed, Stream.IMPULSE_RESPONSE)
    order = rng.permutation(len(files))
    chosen = {name: files[order[i % len(files)]] for i, name in enumerate(ir_devices)}
    return {name: (path.name, _load_impulse_response(path, sr)) for name, path in chosen.items()}


def _load_impulse_response(path: Path, sr: int) -> np.ndarray:
    """Peak-aligned, truncated response scaled to unit mean power over 100 Hz - 8 kHz."""
    ir, _ = load_audio(path, sr)
    start = max(int(np.argmax(np.abs(ir))) - _IR_PRE_PEAK, 0)
    ir = ir[start : start + int(_IR_SECONDS * sr)].astype(np.float64)
    ir *= np.hanning(2 * ir.size)[ir.size :]  # fade the truncated tail
    spectrum = np.abs(np.fft.rfft(ir, 8192))
    freqs = np.fft.rfftfreq(8192, 1 / sr)
    band = (freqs >= 100) & (freqs <= min(8000, 0.45 * sr))
    scale = np.sqrt(np.mean(spectrum[band] ** 2))
    if not np.isfinite(scale) or scale == 0:
        raise DatasetError(path, "impulse response is silent", "remove the file from the IR folder")
    return ir / scale


def record(
    device: Device, clean: np.ndarray, sr: int, n: int, margin: int, rng: np.random.Generator
) -> np.ndarray:
    """Device recording of ``clean`` (``n + 2 * margin`` samples): ``n`` samples in [-1, 1].

    The response is applied as one spectral multiplication of the whole padded rendering; the
    margins absorb its circular wrap-around and provide room for the time offset.
    """
    freqs = np.fft.rfftfreq(clean.size, 1 / sr)
    spectrum = np.fft.rfft(clean) * _response(device, freqs, rng)
    if device.ir is not None:
        spectrum *= np.fft.rfft(device.ir, clean.size)
    wet = np.fft.irfft(spectrum, clean.size)
    offset = int(round(rng.uniform(-1, 1) * device.max_offset_ms * 1e-3 * sr))
    offset = int(np.clip(offset, -margin, margin))
    audio = wet[margin + offset : margin + offset + n]
    if device.drive > 0:
        audio = np.tanh(device.drive * audio) / device.drive
    noise = shaped_noise(rng, n, sr, device.noise_tilt) * 10 ** (device.noise_dbfs / 20)
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


def _response(device: Device, freqs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Linear magnitude response, with a small per-recording variation (handling, placement)."""
    resonances = [(f * 2 ** rng.normal(0, 0.03), g, w) for f, g, w in device.resonances]
    db = spectral_curve_db(freqs, device.tilt + rng.normal(0, 0.1), resonances)
    db += band_limit_db(freqs, device.highpass_hz, device.lowpass_hz)
    db += device.gain_db + rng.normal(0, 0.5)
    return 10 ** (db / 20)
