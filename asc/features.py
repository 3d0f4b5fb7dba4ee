"""The log-mel front end: one ``nn.Module`` shared by training, evaluation, export and the runtime.

Tensor convention for the whole toolkit: **(batch, channel, frequency, time)**. The front end
maps a waveform batch ``(batch, samples)`` to ``(batch, 1, n_mels, frames)``; every later stage
keeps that layout.

The computation is pinned to ``librosa.feature.melspectrogram`` followed by ``log(x + log_eps)``
(tests hold it to a relative error of 1e-4), so features computed offline with librosa, in torch
during training, and on a phone from ``docs/frontend.md`` are interchangeable.
"""

from __future__ import annotations

import torch
from torch import nn

from asc.feature_spec import FeatureConfig, analysis_window, mel_filterbank

__all__ = ["FeatureConfig", "LogMel", "analysis_window", "mel_filterbank"]


class LogMel(nn.Module):
    """Waveforms ``(batch, samples)`` to log-mel ``(batch, 1, n_mels, frames)``, float32.

    Window and filterbank are non-persistent buffers: they follow ``.to(device)`` but stay out of
    checkpoints, because the config alone determines them. Run it outside autocast (and without
    TF32 matmuls) to keep the 1e-4 parity: the filterbank product is the precision-critical step.
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        super().__init__()
        self.config = config or FeatureConfig()
        window = torch.from_numpy(analysis_window(self.config)).float()
        filterbank = torch.from_numpy(mel_filterbank(self.config)).float()
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("filterbank", filterbank, persistent=False)
        # Settings fixed at construction, so forward has no data-dependent branches to export.
        self._half_power = self.config.power / 2
        self._normalise = (self.config.norm_mean, self.config.norm_std) != (0.0, 1.0)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2:
            raise ValueError(f"LogMel expects (batch, samples), got shape {tuple(waveform.shape)}")
        cfg = self.config
        spectrum = torch.stft(
            waveform.to(self.window.dtype),
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            window=self.window,
            center=cfg.center,
            pad_mode=cfg.pad_mode,
            return_complex=True,
        )
        power = spectrum.real.square() + spectrum.imag.square()
        if self._half_power != 1.0:
            power = power.pow(self._half_power)
        log_mel = torch.log(torch.matmul(self.filterbank, power) + cfg.log_eps)
        if self._normalise:
            log_mel = (log_mel - cfg.norm_mean) / cfg.norm_std
        return log_mel.unsqueeze(1)
