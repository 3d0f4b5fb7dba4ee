"""The command-line contract: help everywhere, exit 2 with one line naming the file for bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asc.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asc", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [[], ["data"], ["data", "synth"], ["data", "check"], ["train"], ["evaluate"], ["complexity"]])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: asc" in capsys.readouterr().out


def test_synth_then_check_succeeds(tmp_path: Path):
    out = tmp_path / "corpus"
    synth = run("data", "synth", str(out), "--preset", "tiny", "--quiet")
    assert synth.returncode == 0, synth.stderr
    check = run("data", "check", str(out), "--quiet")
    assert check.returncode == 0, check.stderr
    assert f"{out}: OK" in check.stdout
    assert "s4" in check.stdout and "street_traffic" in check.stdout


def test_synth_refuses_a_foreign_folder(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run("data", "synth", str(tmp_path), "--preset", "tiny", "--quiet")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder should go")
    result = run("data", "synth", str(blocker / "corpus"), "--preset", "tiny", "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"asc: error: {blocker / 'corpus'}: cannot make this folder (Not a directory); "
                                     "choose another output folder")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)  # a report written there would replace the run's own
    assert main(["evaluate", str(tmp_path / "other"), "--out", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip() == (f"asc: error: {run_dir}: is a run or bundle folder, whose report the "
                                               "evaluation would replace; give --out a folder of its own")
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"asc: error: {tmp_path / 'nowhere'}: no such run or bundle folder; check the path"
    (run_dir / "config.yaml").write_text("{}\n")
    (run_dir / "bundle").write_text("a file where classify caches the run's bundle")
    assert main(["classify", str(run_dir), str(blocker)]) == 2
    assert capsys.readouterr().err.strip() == (f"asc: error: {run_dir / 'bundle'}: is in the way of the bundle "
                                               "`asc classify` caches in a run folder; move it elsewhere, or "
                                               "classify with a bundle from `asc export`")


def test_a_missing_impulse_response_folder_names_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["data", "synth", str(tmp_path / "corpus"), "--preset", "tiny", "--quiet", "--ir-dir",
                 str(tmp_path / "irs")]) == 2
    assert capsys.readouterr().err.strip() == (f"asc: error: {tmp_path / 'irs'}: no such folder; point the "
                                               "impulse-response folder (--ir-dir, ir_dir=) at a folder of IR files, "
                                               "or leave it out for simulated devices only")


@pytest.mark.parametrize("option", ["--repeats", "--threads"])
def test_bench_counts_below_one_are_usage_errors(option: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "bundle", option, "0"])
    assert stop.value.code == 2
    assert f"argument {option}: '0' is not a whole number of at least 1" in capsys.readouterr().err


def test_check_names_a_missing_meta_file(tmp_path: Path, tau_fixtures: Path):
    root = tmp_path / "dev"
    shutil.copytree(tau_fixtures / "tau2020uas_mobile" / "TAU-urban-acoustic-scenes-2020-mobile-development", root)
    (root / "meta.csv").unlink()
    result = run("data", "check", str(root), "--quiet")
    assert result.returncode == 2
    assert "meta.csv" in result.stderr and "Traceback" not in result.stderr


def test_check_of_a_missing_folder_is_one_line(tmp_path: Path):
    result = run("data", "check", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert str(tmp_path / "nowhere") in lines[0] and "Traceback" not in result.stderr


def test_unknown_synth_option_is_one_line(tmp_path: Path):
    result = run("data", "synth", str(tmp_path / "x"), "--preset", "tiny", "clip_secs=3")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "clip_secs" in result.stderr


def test_the_command_makes_openmp_threads_sleep_unless_told_otherwise(tmp_path: Path, monkeypatch):
    """Spinning OpenMP waits made training 2.7x slower on a shared 2-core machine (asc.threads)."""
    import os

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["data", "check", str(tmp_path / "nothing")]) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    main(["data", "check", str(tmp_path / "nothing")])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
