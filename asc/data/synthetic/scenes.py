"""Scene recipes and the rendering of one clean scene segment.

A recipe lists which sources a scene may contain, how likely each one is, and the range of every
parameter. Ranges of different scenes overlap on purpose (metro vs tram, street vs square, airport
vs mall), so the classes are separable only by combining long-term spectrum with temporal structure
(modulation, events), and never perfectly.

Segments of one location share its character: each location draws a point in every parameter range
and its segments scatter around that point (see :class:`ParamSampler`). Evaluation locations are
new, so a model must generalise across places, not only across segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from asc.data.synthetic.sources import GENERATORS, unit_rms

Range = tuple[float, float]

#: Standard deviation, in units of a parameter's range, of a segment around its location's value.
LOCATION_SPREAD = 0.2


@dataclass(frozen=True)
class Source:
    kind: str  # a key of GENERATORS
    presence: float  # probability that a segment contains the source
    ranges: dict[str, Range]  # generator parameters, plus "level" in dB relative to the bed


@dataclass(frozen=True)
class SceneRecipe:
    level_dbfs: Range  # RMS of the clean rendering
    rt60: Range  # reverberation time of the space, seconds
    wet_db: Range  # reverberant energy relative to the direct sound
    sources: tuple[Source, ...]  # the first one is the noise bed (level 0 dB)

    def keys(self) -> list[tuple[str, Range]]:
        """Every drawable parameter in a fixed order, so locations draw the same keys always."""
        keys = [("level_dbfs", self.level_dbfs), ("rt60", self.rt60), ("wet_db", self.wet_db)]
        for i, source in enumerate(self.sources):
            keys.append((f"{i}.present", (0.0, 1.0)))
            keys.extend((f"{i}.{name}", bounds) for name, bounds in source.ranges.items())
        return keys


def _src(kind: str, presence: float, **ranges: Range) -> Source:
    return Source(kind, presence, ranges)


def _bed(tilt: Range, wobble: Range, *bumps: tuple[Range, Range, float]) -> Source:
    ranges: dict[str, Range] = {"level": (0.0, 0.0), "tilt": tilt, "wobble": wobble}
    for j, (centre, gain, width) in enumerate(bumps):
        ranges.update({f"fc{j}": centre, f"gain{j}": gain, f"width{j}": (width, width)})
    return Source("bed", 1.0, ranges)


_STEPS = {"cadence": (1.6, 2.2), "walkers": (1, 4), "brightness": (300, 1500)}

SCENES: dict[str, SceneRecipe] = {
    "airport": SceneRecipe((-36, -28), (1.2, 2.5), (-6, 0), (
        _bed((-4.5, -2.5), (0.0, 0.15), ((200, 500), (3, 6), 1.5)),
        _src("babble", 1.0, level=(-6, 2), talkers=(8, 24), rate=(3, 5.5)),
        _src("hum", 0.8, level=(-16, -6), f0=(90, 140), harmonics=(3, 8), rolloff=(3, 8), drift=(0.0, 0.01)),
        _src("chime", 0.5, level=(-4, 6), rate=(0.05, 0.25), pitch=(400, 900)),
        _src("clicks", 0.6, level=(-14, -4), rate=(5, 20)),
        _src("steps", 0.5, level=(-12, -2), **_STEPS),
    )),
    "bus": SceneRecipe((-34, -24), (0.2, 0.5), (-14, -6), (
        _bed((-7, -5), (0.1, 0.3), ((60, 150), (4, 9), 1.0)),
        _src("hum", 1.0, level=(-6, 4), f0=(25, 60), harmonics=(4, 12), rolloff=(1, 4), drift=(0.03, 0.15)),
        _src("babble", 0.6, level=(-12, -2), talkers=(1, 4), rate=(3.5, 7)),
        _src("clicks", 0.8, level=(-12, -2), rate=(2, 10)),
        _src("thumps", 0.4, level=(-4, 6), rate=(0.05, 0.3)),
    )),
    "metro": SceneRecipe((-30, -22), (0.2, 0.6), (-14, -6), (
        _bed((-6, -4), (0.1, 0.3), ((100, 300), (4, 8), 1.5), ((1500, 3000), (0, 4), 1.0)),
        _src("hum", 0.8, level=(-10, -2), f0=(60, 120), harmonics=(3, 8), rolloff=(2, 6), drift=(0.01, 0.06)),
        _src("clacks", 0.9, level=(-4, 6), rate=(1, 3)),
        _src("squeal", 0.6, level=(-6, 4), rate=(0.05, 0.3), pitch=(1500, 4000)),
        _src("babble", 0.4, level=(-16, -6), talkers=(1, 4), rate=(3.5, 7)),
    )),
    "metro_station": SceneRecipe((-36, -26), (1.5, 3.0), (-4, 2), (
        _bed((-5, -3), (0.1, 0.3), ((150, 400), (2, 6), 1.5)),
        _src("passes", 0.7, level=(0, 8), rate=(0.1, 0.3), engine=(50, 100)),
        _src("squeal", 0.5, level=(-6, 4), rate=(0.05, 0.2), pitch=(1500, 4000)),
        _src("chime", 0.5, level=(-4, 4), rate=(0.05, 0.25), pitch=(400, 900)),
        _src("babble", 0.8, level=(-10, -2), talkers=(4, 12), rate=(3, 6)),
        _src("steps", 0.6, level=(-12, -2), **_STEPS),
    )),
    "park": SceneRecipe((-46, -36), (0.1, 0.4), (-20, -10), (
        _bed((-6, -3.5), (0.3, 0.7), ((50, 150), (2, 6), 1.5)),
        _src("birds", 0.85, level=(2, 12), rate=(0.3, 2), pitch=(2500, 6000)),
        _src("wind", 0.5, level=(-4, 4), gust=(0.2, 1.0), rustle=(300, 1500)),
        _src("babble", 0.3, level=(-18, -8), talkers=(1, 3), rate=(3, 6)),
        _src("steps", 0.3, level=(-18, -8), **_STEPS),
    )),
    "public_square": SceneRecipe((-40, -30), (0.3, 0.8), (-14, -6), (
        _bed((-4.5, -2.5), (0.1, 0.3), ((80, 200), (2, 5), 1.5), ((2000, 5000), (0, 4), 1.0)),
        _src("babble", 0.9, level=(-8, 0), talkers=(4, 14), rate=(3, 6)),
        _src("steps", 0.6, level=(-12, -2), **_STEPS),
        _src("passes", 0.4, level=(-6, 2), rate=(0.05, 0.2), engine=(30, 90)),
        _src("birds", 0.3, level=(-6, 4), rate=(0.2, 1), pitch=(2500, 6000)),
    )),
    "shopping_mall": SceneRecipe((-36, -28), (1.0, 2.0), (-6, 0), (
        _bed((-4, -2), (0.0, 0.15), ((300, 800), (3, 6), 1.5)),
        _src("babble", 1.0, level=(-4, 3), talkers=(10, 30), rate=(3, 5.5)),
        _src("music", 0.7, level=(-10, -2), tempo=(1, 3), pitch=(200, 800)),
        _src("hum", 0.6, level=(-16, -8), f0=(100, 250), harmonics=(2, 5), rolloff=(3, 8), drift=(0.0, 0.01)),
        _src("steps", 0.5, level=(-14, -4), **_STEPS),
        _src("chime", 0.3, level=(-6, 2), rate=(0.05, 0.2), pitch=(400, 900)),
    )),
    "street_pedestrian": SceneRecipe((-38, -28), (0.3, 0.8), (-14, -6), (
        _bed((-5, -3), (0.1, 0.3), ((70, 200), (3, 6), 1.5)),
        _src("babble", 0.9, level=(-6, 2), talkers=(2, 8), rate=(3.5, 7)),
        _src("steps", 0.9, level=(-8, 2), **_STEPS),
        _src("passes", 0.5, level=(-4, 4), rate=(0.05, 0.2), engine=(30, 90)),
        _src("clicks", 0.3, level=(-14, -4), rate=(1, 5)),
        _src("birds", 0.2, level=(-6, 4), rate=(0.2, 1), pitch=(2500, 6000)),
        _src("horn", 0.15, level=(-4, 4), rate=(0.05, 0.2), pitch=(300, 500)),
    )),
    "street_traffic": SceneRecipe((-32, -22), (0.2, 0.6), (-16, -8), (
        _bed((-6.5, -4.5), (0.2, 0.4), ((60, 150), (4, 8), 1.0), ((800, 2000), (1, 4), 1.0)),
        _src("passes", 1.0, level=(2, 10), rate=(0.2, 0.8), engine=(30, 90)),
        _src("hum", 0.6, level=(-10, 0), f0=(25, 50), harmonics=(4, 10), rolloff=(1, 4), drift=(0.02, 0.1)),
        _src("horn", 0.4, level=(0, 8), rate=(0.03, 0.2), pitch=(300, 500)),
        _src("babble", 0.3, level=(-16, -6), talkers=(1, 3), rate=(3.5, 7)),
        _src("steps", 0.3, level=(-14, -4), **_STEPS),
    )),
    "tram": SceneRecipe((-32, -24), (0.2, 0.5), (-14, -6), (
        _bed((-5.5, -3.5), (0.1, 0.3), ((100, 250), (3, 7), 1.5)),
        _src("whine", 0.9, level=(-8, 2), f0=(150, 500), sweep=(0.6, 1.6)),
        _src("clacks", 0.8, level=(-6, 4), rate=(0.7, 2.5)),
        _src("squeal", 0.5, level=(-6, 4), rate=(0.05, 0.3), pitch=(1500, 4000)),
        _src("babble", 0.6, level=(-12, -2), talkers=(1, 5), rate=(3.5, 7)),
        _src("chime", 0.3, level=(-6, 2), rate=(0.05, 0.2), pitch=(600, 1200)),
    )),
}


class ParamSampler:
    """Draws a segment's parameters near its location's point in each range."""

    def __init__(
        self, recipe: SceneRecipe, location_rng: np.random.Generator, rng: np.random.Generator
    ) -> None:
        self._units = {key: location_rng.random() for key, _ in recipe.keys()}
        self._rng = rng

    def unit(self, key: str) -> float:
        return float(np.clip(self._units[key] + self._rng.normal(0, LOCATION_SPREAD), 0, 1))

    def present(self, key: str, presence: float) -> bool:
        """Whether a source sounds; certain sources (presence 1) always do."""
        return presence >= 1 or self.unit(key) < presence

    def value(self, key: str, bounds: Range) -> float:
        return bounds[0] + self.unit(key) * (bounds[1] - bounds[0])


def render_scene(
    scene: str, n: int, sr: int, location_rng: np.random.Generator, rng: np.random.Generator
) -> np.ndarray:
    """One clean segment of ``scene``, ``n`` samples long, at the recipe's level in dBFS."""
    recipe = SCENES[scene]
    sampler = ParamSampler(recipe, location_rng, rng)
    mix = np.zeros(n)
    for i, source in enumerate(recipe.sources):
        if not sampler.present(f"{i}.present", source.presence):
            continue
        params = {name: sampler.value(f"{i}.{name}", bounds) for name, bounds in source.ranges.items()}
        level_db = params.pop("level")
        mix += 10 ** (level_db / 20) * GENERATORS[source.kind](rng, n, sr, params)
    rt60 = sampler.value("rt60", recipe.rt60)
    mix = reverberate(rng, mix, sr, rt60, sampler.value("wet_db", recipe.wet_db))
    return unit_rms(mix) * 10 ** (sampler.value("level_dbfs", recipe.level_dbfs) / 20)


def reverberate(
    rng: np.random.Generator, x: np.ndarray, sr: int, rt60: float, wet_db: float
) -> np.ndarray:
    """Add a diffuse tail (exponentially decaying noise) that smears events like a real room."""
    m = int(min(rt60, 2.0) * sr)
    t = np.arange(m) / sr
    tail = rng.standard_normal(m) * np.exp(-6.9 * t / rt60)
    wet = fftconvolve(x, tail)[: x.size]
    return x + 10 ** (wet_db / 20) * unit_rms(wet) * np.sqrt(np.mean(x**2))
