"""`asc export`, `asc classify` and `asc bench` from the command line, on a real tiny run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from asc.audio import write_audio
from asc.cli import main
from asc.config import RunConfig, load_config
from asc.run_files import DIGEST_KEY, file_digest
from asc.train.checkpoint import load_checkpoint, save_checkpoint
from asc.train.loop import train_or_resume


@pytest.fixture(scope="module")
def run(tiny_overrides, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("deploy") / "run"
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=1)), folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    """Two readable recordings at other rates and channel counts, and a file that is not audio."""
    folder = tmp_path_factory.mktemp("recordings")
    rng = np.random.default_rng(0)
    write_audio(folder / "long-48k-stereo.wav", 0.1 * rng.standard_normal((2, 3 * 48000)).astype(np.float32), 48000)
    write_audio(folder / "short-8k.wav", 0.1 * rng.standard_normal(4000).astype(np.float32), 8000)
    (folder / "notes.wav").write_text("not audio")
    return folder


@pytest.mark.slow
def test_classify_a_run_exports_once_and_reports_bad_files(run: Path, recordings: Path, capsys):
    assert main(["classify", str(run), str(recordings), "--format", "json", "-q"]) == 1
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [Path(row["file"]).name for row in rows] == ["long-48k-stereo.wav", "short-8k.wav", "notes.wav"]
    assert "not a readable audio file" in rows.pop()["error"]  # the failed file is in the output too
    for row in rows:  # the answer is the most likely label, and the top-k list is ranked
        probabilities = [p["probability"] for p in row["top_k"]]
        assert row["label"] == row["top_k"][0]["label"] and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    assert rows[0]["duration"] == pytest.approx(3.0)
    errors = [line for line in captured.err.splitlines() if line.startswith("asc: error:")]
    assert len(errors) == 1 and "notes.wav" in errors[0]
    assert "exporting" in captured.err and (run / "bundle" / "bundle.json").is_file()
    assert main(["classify", str(run), str(recordings / "short-8k.wav"), "-q"]) == 0
    assert "exporting" not in capsys.readouterr().err  # the bundle is reused
    checkpoint = run / "checkpoints" / "last.pt"
    exported = json.loads((run / "bundle" / "bundle.json").read_text())["source"][DIGEST_KEY]
    assert exported == file_digest(checkpoint)  # the export recorded what it read
    os.utime(checkpoint)  # a newer file time with the same bytes: the bundle still holds the run's model
    assert main(["classify", str(run), str(recordings / "short-8k.wav"), "-q"]) == 0
    assert "exporting" not in capsys.readouterr().err
    state = load_checkpoint(checkpoint)
    save_checkpoint({**state, "epoch": state["epoch"] + 1}, checkpoint)  # the run trained further: stale
    assert main(["classify", str(run), str(recordings / "short-8k.wav"), "-q"]) == 0
    assert "its digest changed since the export" in capsys.readouterr().err
    assert json.loads((run / "bundle" / "bundle.json").read_text())["source"][DIGEST_KEY] == file_digest(checkpoint)


@pytest.mark.slow
def test_export_then_bench_a_bundle(run: Path, tmp_path: Path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["export", str(run), "--out", str(bundle), "--parity-clips", "16", "-q"]) == 0
    assert "top-1 agreement with torch 100.00%" in capsys.readouterr().out
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["precision"] == "fp32" and not manifest["frontend_in_graph"]
    assert main(["bench", str(bundle), "--threads", "1", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "load model.onnx" in printed and "load model.ort" in printed


@pytest.mark.slow
def test_export_precision_auto_records_its_decision(run: Path, tmp_path: Path, capsys):
    bundle = tmp_path / "auto"
    assert main(["export", str(run), "--out", str(bundle), "--precision", "auto", "--parity-clips", "24",
                 "--calibration-clips", "8", "-q"]) == 0
    manifest = json.loads((bundle / "bundle.json").read_text())
    decision = manifest["source"]["precision_decision"]
    assert decision["requested"] == "auto" and decision["clips"] == 24
    assert manifest["precision"] == decision["chosen"] == ("int8" if decision["int8_top1_agreement"] >= 0.99 else "fp32")
    assert manifest["source"]["int8_search"] is not None  # the eval clips outside the parity sample were searched
    err = capsys.readouterr().err
    assert (f"asc export: {decision['reason']}" in err) == (decision["chosen"] == "fp32")
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--int8", "--precision", "fp32"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--int8 and --precision fp32 contradict" in error[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_evaluate_a_bundle_through_the_runtime_matches_its_export_parity(run: Path, tmp_path: Path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["export", str(run), "--out", str(bundle), "--parity-clips", "100000", "-q"]) == 0
    at_export = json.loads((bundle / "bundle.json").read_text())["metrics"]["accuracy"]["accuracy"]
    data = load_config(RunConfig, run / "config.yaml").data.synth_dir
    assert main(["evaluate", str(bundle), "--data", str(data), "-q"]) == 0
    report = json.loads((tmp_path / "bundle-eval-evaluate" / "report.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(at_export, abs=1.5 / report["metrics"]["n"])
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "frontend.npz", "model.onnx", "model.onnx.xz",
                                                         "model.ort", "parity.json",
                                                         "required_operators.config"]  # nothing added
    assert main(["evaluate", str(bundle)]) == 2
    assert "give --data ROOT" in capsys.readouterr().err


def test_classify_refuses_a_folder_that_is_neither_bundle_nor_run(tmp_path: Path, capsys):
    assert main(["classify", str(tmp_path), str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "neither a bundle" in error[0]


def test_run_and_bundle_files_are_readable_by_colleagues(run: Path, tmp_path: Path):
    """Files get the mode of any new file under the user's umask (0644 usually), not a temp file's 0600."""
    import stat

    from asc.io import default_mode

    assert main(["export", str(run), "--out", str(tmp_path / "bundle"), "--parity-clips", "8", "-q"]) == 0
    files = [p for p in [*run.rglob("*"), *(tmp_path / "bundle").rglob("*")] if p.is_file()]
    assert len(files) > 8 and {p.name for p in files} >= {"config.yaml", "last.pt", "report.json", "bundle.json"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: default_mode() for p in files}
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == default_mode(directory=True)
