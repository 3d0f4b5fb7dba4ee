"""Sound sources of synthetic scenes, as plain numpy signal generators.

Every generator has the signature ``(rng, n, sr, p) -> audio`` where ``p`` holds the parameters a
scene recipe drew for this segment. Continuous sources come out at unit RMS; event sources at unit
RMS while an event sounds, so a recipe sets every level in dB relative to the noise bed alone.
Frequencies are kept below 0.45 * sr so that any sample rate renders without aliasing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.signal import fftconvolve

#: (centre Hz, gain dB, width in octaves) of one smooth bump in a log-frequency curve.
Bump = tuple[float, float, float]
Generator = Callable[[np.random.Generator, int, int, dict[str, float]], np.ndarray]

_LOWEST_HZ = 20.0
_NYQUIST_GUARD = 0.45
_CONTROL_STEP = 32  # audio samples per control-rate sample of slow envelopes


def spectral_curve_db(
    freqs: np.ndarray, tilt_db_per_octave: float, bumps: Sequence[Bump] = (), ref_hz: float = 1000.0
) -> np.ndarray:
    """Smooth response over log frequency; scene noise beds and device responses share it."""
    octaves = np.log2(np.maximum(freqs, _LOWEST_HZ) / ref_hz)
    curve = tilt_db_per_octave * octaves
    for centre, gain_db, width in bumps:
        distance = octaves - np.log2(centre / ref_hz)
        curve = curve + gain_db * np.exp(-0.5 * (distance / width) ** 2)
    return curve


def band_limit_db(
    freqs: np.ndarray, highpass_hz: float | None, lowpass_hz: float | None, order: int = 3
) -> np.ndarray:
    """Butterworth magnitude (dB) of a high-pass and a low-pass: the band edges of a device."""
    f = np.maximum(freqs, 1e-3)
    db = np.zeros_like(f)
    if highpass_hz:
        db -= 10 * np.log10(1 + (highpass_hz / f) ** (2 * order))
    if lowpass_hz:
        db -= 10 * np.log10(1 + (f / lowpass_hz) ** (2 * order))
    return db


def unit_rms(x: np.ndarray) -> np.ndarray:
    rms = np.sqrt(np.mean(x**2))
    return x / rms if rms > 0 else x


def shaped_noise(
    rng: np.random.Generator,
    n: int,
    sr: int,
    tilt_db_per_octave: float,
    bumps: Sequence[Bump] = (),
    band: tuple[float | None, float | None] = (_LOWEST_HZ, None),
) -> np.ndarray:
    """Gaussian noise with a given spectral envelope (white 0, pink -3, brown -6 dB/octave)."""
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spectrum = rng.standard_normal(freqs.size) + 1j * rng.standard_normal(freqs.size)
    curve = spectral_curve_db(freqs, tilt_db_per_octave, bumps) + band_limit_db(freqs, *band)
    spectrum *= 10 ** (curve / 20)
    spectrum[0] = 0
    return unit_rms(np.fft.irfft(spectrum, n))


def slow_curve(rng: np.random.Generator, n: int, sr: int, rate_hz: float) -> np.ndarray:
    """Smooth random curve (unit-variance knots) changing about ``rate_hz`` times a second."""
    return to_audio_rate(control_curves(rng, n, sr, rate_hz, 1)[0], n)


def control_curves(rng: np.random.Generator, n: int, sr: int, rate_hz: float, count: int) -> np.ndarray:
    """``count`` slow curves at the control rate (sr / _CONTROL_STEP), cosine-interpolated knots.

    Envelopes change at most a few tens of times a second, so computing them on a coarse grid and
    interpolating linearly to audio rate loses nothing and saves most of the work.
    """
    m = n // _CONTROL_STEP + 2
    spacing = max(sr / _CONTROL_STEP / rate_hz, 1.0)
    knots = rng.standard_normal((count, int(m / spacing) + 2))
    position = np.arange(m) / spacing
    index = position.astype(np.int64)
    weight = (1 - np.cos(np.pi * (position - index))) / 2
    return knots[:, index] * (1 - weight) + knots[:, index + 1] * weight


def to_audio_rate(control: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.arange(n) / _CONTROL_STEP, np.arange(control.size), control)


def harmonic_tone(
    rng: np.random.Generator, freq: np.ndarray | float, n: int, sr: int, amplitudes: Sequence[float]
) -> np.ndarray:
    """Harmonics of a (possibly moving) fundamental; partials above the guard band are muted."""
    freq = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    phase = 2 * np.pi * np.cumsum(freq) / sr
    out = np.zeros(n)
    for k, amplitude in enumerate(amplitudes, start=1):
        audible = k * freq < _NYQUIST_GUARD * sr
        if audible.any():
            out += amplitude * audible * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def pulse_train(freq: np.ndarray, sr: int) -> np.ndarray:
    """One unit impulse per period of a moving fundamental: a glottis-like voiced excitation."""
    cycles = np.floor(np.cumsum(freq) / sr)
    return np.diff(cycles, prepend=0.0)


def poisson_times(rng: np.random.Generator, start: float, stop: float, rate: float) -> np.ndarray:
    return np.sort(rng.uniform(start, stop, rng.poisson(max(rate, 0.0) * (stop - start))))


def place(n: int, sr: int, times: np.ndarray, amplitudes: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Copies of one event template at the given times (seconds), by convolving an impulse train."""
    train = np.zeros(n)
    index = np.round(np.asarray(times) * sr).astype(np.int64)
    inside = (index >= 0) & (index < n)
    np.add.at(train, index[inside], np.asarray(amplitudes, dtype=np.float64)[inside])
    if not train.any():
        return train
    return fftconvolve(train, template)[:n]


def add_at(out: np.ndarray, event: np.ndarray, start: int) -> None:
    """Mix ``event`` into ``out`` from sample ``start``, clipped to the buffer."""
    lo, hi = max(start, 0), min(start + event.size, out.size)
    if lo < hi:
        out[lo:hi] += event[lo - start : hi - start]


def burst(
    rng: np.random.Generator, sr: int, seconds: float, decay: float, tilt: float, bumps: Sequence[Bump] = ()
) -> np.ndarray:
    """Exponentially decaying noise burst, the building block of steps, clicks and knocks."""
    m = max(int(seconds * sr), 16)
    envelope = np.exp(-np.arange(m) / (decay * sr))
    return unit_rms(shaped_noise(rng, m, sr, tilt, bumps) * envelope)


def bell(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Level of a source passing by at ``centre`` seconds (inverse-square-like distance law)."""
    return 1 / (1 + ((t - centre) / width) ** 2)


def _safe(freq: float, sr: int) -> float:
    return min(freq, _NYQUIST_GUARD * sr)


# --- continuous sources -------------------------------------------------------------------------


def bed(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Coloured background noise with a scene-typical envelope and slow level wander (wind, crowd)."""
    bumps = [(p[f"fc{j}"], p[f"gain{j}"], p[f"width{j}"]) for j in range(3) if f"fc{j}" in p]
    noise = shaped_noise(rng, n, sr, p["tilt"], bumps)
    wander = np.maximum(1 + p["wobble"] * slow_curve(rng, n, sr, 0.4), 0.1)
    return unit_rms(noise * wander)


def hum(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Mains, engine or ventilation hum: a drifting fundamental with decaying harmonics."""
    freq = p["f0"] * (1 + p["drift"] * slow_curve(rng, n, sr, 0.5))
    amplitudes = 10 ** (-p["rolloff"] * np.arange(int(round(p["harmonics"]))) / 20)
    flutter = np.maximum(1 + 0.3 * slow_curve(rng, n, sr, 2.0), 0.2)
    return unit_rms(harmonic_tone(rng, freq, n, sr, amplitudes) * flutter)


def whine(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Electric traction motor: a tonal whine gliding up or down as the vehicle speeds or brakes."""
    ramp = np.clip((np.arange(n) / n - rng.uniform(-0.5, 0.5)) * rng.uniform(1, 3), 0, 1)
    freq = p["f0"] * p["sweep"] ** ramp
    tone = harmonic_tone(rng, freq, n, sr, (1.0, 0.6, 0.25, 0.4))
    return unit_rms(tone * np.maximum(1 + 0.3 * slow_curve(rng, n, sr, 1.0), 0.2))


def babble(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Speech-like noise: band-limited carriers gated by 3-8 Hz syllables and pauses per talker.

    Independent noise carriers under slow envelopes add up like one carrier under the RMS of the
    envelopes, which keeps a crowd of 30 talkers as cheap as one; the two closest talkers also get
    a voiced (pulse-train) component so that babble has pitch, not only modulated noise.
    """
    talkers = max(int(round(p["talkers"])), 1)
    rates = p["rate"] * rng.uniform(0.8, 1.25, talkers)
    envelopes = np.stack([_syllables(rng, n, sr, rate) for rate in rates])
    speech = ((450, 8.0, 0.7), (1800, 5.0, 0.8))
    band = (150.0, _safe(5000.0, sr))
    power = to_audio_rate(np.mean(envelopes**2, axis=0), n)
    noise = shaped_noise(rng, n, sr, -2.0, speech, band) * np.sqrt(power)
    voiced = np.zeros(n)
    for envelope in envelopes[:2]:
        pitch = rng.uniform(90, 240) * (1 + 0.08 * slow_curve(rng, n, sr, 3.0))
        voiced += pulse_train(pitch, sr) * to_audio_rate(envelope, n)
    if not voiced.any():
        return unit_rms(noise)
    freqs = np.fft.rfftfreq(n, 1 / sr)
    shape = 10 ** ((spectral_curve_db(freqs, -3.0, speech) + band_limit_db(freqs, *band)) / 20)
    voiced = unit_rms(np.fft.irfft(np.fft.rfft(voiced) * shape, n)) * np.sqrt(np.mean(noise**2))
    return unit_rms(noise + 0.7 * voiced)


def _syllables(rng: np.random.Generator, n: int, sr: int, rate: float) -> np.ndarray:
    """A talker's envelope at the control rate: syllable bursts inside phrases and pauses."""
    syllables = np.maximum(control_curves(rng, n, sr, 2 * rate, 1)[0], 0)
    phrases = np.clip(2 * control_curves(rng, n, sr, 0.4, 1)[0] + 1.2, 0, 1)
    return syllables * phrases


def wind(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Gusty low-frequency rumble (wind on foliage and on the microphone)."""
    gusts = np.exp(0.9 * slow_curve(rng, n, sr, p["gust"]))
    return unit_rms(shaped_noise(rng, n, sr, -8.0, ((p["rustle"], 6.0, 1.0),)) * gusts)


def music(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Background music: a steady melody of decaying harmonic notes on a pentatonic scale."""
    ratios = np.array([1, 9 / 8, 5 / 4, 3 / 2, 5 / 3, 2])
    period = 1 / p["tempo"]
    out = np.zeros(n)
    for start in np.arange(rng.uniform(-period, 0), n / sr, period):
        note = _note(rng, sr, p["pitch"] * rng.choice(ratios), 1.5 * period)
        add_at(out, note, int(start * sr))
    return unit_rms(out)


def _note(rng: np.random.Generator, sr: int, freq: float, seconds: float) -> np.ndarray:
    m = int(seconds * sr)
    envelope = np.minimum(np.arange(m) / (0.01 * sr), 1) * np.exp(-np.arange(m) / (0.35 * seconds * sr))
    return unit_rms(harmonic_tone(rng, freq, m, sr, (1.0, 0.5, 0.3, 0.15)) * envelope)


# --- event sources ------------------------------------------------------------------------------


def steps(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Footsteps of walkers passing by: periodic knocks at a walking cadence."""
    t_end = n / sr
    out = np.zeros(n)
    for _ in range(max(int(round(p["walkers"])), 1)):
        period = rng.uniform(0.9, 1.1) / p["cadence"]
        times = np.arange(rng.uniform(-period, period), t_end, period)
        times = times + rng.normal(0, 0.02, times.size)
        level = bell(times, rng.uniform(0, t_end), rng.uniform(1, 4))
        template = burst(rng, sr, 0.08, 0.015, -3.0, ((p["brightness"], 8.0, 0.8),))
        out += place(n, sr, times, level, template)
    return out


def clicks(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Rattles, suitcase wheels, cutlery: short broadband clicks at a random rate."""
    times = poisson_times(rng, 0, n / sr, p["rate"])
    template = burst(rng, sr, 0.006, 0.0015, 1.0)
    return place(n, sr, times, rng.lognormal(0, 0.5, times.size), template)


def thumps(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Door slams and heavy knocks: a decaying low resonance plus a dull noise burst."""
    out = np.zeros(n)
    for time in poisson_times(rng, 0, n / sr, p["rate"]):
        m = int(0.4 * sr)
        t = np.arange(m) / sr
        body = np.sin(2 * np.pi * rng.uniform(60, 160) * t) * np.exp(-t / 0.08)
        knock = np.zeros(m)
        knock[: int(0.1 * sr)] = burst(rng, sr, 0.1, 0.03, -6.0)
        add_at(out, unit_rms(body + 0.7 * knock), int(time * sr))
    return out


def clacks(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Wheels over rail joints: regular pairs of knocks (two bogies) at a speed-dependent rate."""
    period = 1 / p["rate"]
    times = np.arange(rng.uniform(-period, 0), n / sr, period)
    times = times + rng.normal(0, 0.03 * period, times.size)
    gap = rng.uniform(0.1, 0.2)
    template = burst(rng, sr, 0.06, 0.01, -2.0, ((rng.uniform(500, 1200), 8.0, 0.6),))
    both = np.concatenate([times, times + gap])
    return place(n, sr, both, rng.uniform(0.6, 1.0, both.size), template)


def chime(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Announcement gongs: groups of two to four harmonic notes."""
    ratios = np.array([0.75, 1, 1.25, 1.5, 2])
    out = np.zeros(n)
    for time in poisson_times(rng, -1.0, n / sr, p["rate"]):
        for k in range(rng.integers(2, 5)):
            note = _note(rng, sr, p["pitch"] * rng.choice(ratios), rng.uniform(0.4, 0.8))
            add_at(out, note, int((time + 0.35 * k) * sr))
    return out


def horn(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Car horns: bright harmonic tones, sometimes two-tone, with a hard attack."""
    out = np.zeros(n)
    amplitudes = 1 / np.arange(1, 11) ** 0.7
    for time in poisson_times(rng, -0.5, n / sr, p["rate"]):
        m = int(rng.uniform(0.25, 1.2) * sr)
        envelope = np.minimum(np.minimum(np.arange(m), np.arange(m)[::-1]) / (0.02 * sr), 1)
        tone = harmonic_tone(rng, p["pitch"], m, sr, amplitudes)
        if rng.random() < 0.5:
            tone += harmonic_tone(rng, p["pitch"] * 1.26, m, sr, amplitudes)
        add_at(out, unit_rms(tone * envelope), int(time * sr))
    return out


def birds(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Bird song: bursts of fast frequency-modulated chirps."""
    out = np.zeros(n)
    for time in poisson_times(rng, -1.0, n / sr, p["rate"]):
        start = time
        pitch = p["pitch"] * rng.uniform(0.8, 1.25)
        for _ in range(rng.integers(3, 11)):
            m = int(rng.uniform(0.04, 0.15) * sr)
            f_start = _safe(pitch * rng.uniform(0.85, 1.15), sr)
            freq = np.minimum(f_start * 2 ** (rng.uniform(-1, 1) * np.linspace(0, 1, m)), _NYQUIST_GUARD * sr)
            chirp = harmonic_tone(rng, freq, m, sr, (1.0, 0.2)) * np.hanning(m)
            add_at(out, unit_rms(chirp), int(start * sr))
            start += m / sr + rng.uniform(0.03, 0.15)
    return out


def squeal(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Brake and curve squeal of trains and trams: long, slowly gliding high tones."""
    out = np.zeros(n)
    for time in poisson_times(rng, -1.5, n / sr, p["rate"]):
        m = int(rng.uniform(0.6, 2.5) * sr)
        glide = 2 ** (rng.uniform(-0.4, 0.4) * np.linspace(0, 1, m))
        freq = p["pitch"] * glide * (1 + 0.01 * slow_curve(rng, m, sr, 8.0))
        tone = harmonic_tone(rng, np.minimum(freq, _NYQUIST_GUARD * sr), m, sr, (1.0, 0.4, 0.2))
        add_at(out, unit_rms(tone * np.sqrt(np.hanning(m))), int(time * sr))
    return out


def passes(rng: np.random.Generator, n: int, sr: int, p: dict[str, float]) -> np.ndarray:
    """Passing vehicles: tyre/engine noise swelling and fading, engine pitch dropping (Doppler)."""
    t = np.arange(n) / sr
    power = np.zeros(n)
    engines = np.zeros(n)
    amplitudes = 0.7 ** np.arange(6)
    for centre in poisson_times(rng, -2.0, t[-1] + 2.0, p["rate"]):
        width = rng.uniform(0.4, 1.5)
        level = bell(t, centre, width)
        power += level**2
        doppler = 1 - rng.uniform(0.02, 0.08) * np.tanh((t - centre) / (width / 2))
        f0 = p["engine"] * rng.uniform(0.8, 1.25)
        engines += unit_rms(harmonic_tone(rng, f0 * doppler, n, sr, amplitudes)) * level
    tyres = shaped_noise(rng, n, sr, -4.5, ((rng.uniform(700, 1500), 5.0, 1.0),)) * np.sqrt(power)
    return tyres + 0.6 * engines


GENERATORS: dict[str, Generator] = {
    "bed": bed,
    "hum": hum,
    "whine": whine,
    "babble": babble,
    "wind": wind,
    "music": music,
    "steps": steps,
    "clicks": clicks,
    "thumps": thumps,
    "clacks": clacks,
    "chime": chime,
    "horn": horn,
    "birds": birds,
    "squeal": squeal,
    "passes": passes,
}
