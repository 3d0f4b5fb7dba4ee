"""Device augmentation: make clips of the majority device sound like other devices.

TAU Mobile has ~10k clips from device "a" and a few hundred from every other device, so a model
learns device "a"'s colouration as if it were part of the scene. Three remedies live here:

- spectrogram translation learned from paired recordings of the same segment: a mean response
  curve per device (:class:`DeviceResponse`) or a small conditional CNN (:class:`DeviceTranslator`),
  applied on the fly by :class:`DeviceTranslation`;
- convolution of device-"a" waveforms with real microphone impulse responses
  (:class:`ImpulseResponseAugment`);
- Freq-MixStyle, which mixes per-frequency statistics (the device's fingerprint) across the batch
  (:class:`FreqMixStyle`).

All are train-only, act on batches, and draw their randomness from a caller-supplied CPU
``torch.Generator``. Spectrograms are ``(batch, 1, frequency, time)`` log-mels; waveforms
``(batch, samples)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from scipy.fft import next_fast_len
from torch import Tensor, nn
from tqdm import tqdm

from asc.audio import load_audio
from asc.augment.spec import sample_beta
from asc.data.clips import Clip
from asc.errors import AscError, AudioError, ConfigError
from asc.io import atomic_torch_save

IR_EXTENSIONS = (".wav", ".flac", ".ogg", ".aif", ".aiff")


# ----------------------------------------------------------------------------------------------
# Pairs of recordings of the same segment
# ----------------------------------------------------------------------------------------------


def pair_by_segment(clips: Sequence[Clip], source: str | None = "a") -> list[tuple[int, int]]:
    """``(source clip, other-device clip)`` index pairs that recorded the same segment.

    Clips without a segment id cannot be paired and are skipped. Pairs are ordered by the
    other-device clip, so the result follows the order of ``clips``. ``source=None`` takes the
    device with the most segment-identified clips (TAU's "a"), the one translation starts from.
    """
    if source is None:
        counts = Counter(clip.device for clip in clips if clip.segment is not None)
        if not counts:
            return []
        source = max(sorted(counts), key=lambda device: counts[device])
    by_segment: dict[str, list[int]] = {}
    for index, clip in enumerate(clips):
        if clip.segment is not None and clip.device == source:
            by_segment.setdefault(clip.segment, []).append(index)
    return [
        (source_index, index)
        for index, clip in enumerate(clips)
        if clip.segment is not None and clip.device != source
        for source_index in by_segment.get(clip.segment, ())
    ]


def align_pairs(source: Tensor, target: Tensor, max_lag: int) -> tuple[Tensor, Tensor, Tensor]:
    """Undo small time offsets between paired spectrograms ``(N, 1, F, T)``.

    The devices of a TAU segment were not started sample-synchronously, so what the source shows
    at frame t the target shows at frame t + lag. The lag is the one that maximises the correlation of
    the frame-energy curves; both spectrograms are then cropped to the ``T - max_lag`` frames they
    share. Returns the aligned source, the aligned target and the lag of each pair.
    """
    _check_pairs(source, target)
    n_time = source.shape[-1]
    if not 0 <= max_lag < n_time // 2:
        raise ConfigError(f"align_pairs: max_lag={max_lag} must be in [0, {n_time // 2}) for {n_time} frames")
    energy_source = source.mean(dim=(1, 2))
    energy_target = target.mean(dim=(1, 2))
    lags = torch.arange(-max_lag, max_lag + 1)
    scores = torch.stack([
        _correlation(energy_source[:, max(0, -lag): n_time - max(0, lag)],
                     energy_target[:, max(0, lag): n_time - max(0, -lag)])
        for lag in lags.tolist()
    ], dim=1)
    lag = lags[scores.argmax(dim=1)].to(source.device)
    frames = torch.arange(n_time - max_lag, device=source.device)
    source_index = (frames + (-lag).clamp(min=0).unsqueeze(1))
    target_index = (frames + lag.clamp(min=0).unsqueeze(1))
    return _take_frames(source, source_index), _take_frames(target, target_index), lag


def _correlation(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)


def _take_frames(x: Tensor, index: Tensor) -> Tensor:
    """Per-pair frame selection: ``index`` is ``(N, T')``."""
    expanded = index[:, None, None, :].expand(-1, x.shape[1], x.shape[2], -1)
    return x.gather(3, expanded)


def _check_pairs(source: Tensor, target: Tensor, count: int | None = None) -> None:
    if source.dim() != 4 or source.shape != target.shape:
        raise ValueError(
            "paired spectrograms must both be (N, 1, F, T); "
            f"got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    if count is not None and count != source.shape[0]:
        raise ValueError(f"{source.shape[0]} pairs but {count} target devices")


# ----------------------------------------------------------------------------------------------
# Translation models
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class DeviceResponse:
    """Mean log-mel difference (an EQ curve) from the source device to each target device.

    ``delta[d, f]`` is the mean over pairs of the clip-level difference (target minus source, averaged
    over time, which also makes it insensitive to small lags); ``sd[d, f]`` is its spread over pairs,
    so that translated clips vary as much as real recordings of that device do.
    """

    devices: list[str]
    delta: Tensor  # (n_devices, n_mels)
    sd: Tensor  # (n_devices, n_mels)

    @classmethod
    def fit(cls, source_specs: Tensor, target_specs: Tensor, target_devices: Sequence[str]) -> DeviceResponse:
        """Fit from paired log-mels ``(N, 1, F, T)``; ``target_devices[i]`` names pair i's device."""
        _check_pairs(source_specs, target_specs, len(target_devices))
        difference = (target_specs - source_specs).mean(dim=(1, 3))  # (N, F)
        devices = sorted(set(target_devices))
        deltas, spreads = [], []
        for device in devices:
            mask = torch.tensor([name == device for name in target_devices], device=difference.device)
            rows = difference[mask]
            deltas.append(rows.mean(dim=0))
            spreads.append(rows.std(dim=0, correction=1 if rows.shape[0] > 1 else 0))
        return cls(devices, torch.stack(deltas), torch.stack(spreads))

    def delta_for(self, devices: Sequence[str]) -> Tensor:
        """The curves of ``devices`` in that order."""
        return self.delta[torch.tensor([self._index(name) for name in devices], dtype=torch.long)]

    def translate(self, x: Tensor, target: Tensor, generator: torch.Generator) -> Tensor:
        """``x + delta_d + z * sd_d`` with one z ~ N(0, 1) per clip; ``target`` indexes ``devices``."""
        target = target.to(self.delta.device)
        z = torch.randn(target.shape[0], 1, generator=generator).to(self.delta.device)
        offset = self.delta[target] + z * self.sd[target]
        return x + offset.to(x.device, x.dtype)[:, None, :, None]

    def state_dict(self) -> dict[str, Any]:
        return {"devices": list(self.devices), "delta": self.delta.clone(), "sd": self.sd.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DeviceResponse:
        return cls(list(state["devices"]), state["delta"], state["sd"])

    def save(self, path: str | PathLike[str]) -> None:
        atomic_torch_save(self.state_dict(), Path(path))

    @classmethod
    def load(cls, path: str | PathLike[str]) -> DeviceResponse:
        state = _load_state(path, "device response", ("devices", "delta", "sd"))
        return cls.from_state_dict(state)

    def _index(self, device: str) -> int:
        if device not in self.devices:
            raise ConfigError(
                f"no device response for device '{device}' (fitted for {', '.join(self.devices)}); "
                "fit it on pairs that include that device or drop it from the targets"
            )
        return self.devices.index(device)


class DeviceTranslator(nn.Module):
    """One conditional residual CNN that maps a source-device log-mel to any target device.

    Output: ``x + delta_d + std * G([x_norm, onehot(d), freq])``. The one-hot maps make one network
    serve every target; the frequency-coordinate map lets the 3x3 stack, which is otherwise blind
    to absolute frequency, learn a frequency-dependent response; ``delta_d`` (optional, from a
    :class:`DeviceResponse`) means G only learns what the mean curve misses. The last layer starts
    at zero, so an untrained translator is exactly the response curve.
    """

    def __init__(
        self,
        devices: Sequence[str],
        *,
        channels: int = 32,
        layers: int = 5,
        freq_coords: bool = True,
        n_mels: int | None = None,
    ) -> None:
        super().__init__()
        if layers < 2:
            raise ConfigError(f"DeviceTranslator layers={layers} must be >= 2")
        self.devices = list(devices)
        self.channels, self.layers, self.freq_coords, self.n_mels = channels, layers, freq_coords, n_mels
        widths = [1 + len(self.devices) + int(freq_coords)] + [channels] * (layers - 1) + [1]
        body: list[nn.Module] = []
        for index, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            body.append(nn.Conv2d(cin, cout, 3, padding=1))
            if index < layers - 1:
                body.append(nn.ReLU())
        nn.init.zeros_(body[-1].weight)
        nn.init.zeros_(body[-1].bias)
        self.body = nn.Sequential(*body)
        self.register_buffer("input_mean", torch.zeros(()))
        self.register_buffer("input_std", torch.ones(()))
        self.register_buffer("delta", torch.zeros(len(self.devices), n_mels) if n_mels else None)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        batch, _, n_freq, n_time = x.shape
        normalised = (x - self.input_mean) / self.input_std
        onehot = nn.functional.one_hot(target.to(x.device), len(self.devices)).to(x.dtype)
        maps = [normalised, onehot[:, :, None, None].expand(-1, -1, n_freq, n_time)]
        if self.freq_coords:
            coords = torch.linspace(-1.0, 1.0, n_freq, device=x.device, dtype=x.dtype)
            maps.append(coords.view(1, 1, n_freq, 1).expand(batch, 1, n_freq, n_time))
        out = x + self.input_std * self.body(torch.cat(maps, dim=1))
        if self.delta is not None:
            out = out + self.delta[target.to(x.device)][:, None, :, None]
        return out

    def translate(self, x: Tensor, target: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic; takes ``generator`` only to be interchangeable with DeviceResponse."""
        return self(x, target)

    def config(self) -> dict[str, Any]:
        return {"devices": list(self.devices), "channels": self.channels, "layers": self.layers,
                "freq_coords": self.freq_coords, "n_mels": self.n_mels}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DeviceTranslator:
        return cls(config["devices"], channels=config["channels"], layers=config["layers"],
                   freq_coords=config["freq_coords"], n_mels=config["n_mels"])

    def save(self, path: str | PathLike[str]) -> None:
        atomic_torch_save({"config": self.config(), "state_dict": self.state_dict()}, Path(path))

    @classmethod
    def load(cls, path: str | PathLike[str]) -> DeviceTranslator:
        saved = _load_state(path, "device translator", ("config", "state_dict"))
        model = cls.from_config(saved["config"])
        model.load_state_dict(saved["state_dict"])
        return model.eval()


def fit_translator(
    source_specs: Tensor,
    target_specs: Tensor,
    target_device_ids: Tensor,
    devices: Sequence[str],
    *,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    use_response: bool = True,
    align: bool = True,
    max_lag: int = 4,
    channels: int = 32,
    layers: int = 5,
    progress: bool = False,
) -> DeviceTranslator:
    """Train a :class:`DeviceTranslator` with L1 against the (aligned) target recordings.

    ``target_device_ids[i]`` indexes ``devices`` (the translator's target vocabulary) for pair i.
    Seeded through a private generator and a forked RNG, so it leaves the global RNG untouched.
    """
    _check_pairs(source_specs, target_specs, target_device_ids.shape[0])
    target_device_ids = target_device_ids.long().to(source_specs.device)
    if align:
        source_specs, target_specs, _ = align_pairs(source_specs, target_specs, max_lag)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DeviceTranslator(devices, channels=channels, layers=layers,
                                 n_mels=source_specs.shape[2] if use_response else None)
    model = model.to(source_specs.device)
    if use_response:
        names = [model.devices[i] for i in target_device_ids.tolist()]
        response = DeviceResponse.fit(source_specs, target_specs, names)
        model.delta.copy_(response.delta_for(model.devices))
    model.input_mean.fill_(source_specs.mean().item())
    model.input_std.fill_(source_specs.std().clamp(min=1e-6).item())
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc="device translator", unit="epoch", disable=not progress):
        for batch in torch.randperm(source_specs.shape[0], generator=generator).split(batch_size):
            batch = batch.to(source_specs.device)
            prediction = model(source_specs[batch], target_device_ids[batch])
            loss = (prediction - target_specs[batch]).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def _load_state(path: str | PathLike[str], what: str, keys: Sequence[str]) -> dict[str, Any]:
    file = Path(path)
    fix = "fit it again and save it with .save()"
    if not file.is_file():
        raise AscError(f"{file}: {what} file not found; {fix}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a foreign or corrupt file
        raise AscError(f"{file}: not a saved {what} ({type(error).__name__}); {fix}") from None
    if not isinstance(state, dict) or any(key not in state for key in keys):
        raise AscError(f"{file}: not a saved {what} (expected keys {', '.join(keys)}); {fix}")
    return state


# ----------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{name} p={p} must be between 0 and 1")


def _source_ids(devices: Sequence[str], source: str | None, who: str) -> Tensor | None:
    """Vocabulary ids of the source device, or None (every clip) when no source is named."""
    if source is None:
        return None
    return torch.tensor([_source_index(devices, source, who)])


def _source_index(devices: Sequence[str], source: str, who: str) -> int:
    if source not in devices:
        raise ConfigError(
            f"{who}: source device '{source}' is not among the training devices ({', '.join(devices)}); "
            "set the augmentation's source device to one of them"
        )
    return list(devices).index(source)


def _pick_source_rows(devices: Tensor, source_ids: Tensor | None, p: float, generator: torch.Generator) -> Tensor:
    """Indices of source-device rows (every row when ``source_ids`` is None) selected with
    probability p (draws for every row, CPU)."""
    draws = torch.rand(devices.shape[0], generator=generator) < p
    if source_ids is not None:
        draws &= torch.isin(devices.cpu(), source_ids)
    return torch.nonzero(draws).squeeze(1)


class DeviceTranslation:
    """With probability p, replace a source-device log-mel by its translation to a random target.

    Translated clips take the target's device id, so per-device balancing and statistics treat them
    as recordings of that device. The translation model is frozen here.
    """

    def __init__(
        self,
        model: DeviceResponse | DeviceTranslator,
        devices: Sequence[str],
        targets: Sequence[str] | None = None,
        *,
        source: str | None = "a",
        p: float = 0.5,
    ) -> None:
        """``source=None``: the first device of ``devices`` that is not a target (TAU's "a": the
        model was fitted from the majority device's pairs, so every other paired device is a target)."""
        _check_probability("DeviceTranslation", p)
        self.model, self.p = model, p
        if source is not None:
            _source_index(devices, source, "DeviceTranslation")
        targets = list(targets) if targets is not None else [d for d in model.devices if d in devices]
        if not targets:
            raise ConfigError(
                f"DeviceTranslation: the translation model knows devices {', '.join(model.devices)} "
                f"but none of them is among the training devices ({', '.join(devices)}); "
                "fit it on this dataset's pairs"
            )
        for name in targets:
            if name not in model.devices or name not in devices:
                raise ConfigError(
                    f"DeviceTranslation: target device '{name}' must be both a training device and one "
                    f"the translation model was fitted for ({', '.join(model.devices)}); "
                    "drop it from the targets"
                )
        self.targets = targets
        if source is None:
            source = next((name for name in devices if name not in targets), None)
            if source is None:
                raise ConfigError("DeviceTranslation: every training device is a translation target, so none is "
                                  "the source; set augment.source_device")
        self.source_ids = _source_ids(devices, source, "DeviceTranslation")
        self._model_ids = torch.tensor([model.devices.index(name) for name in targets])
        self._vocab_ids = torch.tensor([list(devices).index(name) for name in targets])

    def __call__(self, x: Tensor, devices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rows = _pick_source_rows(devices, self.source_ids, self.p, generator)
        choice = torch.randint(len(self.targets), (devices.shape[0],), generator=generator)[rows]
        if rows.numel() == 0:
            return x, devices
        if isinstance(self.model, nn.Module):
            self.model.to(x.device).eval()
        with torch.no_grad():
            translated = self.model.translate(x[rows.to(x.device)], self._model_ids[choice], generator)
        x, devices = x.clone(), devices.clone()
        x[rows.to(x.device)] = translated.to(x.dtype)
        devices[rows.to(devices.device)] = self._vocab_ids[choice].to(devices)
        return x, devices


def load_impulse_responses(folder: str | PathLike[str], sample_rate: int) -> Tensor:
    """Every IR in ``folder`` at ``sample_rate``, unit energy, zero-padded to ``(n_irs, length)``.

    Unit energy (sum of squares 1) keeps the power of a broadband clip unchanged in expectation, so
    the augmentation changes colouration and not loudness. Peak normalisation would not: the MicIRP
    responses at peak 1 range from 0.6 to 2.3 in L2 norm, a 12 dB loudness spread.
    """
    root = Path(folder)
    fix = f"point the IR folder at a folder of impulse-response files ({', '.join(IR_EXTENSIONS)})"
    if not root.is_dir():
        raise AudioError(root, "impulse-response folder not found", fix)
    files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IR_EXTENSIONS)
    if not files:
        raise AudioError(root, "no impulse-response audio files in this folder", fix)
    responses = []
    for file in files:
        audio, _ = load_audio(file, sample_rate, mono=True)
        response = torch.from_numpy(audio)
        energy = response.square().sum()
        if not energy > 0:
            raise AudioError(file, "impulse response is silent", "remove it from the IR folder")
        responses.append(response / energy.sqrt())
    return nn.utils.rnn.pad_sequence(responses, batch_first=True)


class ImpulseResponseAugment:
    """Device impulse-response (DIR) convolution of source-device waveforms, with probability p.

    Each selected clip is convolved with one random IR (FFT convolution, batched) and cropped to its
    own length, i.e. the causal start of the full convolution, so the clip stays time-aligned up to
    the IR's onset delay (a few ms for MicIRP).
    """

    def __init__(self, irs: Tensor, devices: Sequence[str], *, source: str | None = "a", p: float = 0.6) -> None:
        """``source=None`` convolves clips of every device (collections without devices)."""
        _check_probability("ImpulseResponseAugment", p)
        if irs.dim() != 2 or irs.shape[0] == 0:
            raise ValueError(
                f"impulse responses must be (n_irs, length) with n_irs > 0; got {tuple(irs.shape)}"
            )
        self.irs, self.p = irs, p
        self.source_ids = _source_ids(devices, source, "ImpulseResponseAugment")

    @classmethod
    def from_folder(
        cls,
        folder: str | PathLike[str],
        sample_rate: int,
        devices: Sequence[str],
        *,
        source: str | None = "a",
        p: float = 0.6,
    ) -> ImpulseResponseAugment:
        return cls(load_impulse_responses(folder, sample_rate), devices, source=source, p=p)

    def __call__(self, x: Tensor, devices: Tensor, generator: torch.Generator) -> Tensor:
        rows = _pick_source_rows(devices, self.source_ids, self.p, generator)
        choice = torch.randint(self.irs.shape[0], (devices.shape[0],), generator=generator)[rows]
        if rows.numel() == 0:
            return x
        length = x.shape[-1]
        n_fft = next_fast_len(length + self.irs.shape[1] - 1, real=True)
        rows = rows.to(x.device)
        spectrum = torch.fft.rfft(x[rows], n_fft) * torch.fft.rfft(self.irs[choice].to(x), n_fft)
        out = x.clone()
        out[rows] = torch.fft.irfft(spectrum, n_fft)[:, :length].to(x.dtype)
        return out


def mix_frequency_statistics(x: Tensor, perm: Tensor, lam: Tensor, eps: float = 1e-6) -> Tensor:
    """Re-style each sample with a ``lam``-weighted mix of its own and ``x[perm]``'s per-frequency
    mean and std (over channel and time), the statistics that carry most device colouration."""
    mean = x.mean(dim=(1, 3), keepdim=True).detach()
    std = (x.var(dim=(1, 3), keepdim=True) + eps).sqrt().detach()
    lam = lam.to(x.device, x.dtype).view(-1, 1, 1, 1)
    mixed_mean = lam * mean + (1 - lam) * mean[perm]
    mixed_std = lam * std + (1 - lam) * std[perm]
    return (x - mean) / std * mixed_std + mixed_mean


class FreqMixStyle:
    """Freq-MixStyle: with probability p per batch, mix per-frequency statistics between samples
    (partner = random permutation, weights Beta(alpha, alpha) per sample)."""

    def __init__(self, p: float = 0.4, alpha: float = 0.3, eps: float = 1e-6) -> None:
        _check_probability("FreqMixStyle", p)
        if alpha <= 0:
            raise ConfigError(f"FreqMixStyle alpha={alpha} must be > 0")
        self.p, self.alpha, self.eps = p, alpha, eps

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if not bool(torch.rand((), generator=generator) < self.p):
            return x
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        lam = sample_beta(self.alpha, x.shape[0], generator)
        return mix_frequency_statistics(x, perm, lam, self.eps)
