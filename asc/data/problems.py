"""Findings of a dataset check, and the audio probe every dataset format shares.

A check collects every problem instead of stopping at the first, so one ``asc data check`` run
lists everything to fix; each finding is one line naming the file and the fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from asc.audio import load_audio, probe_audio
from asc.errors import AudioError, DatasetError

Severity = Literal["error", "warning"]
MAX_AUDIO_PROBLEMS = 20  #: unreadable files reported one by one before summarising


@dataclass(frozen=True)
class Problem:
    """One finding of a dataset check; errors make the dataset unreadable, warnings do not."""

    path: Path
    message: str
    severity: Severity = "error"
    fix: str | None = None

    def __str__(self) -> str:
        text = f"{self.severity}: {self.path}: {self.message}"
        return f"{text}; {self.fix}" if self.fix else text

    def to_error(self) -> DatasetError:
        return DatasetError(self.path, self.message, self.fix)

    @classmethod
    def from_error(cls, error: DatasetError) -> Problem:
        return cls(Path(error.path), error.problem, "error", error.fix)


def probe_files(paths: Sequence[Path], where: Path, *, decode: bool = False, progress: bool = False) -> list[Problem]:
    """Unreadable files (header probe, or a full decode with ``decode=True``) and mixed sample rates.

    Mixed rates and channel counts are only a warning: clips are resampled to the front end's rate
    and averaged to mono when they are loaded.
    """
    rates: Counter[int] = Counter()
    channels: Counter[int] = Counter()
    unreadable: list[Problem] = []
    bar = tqdm(paths, desc="checking audio", unit="file", leave=False, disable=not progress or not paths)
    for path in bar:
        try:
            info = probe_audio(path)
            rates[info.sample_rate] += 1
            channels[info.channels] += 1
            if decode:
                load_audio(path)
        except AudioError as error:
            unreadable.append(Problem(path, error.problem, "error", error.fix or "replace the file"))
    problems = unreadable[:MAX_AUDIO_PROBLEMS]
    if len(unreadable) > MAX_AUDIO_PROBLEMS:
        message = f"{len(unreadable) - MAX_AUDIO_PROBLEMS} more unreadable audio files"
        problems.append(Problem(where, message, "error", "re-download or replace them"))
    if len(rates) > 1:
        counts = ", ".join(f"{rate} Hz ({count} files)" for rate, count in sorted(rates.items()))
        problems.append(Problem(where, f"mixed sample rates: {counts}", "warning", "they are resampled when loaded"))
    if len(channels) > 1:
        counts = ", ".join(f"{n} channel(s) ({count} files)" for n, count in sorted(channels.items()))
        problems.append(Problem(where, f"mixed channel counts: {counts}", "warning",
                                "they are averaged to mono when loaded"))
    return problems
