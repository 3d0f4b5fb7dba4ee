"""The training loop on a tiny synthetic corpus: run folder, hooks, resume after a kill, DDP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ddp_run import run_two_ranks

from asc.cli import main
from asc.config import RunConfig, load_config
from asc.errors import AscError
from asc.train.checkpoint import load_checkpoint, load_finalized
from asc.train.evaluate import evaluate_run
from asc.train.hooks import TrainHook
from asc.train.loop import Trainer, warmup_cosine


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


def test_unreadable_model_files_are_one_line_without_unsafe_advice(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    garbage = tmp_path / "last.pt"
    garbage.write_bytes(b"garbage bytes, not a checkpoint")
    with pytest.raises(AscError) as info:
        load_checkpoint(garbage)
    assert str(info.value) == (f"{garbage}: not a readable asc checkpoint (not a torch file, or one holding more than "
                               "tensors and plain values); re-run training or restore the file")  # no weights_only=False
    archive = tmp_path / "finalized.pt2"
    archive.write_bytes(b"garbage bytes, not an archive")
    with caplog.at_level(logging.WARNING), pytest.raises(AscError, match="finalized.pt2: not a readable finalized"):
        load_finalized(archive)
    assert [record.getMessage() for record in caplog.records if record.name.startswith("torch")] == []


def test_warmup_cosine_schedule():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0)


def test_train_writes_a_complete_run_folder(workspace: Path, tiny_overrides):
    run = workspace / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_overrides()]) == 0
    for name in ("config.yaml", "metrics.jsonl", "report.json", "report.md", "confusion.png", "per_device.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["lr"] == pytest.approx(0.0)
    report = json.loads((run / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["n"] == 90 and set(metrics["per_group"]) == {"real", "seen", "unseen"}
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["log_loss"] > 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["labels"][0] == "airport"
    # evaluating the run again gives the numbers the loop reported
    again = evaluate_run(run, progress=False)
    assert again.accuracy == pytest.approx(metrics["accuracy"])
    assert again.log_loss == pytest.approx(metrics["log_loss"], rel=1e-5)


def test_evaluate_on_a_real_partial_tau_folder(workspace: Path, tau_fixtures: Path, capsys):
    root = tau_fixtures / "tau2020uas_mobile" / "TAU-urban-acoustic-scenes-2020-mobile-development"
    assert main(["evaluate", str(workspace / "run"), "--data", str(root), "--split", "train", "--quiet"]) == 2
    assert "data.missing_audio=skip" in capsys.readouterr().err
    metrics = evaluate_run(workspace / "run", data_root=root, split="train", skip_missing=True, progress=False)
    assert metrics.n == 1 and list(metrics.per_device) == ["a"]
    assert 0 < metrics.log_loss < 10


def test_existing_run_is_not_overwritten(workspace: Path, tiny_overrides, capsys: pytest.CaptureFixture[str]):
    run = workspace / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_overrides()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resume" in err and str(run) in err


def test_bad_override_is_a_one_line_error(workspace: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["train", "--out", str(workspace / "bad"), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "asc: error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"


class RecordingHook(TrainHook):
    """Counts hook calls and adds a strong weight penalty through ``extra_losses``."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def setup(self, trainer):
        self._count("setup")

    def wrap_model(self, model):
        self._count("wrap_model")
        return model

    def on_epoch_start(self, trainer, epoch):
        self._count("on_epoch_start")

    def output_keys(self):
        return frozenset({"logits", "features"})

    def forward(self, trainer, model, x):
        self._count("forward")
        return {"logits": model(x), "features": x}

    def extra_losses(self, trainer, outputs, targets):
        self._count("extra_losses")
        assert "features" in outputs
        weights = torch.cat([p.flatten() for p in trainer.model.parameters()])
        return {"l2": self.penalty * weights.pow(2).sum()}

    def after_backward(self, trainer):
        self._count("after_backward")

    def after_step(self, trainer):
        self._count("after_step")

    def eval_forward(self, trainer, model, x):
        self._count("eval_forward")
        return None

    def finalize(self, model):
        self._count("finalize")
        return model


def test_hooks_are_called_and_their_losses_train(workspace: Path, tiny_overrides):
    norms = {}
    for penalty in (0.0, 0.05):
        config = load_config(RunConfig, None, tiny_overrides())
        hook = RecordingHook(penalty)
        trainer = Trainer(config, workspace / f"hooked-{penalty}", hooks=[hook], progress=False)
        trainer.fit()
        assert trainer.finalized_model() is trainer.model
        steps = trainer.step
        assert steps == 2 * trainer.steps_per_epoch
        assert hook.calls["setup"] == hook.calls["wrap_model"] == hook.calls["finalize"] == 1
        assert hook.calls["on_epoch_start"] == 2
        assert hook.calls["forward"] == hook.calls["extra_losses"] == hook.calls["after_step"] == steps
        assert hook.calls["eval_forward"] > 0
        norms[penalty] = torch.cat([p.flatten() for p in trainer.model.parameters()]).norm().item()
    assert norms[0.05] < 0.8 * norms[0.0]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "asc", *args]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(workspace: Path, tiny_overrides):
    overrides = tiny_overrides(epochs=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # warm the corpus and caches so that the killed process spends its time training
    subprocess.run(_cli("train", "--quiet", "--out", str(workspace / "straight"), *overrides), env=env,
                   check=True, timeout=600)
    killed = workspace / "killed"
    process = subprocess.Popen(_cli("train", "--quiet", "--out", str(killed), *overrides), env=env)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "report.json").exists()
    done = load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"]
    assert 2 <= done < 5
    subprocess.run(_cli("train", "--quiet", "--resume", str(killed)), env=env, check=True, timeout=600)

    resumed = json.loads((killed / "report.json").read_text())
    straight = json.loads((workspace / "straight" / "report.json").read_text())
    assert resumed["parameter_digests"] == straight["parameter_digests"]
    assert resumed["metrics"]["accuracy"] == straight["metrics"]["accuracy"]
    assert resumed["metrics"]["log_loss"] == pytest.approx(straight["metrics"]["log_loss"], abs=1e-9)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in straight["history"]], abs=1e-9)


@pytest.mark.slow
def test_two_process_ddp_ranks_finish_with_identical_weights(workspace: Path, tiny_overrides):
    run = workspace / "ddp"
    run_two_ranks("-m", "asc", "train", "--quiet", "--out", run, *tiny_overrides(epochs=2), "train.device=cpu")
    report = json.loads((run / "report.json").read_text())
    assert report["world_size"] == 2
    digests = report["parameter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # each rank saw half of the data: half the optimizer steps of a single-process run per epoch
    single = load_checkpoint(workspace / "run" / "checkpoints" / "last.pt")["step"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == single // 2


def test_translation_is_fitted_from_waveforms_when_features_are_not_cached(workspace: Path, tiny_overrides):
    config = load_config(RunConfig, None, [*tiny_overrides(epochs=1), "augment.translation=response",
                                           "augment.roll_seconds=0.1"])
    trainer = Trainer(config, workspace / "wave-translation", progress=False)
    trainer.fit()
    assert not trainer.data.features_cached
    response = torch.load(workspace / "wave-translation" / "translation.pt", weights_only=True)
    assert sorted(response["devices"]) == ["b", "c", "s1", "s2", "s3"]
    assert response["delta"].shape == (5, 32) and torch.isfinite(response["delta"]).all()
