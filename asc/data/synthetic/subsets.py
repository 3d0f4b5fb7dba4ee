"""The DCASE 2024 data-efficiency subsets (``split5.csv`` … ``split100.csv``) of a training split.

Chosen like the official ones: whole recordings (every 1-s file cut from one device's recording of
a segment goes in or out together, so a subset never holds half a recording), stratified by scene
and device (each stratum keeps its share), and nested (split5 ⊂ split10 ⊂ … ⊂ split100). Nesting
comes from one seeded order per stratum: a subset of p % takes the first ``round(p/100 · n)``
recordings of that order (halves round down, but at least one, so every subset has every scene on
every device), so a larger percentage only appends recordings. On a small corpus the "at least one"
makes the small subsets larger than their percentage; on TAU-sized strata it never applies.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from asc.data.clips import TAU_SCENES
from asc.data.synthetic.devices import ALL_DEVICES
from asc.data.synthetic.rng import Stream, stream_rng


def subset_size(percent: float, recordings: int) -> int:
    """Recordings of a stratum of ``recordings`` that a ``percent`` % subset keeps."""
    if percent >= 100 or recordings == 0:
        return recordings
    return max(1, math.floor(percent / 100 * recordings + 0.5 - 1e-9))


def choose_subsets(recordings: Sequence[tuple[str, str, str]], percents: Sequence[int],
                   seed: int) -> dict[int, set[str]]:
    """``{percent: recording ids}`` for ``recordings`` given as ``(recording id, scene, device)``."""
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for recording, scene, device in recordings:
        strata[scene, device].append(recording)
    order: dict[tuple[str, str], list[str]] = {}
    for (scene, device), members in strata.items():
        rng = stream_rng(seed, Stream.SUBSET, TAU_SCENES.index(scene), ALL_DEVICES.index(device))
        members = sorted(set(members))
        order[scene, device] = [members[i] for i in rng.permutation(len(members))]
    return {percent: {r for members in order.values() for r in members[:subset_size(percent, len(members))]}
            for percent in percents}
