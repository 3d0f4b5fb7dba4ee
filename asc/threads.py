"""How torch's worker threads wait: sleeping, not spinning, unless the user chose otherwise."""

from __future__ import annotations

import os


def prefer_sleeping_openmp_waits() -> None:
    """Let torch's idle OpenMP threads sleep instead of spin, unless ``OMP_WAIT_POLICY`` is set.

    When another process wants the same cores (a second job, CI neighbours, a browser), spinning
    and preempted threads stall each other: one training step of the quick model took 2.9 s
    instead of 0.4 s on a loaded 2-core machine, and the whole main job 13.0 instead of 4.5 min
    (benchmarks/main_job.py). OpenMP reads the variable once, when torch starts its runtime, so
    entry points (the ``asc`` command, recipe scripts) call this before anything imports torch.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
