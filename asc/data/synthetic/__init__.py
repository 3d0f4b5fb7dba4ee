"""Synthetic multi-device acoustic scenes in the TAU Urban Acoustic Scenes 2020 Mobile layout (or,
with ``segment_seconds``, the 2022 Mobile layout of 1-s files plus the DCASE 2024 training subsets).

Ten scene classes built from overlapping mixtures of sources (noise beds, hums, babble, events,
chirps, passing vehicles), each segment recorded in parallel by nine simulated devices (a, b, c,
s1-s6; s4-s6 only in the evaluation split). It is the default dataset of the recipes and tests, and
it exhibits the device shift that frequency-wise normalisation (ResNorm, RFN) is meant to remove.
See docs/synthetic.md.
"""

from __future__ import annotations

from asc.data.synthetic.config import PRESETS, SynthConfig
from asc.data.synthetic.corpus import SynthSummary, synthesize

__all__ = ["PRESETS", "SynthConfig", "SynthSummary", "synthesize"]
