"""User-facing errors.

Every problem a user can fix (a missing file, a corrupt WAV, a malformed CSV) is raised as an
:class:`AscError`. The CLI prints it as a single line and exits with status 2, so the message must
name the offending file and say what to do about it.
"""

from __future__ import annotations

from os import PathLike


class AscError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class _PathError(AscError):
    def __init__(self, path: str | PathLike[str], problem: str, fix: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        message = f"{self.path}: {problem}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class AudioError(_PathError):
    """An audio file that cannot be used: missing, empty, corrupt, not audio, or non-finite."""


class DatasetError(_PathError):
    """A dataset folder or table that is missing pieces or is malformed."""


class ConfigError(AscError):
    """A configuration value or override that cannot be applied."""
