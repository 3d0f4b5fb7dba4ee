"""Run a test's script as 2 DDP ranks (torchrun, gloo, CPU) and compare what the ranks hold at the end.

Shared by the DDP tests of the trainer and of the compression methods (test_train, test_afd, test_ffl,
test_dcil, test_ddp_methods, test_ppp), so the torchrun command, the per-rank state-saving driver and
the rank-equality check are written once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from compress_resume import flatten

REPO = Path(__file__).parents[1]

# Runs one rank: compress_run as `asc compress` would, saving this rank's state when training ends.
RANK_SCRIPT = """
import sys
from pathlib import Path

import torch

from asc.compress.stage import compress_run
from asc.train.loop import Trainer

source, out, saved, methods, *overrides = sys.argv[1:]
finish = Trainer._finish


def finish_and_save(self, metrics):
    torch.save({"model": self.model.state_dict(), "step": self.step,
                "auxiliaries": {name: aux.module.state_dict() for name, aux in self.auxiliaries.items()},
                "hooks": [hook.state_dict() for hook in self.hooks]},
               f"{saved}{self.ctx.rank}.pt")
    return finish(self, metrics)


Trainer._finish = finish_and_save
compress_run(Path(source), Path(out), methods.split(","), overrides, progress=False)
"""


def run_two_ranks(*args: str | Path) -> None:
    """Run ``args`` (a script and its arguments, or ``-m module ...``) as 2 ranks; both must exit 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *map(str, args)]
    result = subprocess.run(command, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]


def compress_on_two_ranks(source: Path, out: Path, methods: list[str], overrides: list[str]) -> list[dict[str, Any]]:
    """Compress ``source`` into ``out`` on 2 ranks; each rank's model, step, auxiliaries and hooks at the end."""
    script, saved = out.with_name(f"{out.name}-rank.py"), out.with_name(f"{out.name}-rank")
    script.write_text(RANK_SCRIPT)
    run_two_ranks(script, source, out, saved, ",".join(methods), *overrides)
    return [torch.load(f"{saved}{rank}.pt", weights_only=True) for rank in (0, 1)]


def assert_ranks_equal(ranks: list[dict[str, Any]], *auxiliaries: str) -> None:
    """Both ranks took the same steps and hold the same model and auxiliaries (exactly ``auxiliaries``), bit for bit."""
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    assert set(ranks[0]["auxiliaries"]) == set(ranks[1]["auxiliaries"]) == set(auxiliaries)
    for key in ("model", "auxiliaries"):
        a, b = flatten(ranks[0][key]), flatten(ranks[1][key])
        assert a.keys() == b.keys()
        unequal = [name for name in a if not torch.equal(a[name], b[name])]
        assert not unequal, f"ranks differ in {key}: {unequal[:5]}"
