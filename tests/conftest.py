"""Shared test fixtures: paths to the real data beside the checkout and small synthetic corpora."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("ASC_SHARED", REPO.parent / "shared"))

_VERSIONS = ("torch", "torchao", "onnxruntime", "onnx", "numpy", "scipy", "librosa", "soundfile", "torch-pruning")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Print the versions and the CPU a run was made with (int8 numerics and speed depend on both),
    also under ``-q``, which hides pytest's own header."""
    for line in _environment():
        session.config.get_terminal_writer().line(line)


def _environment() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} missing"

    from asc.bench import cpu_line

    return [", ".join(installed(name) for name in _VERSIONS), f"cpu: {cpu_line()}"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (real TAU fixtures and microphone impulse responses)."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set ASC_SHARED to the folder holding data/")
    return path


@pytest.fixture(scope="session")
def tiny_overrides(tmp_path_factory: pytest.TempPathFactory):
    """``key=value`` settings of a run that trains in seconds on the tiny synthetic corpus.

    1-s 16 kHz clips, 32 mels and an 8-wide BC-ResNet-Mod; the corpus and its caches are shared
    by every test of the session.
    """
    shared = tmp_path_factory.mktemp("tiny-corpus")

    def overrides(epochs: int = 2) -> list[str]:
        return [
            "data.synth_preset=tiny", f"data.synth_dir={shared / 'corpus'}", f"data.cache_dir={shared / 'cache'}",
            "features.sample_rate=16000", "features.n_fft=512", "features.hop_length=256", "features.n_mels=32",
            "model.args.width=8", f"train.epochs={epochs}", "train.batch_size=8", "optim.lr=0.05",
            "optim.warmup_epochs=0.5",
        ]

    return overrides


@pytest.fixture(scope="session")
def tau_fixtures(shared_data: Path) -> Path:
    return shared_data / "tau_fixtures"


@pytest.fixture(scope="session")
def micirp_dir(shared_data: Path) -> Path:
    return shared_data / "irs" / "micirp"


# What a machine without torch looks like to an import: any attempt to import torch or a library
# built on it fails with ImportError.
_NO_TORCH = (
    "import sys\n"
    "BLOCKED = []\n"  # every import of torch tried, even one guarded by `except ImportError`
    "class NoTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'torchao', 'torch_pruning'):\n"
    "            BLOCKED.append(name)\n"
    "            raise ImportError(name + ' is blocked')\n"
    "sys.meta_path.insert(0, NoTorch())\n"
)


@pytest.fixture(scope="session")
def without_torch():
    """Run Python source (with ``sys.argv`` extras) in a fresh interpreter where torch cannot be imported.

    Deployment machines have onnxruntime, numpy and soundfile but no torch; the torch-free
    modules prove it this way. The script's global ``BLOCKED`` lists every torch import that was
    tried, also one a module guards with ``except ImportError``. Returns the completed process
    (stdout, stderr, returncode).
    """

    def run(code: str, *args: object) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        return subprocess.run([sys.executable, "-c", _NO_TORCH + code, *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=120, check=False)

    return run
