"""Multi-module compression methods under 2-process DDP (torchrun, gloo, CPU).

QKD trains an auxiliary module (the teacher, DDP-wrapped by the trainer, trained only in
co-study) beside the student and its learned step sizes: after self-study → co-study → tutoring
both ranks must hold the same student, steps and teacher, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ddp_run import assert_ranks_equal, compress_on_two_ranks

from asc.config import RunConfig, load_config
from asc.train.checkpoint import load_checkpoint
from asc.train.loop import train_or_resume


@pytest.mark.slow
def test_qkd_two_process_ddp_ranks_finish_with_identical_student_steps_and_teacher(tmp_path: Path, tiny_overrides):
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=1)), student, progress=False)
    train_or_resume(load_config(RunConfig, None, [*tiny_overrides(epochs=1), "model.args.width=16"]), teacher,
                    progress=False)
    out = tmp_path / "qkd"
    overrides = [*tiny_overrides(epochs=3), "optim.lr=0.01", "train.device=cpu", f"qkd.teacher={teacher}",
                 "qkd.self_study=0.34", "qkd.co_study=0.33", "qkd.teacher_lr=0.02"]
    ranks = compress_on_two_ranks(student, out, ["qkd"], overrides)

    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["phases"]["qkd"] for h in history] == ["self-study", "co-study", "tutor"]
    assert_ranks_equal(ranks, "qkd.teacher")
    steps = [name for name in ranks[0]["model"] if name.endswith("_quant.step")]
    assert steps
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
