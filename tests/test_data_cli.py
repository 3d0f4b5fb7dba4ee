"""``asc data check`` on every dataset format: one ``asc: error: PATH: problem; fix`` line per problem, exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_datasets import CLASSES, write_clip, write_esc, write_folders

from asc.cli import main


def check(capsys: pytest.CaptureFixture[str], root: Path, *options: str, quiet: bool = False) -> tuple[int, str, list[str]]:
    code = main(["data", "check", str(root), *options, *(["--quiet"] if quiet else [])])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def one_error(capsys: pytest.CaptureFixture[str], root: Path, *options: str, quiet: bool = True) -> str:
    """The one error line of a failing check; any other stderr line is an ``asc: warning:``."""
    code, _, lines = check(capsys, root, *options, quiet=quiet)
    errors = [line for line in lines if line.startswith("asc: error: ")]
    assert code == 2 and len(errors) == 1, lines
    assert all(line.startswith("asc: warning: ") for line in lines if line not in errors), lines
    return errors[0]


ESC_OPTIONS = ("data.label_column=category", "data.fold_column=fold")


@pytest.fixture
def esc(tmp_path: Path) -> Path:
    table = write_esc(tmp_path / "esc", per_class_fold=1)
    shutil.move(tmp_path / "esc" / "meta" / "esc50.csv", tmp_path / "esc" / "esc50.csv")
    return tmp_path / "esc" / "esc50.csv" if table else table


def test_tau_problems_are_one_line_without_a_stray_progress_bar(tmp_path: Path, tau_fixtures: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 9: two lines starting 'error:' and a 'checking audio: 0file' bar before the fix."""
    root = tmp_path / "dev"
    shutil.copytree(tau_fixtures / "tau2020uas_mobile" / "TAU-urban-acoustic-scenes-2020-mobile-development", root)
    shutil.rmtree(root / "audio", ignore_errors=True)
    code, _, lines = check(capsys, root)  # progress bars on, as a user sees it
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"asc: error: {root / 'audio'}: ") and "listed audio files are missing" in lines[0]
    (root / "meta.csv").unlink()
    code, _, lines = check(capsys, root)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"asc: error: {root / 'meta.csv'}: meta.csv not found")
    code, _, lines = check(capsys, tmp_path / "nowhere")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"asc: error: {tmp_path / 'nowhere'}: ")


def test_clean_table_passes_without_a_device_table(esc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, lines = check(capsys, esc, "data.audio_dir=audio", *ESC_OPTIONS, quiet=True)
    assert code == 2 and "audio file not found" in lines[0]  # audio_dir is relative to the working folder
    code, out, lines = check(capsys, esc, f"data.audio_dir={esc.parent / 'audio'}", *ESC_OPTIONS, quiet=True)
    assert code == 0, lines
    assert out.splitlines()[0].split() == ["class", "train", "evaluate"]
    assert out.splitlines()[1].split() == ["dog", "4", "1"]
    assert "device" not in out and f"{esc}: OK (table, 15 clips, 3 labels" in out
    assert any("mixed sample rates" in line for line in lines)  # warnings only
    assert any("mixed channel counts" in line for line in lines)


def test_missing_column_lists_the_columns_found(esc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error(capsys, esc, f"data.audio_dir={esc.parent / 'audio'}", "data.fold_column=fold")
    assert line == (f"asc: error: {esc}: no column 'scene_label' (comma-separated columns found: filename, fold, "
                    "target, category, esc10, src_file, take); set data.label_column= to one of the columns found")


def test_unknown_fold_values(esc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error(capsys, esc, f"data.audio_dir={esc.parent / 'audio'}", *ESC_OPTIONS, "data.eval_folds=[6]")
    assert "data.eval_folds names fold(s) 6 that no clip is in (folds found: 1, 2, 3, 4, 5)" in line


def test_missing_audio(esc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audio = esc.parent / "audio"
    next(audio.iterdir()).unlink()
    line = one_error(capsys, esc, f"data.audio_dir={audio}", *ESC_OPTIONS)
    assert "audio file not found (1 of 15 files listed in esc50.csv are missing)" in line
    code, _, lines = check(capsys, esc, f"data.audio_dir={audio}", *ESC_OPTIONS, "data.missing_audio=skip",
                           quiet=True)
    assert code == 0 and any("1 listed audio file(s) are missing and skipped" in line for line in lines)


def test_unreadable_audio(esc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audio = esc.parent / "audio"
    broken = sorted(audio.iterdir())[3]
    broken.write_bytes(b"RIFF not really a wav")
    line = one_error(capsys, esc, f"data.audio_dir={audio}", *ESC_OPTIONS)
    assert line.startswith(f"asc: error: {broken}: not a readable audio file")


def test_label_with_one_clip(esc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = esc.read_text().splitlines()
    lines[1] = lines[1].replace(",dog,", ",cat,")
    esc.write_text("\n".join(lines) + "\n")
    line = one_error(capsys, esc, f"data.audio_dir={esc.parent / 'audio'}", *ESC_OPTIONS)
    assert "1 label(s) with only one clip: cat" in line


def test_duplicated_paths(esc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = esc.read_text().splitlines()
    esc.write_text("\n".join([*lines, lines[2]]) + "\n")
    line = one_error(capsys, esc, f"data.audio_dir={esc.parent / 'audio'}", *ESC_OPTIONS)
    assert f"line {len(lines) + 1} lists {lines[2].split(',')[0]} again (first at line 3)" in line


def test_folder_trees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folders(tmp_path / "tree", splits=True)
    code, out, _ = check(capsys, root, quiet=True)
    assert code == 0 and f"{root}: OK (folders, 21 clips, 3 labels" in out
    write_clip(root / "train" / "owl" / "x.wav", CLASSES[0], 0)
    assert "1 label(s) with only one clip: owl" in one_error(capsys, root)
    (tmp_path / "empty").mkdir()
    assert one_error(capsys, tmp_path / "empty") == (
        f"asc: error: {tmp_path / 'empty'}: folder is empty; put each class's audio files in a subfolder "
        "named after the class")


def test_bad_table_stops_training_with_one_line(esc: Path, tmp_path: Path, tiny_overrides,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--out", str(tmp_path / "run"), "--quiet", *tiny_overrides(1), f"data.root={esc}",
                 f"data.audio_dir={esc.parent / 'audio'}", "data.label_column=category", "data.fold_column=fold",
                 "data.eval_folds=[9]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.eval_folds names fold(s) 9" in err[0]


def test_table_option_errors(esc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audio = f"data.audio_dir={esc.parent / 'audio'}"
    assert one_error(capsys, tmp_path / "absent.csv") == (f"asc: error: {tmp_path / 'absent.csv'}: table not found; "
                                                          "check the path")
    recording = tmp_path / "one.wav"
    recording.write_bytes(b"")  # even an empty one is a recording by its name, not an empty table
    assert one_error(capsys, recording) == (f"asc: error: {recording}: is an audio file, not a dataset; point "
                                            "data.root at a dataset folder or a CSV/TSV table (`asc classify` labels "
                                            "single recordings)")
    line = one_error(capsys, esc, audio, *ESC_OPTIONS, "data.path_template=fold{folder}/{filename}")
    assert "no column 'folder'" in line and "set data.path_template= to one of the columns found" in line
    line = one_error(capsys, esc, audio, *ESC_OPTIONS, r"data.device_pattern=_(\d+)\.flac$")
    assert r"data.device_pattern '_(\d+)\.flac$' matches none of the file names (first: 1-0-A-0.wav)" in line
    code, out, _ = check(capsys, esc, audio, "data.label_column=category", "data.split_column=take", quiet=True)
    assert code == 0 and out.splitlines()[0].split() == ["class", "A"]  # a split column's values name the splits
