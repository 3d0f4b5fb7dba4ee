"""Independent random streams derived from one corpus seed.

Every random decision draws from a stream named by what it is for and which item it concerns, so a
segment renders identically whichever worker process handles it and in whatever order.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    PLAN = 0  # split planning: cities, paired devices
    DEVICE = 1  # fixed parameters of one device
    IMPULSE_RESPONSE = 2  # which measured response each device uses
    LOCATION = 3  # the character shared by all segments of one location
    SEGMENT = 4  # one clean scene rendering
    RECORDING = 5  # one device's recording of one segment
    SUBSET = 6  # the order in which a (scene, device) stratum's recordings join the training subsets


def stream_rng(seed: int, stream: Stream, *ids: int) -> np.random.Generator:
    """A generator for ``(stream, *ids)`` that does not depend on any other draw."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(stream), *ids)))
