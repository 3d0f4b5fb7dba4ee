"""Shared test fixtures: paths to the real data beside the checkout and small synthetic corpora."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("ASC_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (real TAU fixtures and microphone impulse responses)."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set ASC_SHARED to the folder holding data/")
    return path


@pytest.fixture(scope="session")
def tau_fixtures(shared_data: Path) -> Path:
    return shared_data / "tau_fixtures"


@pytest.fixture(scope="session")
def micirp_dir(shared_data: Path) -> Path:
    return shared_data / "irs" / "micirp"
