"""Multi-module compression methods under 2-process DDP (torchrun, gloo, CPU).

QKD trains an auxiliary module (the teacher, DDP-wrapped by the trainer, trained only in
co-study) beside the student and its learned step sizes: after self-study → co-study → tutoring
both ranks must hold the same student, steps and teacher, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asc.config import RunConfig, load_config
from asc.train.checkpoint import load_checkpoint
from asc.train.loop import train_or_resume

# Runs one rank: compress_run as `asc compress` would, saving this rank's state when training ends.
RANK_SCRIPT = """
import sys
from pathlib import Path

import torch

from asc.compress.stage import compress_run
from asc.train.loop import Trainer

out, *overrides = sys.argv[1:]
finish = Trainer._finish


def finish_and_save(self, metrics):
    torch.save({"model": self.model.state_dict(), "step": self.step,
                "auxiliaries": {name: aux.module.state_dict() for name, aux in self.auxiliaries.items()}},
               Path(out).with_name(f"rank{self.ctx.rank}.pt"))
    return finish(self, metrics)


Trainer._finish = finish_and_save
compress_run(Path(out).with_name("student"), Path(out), ["qkd"], overrides, progress=False)
"""


@pytest.mark.slow
def test_qkd_two_process_ddp_ranks_finish_with_identical_student_steps_and_teacher(tmp_path: Path, tiny_overrides):
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=1)), student, progress=False)
    train_or_resume(load_config(RunConfig, None, [*tiny_overrides(epochs=1), "model.args.width=16"]), teacher,
                    progress=False)
    script, out = tmp_path / "rank.py", tmp_path / "qkd"
    script.write_text(RANK_SCRIPT)
    overrides = [*tiny_overrides(epochs=3), "optim.lr=0.01", "train.device=cpu", f"qkd.teacher={teacher}",
                 "qkd.self_study=0.34", "qkd.co_study=0.33", "qkd.teacher_lr=0.02"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(out), *overrides]
    result = subprocess.run(command, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]

    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["phases"]["qkd"] for h in history] == ["self-study", "co-study", "tutor"]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    for key in ("model", "auxiliaries"):
        a, b = ranks[0][key], ranks[1][key]
        flat_a = a if key == "model" else {f"{n}.{k}": v for n, s in a.items() for k, v in s.items()}
        flat_b = b if key == "model" else {f"{n}.{k}": v for n, s in b.items() for k, v in s.items()}
        assert flat_a.keys() == flat_b.keys()
        unequal = [name for name in flat_a if not torch.equal(flat_a[name], flat_b[name])]
        assert not unequal, f"ranks differ in {key}: {unequal[:5]}"
    steps = [name for name in ranks[0]["model"] if name.endswith("_quant.step")]
    assert steps and set(ranks[0]["auxiliaries"]) == {"qkd.teacher"}
    # the weight steps moved off their min-max start and the teacher trained (in co-study)
    start = load_checkpoint(student / "checkpoints" / "last.pt")["model"]
    for name in [n for n in steps if n.endswith("weight_quant.step")]:
        weight = start[name.removesuffix("_quant.step")]
        initial = (weight.abs().flatten(1).amax(1) / 127).reshape(ranks[0]["model"][name].shape)
        assert not torch.allclose(ranks[0]["model"][name], initial, rtol=1e-4, atol=0), name
    teacher_start = load_checkpoint(teacher / "checkpoints" / "last.pt")["model"]
    trained_teacher = ranks[0]["auxiliaries"]["qkd.teacher"]
    assert any(not torch.equal(trained_teacher[name], teacher_start[name]) for name in teacher_start
               if name.endswith("weight"))
    assert (out / "finalized.pt2").is_file()
