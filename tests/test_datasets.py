"""Every collection style of docs/datasets.md, trained and evaluated through the CLI with options only.

Each style is generated here: 1-s clips of class-specific tones at several sample rates (one file
stereo), in the ESC-50 layout, the UrbanSound8K layout, TAU-style tables (device in a column or in
the file name) and class-per-folder trees with and without train/ and test/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asc.cli import main
from asc.config import DataConfig, override_data
from asc.data.source import read_dataset

CLASSES = ("dog", "rain", "siren")
RATES = (16000, 22050, 8000)  # mixed on purpose: clips are resampled to the front end's rate
_TONES = {"dog": 300.0, "rain": 1200.0, "siren": 3000.0}


def write_clip(path: Path, label: str, index: int, *, stereo: bool = False) -> None:
    """A 1-s tone of the class's pitch plus a little noise, at one of RATES."""
    rate = RATES[index % len(RATES)]
    t = np.arange(rate) / rate
    rng = np.random.default_rng(index)
    audio = 0.3 * np.sin(2 * np.pi * _TONES[label] * (1 + 0.02 * rng.standard_normal()) * t)
    audio = (audio + 0.01 * rng.standard_normal(rate)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.stack([audio, 0.5 * audio], axis=1) if stereo else audio, rate)


def write_esc(root: Path, per_class_fold: int = 2, folds: int = 5) -> Path:
    """ESC-50: ``meta/esc50.csv`` (filename,fold,target,category,esc10,src_file,take) + ``audio/``."""
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    n = 0
    for fold in range(1, folds + 1):
        for target, label in enumerate(CLASSES):
            for take in range(per_class_fold):
                name = f"{fold}-{100 * target + n}-{'AB'[take]}-{target}.wav"
                write_clip(root / "audio" / name, label, n, stereo=n == 0)
                lines.append(f"{name},{fold},{target},{label},False,{100 * target + n},{'AB'[take]}")
                n += 1
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    return root / "meta" / "esc50.csv"


def write_urbansound(root: Path, folds: int = 10) -> Path:
    """UrbanSound8K: ``metadata/UrbanSound8K.csv`` + ``audio/fold{N}/`` (10 folds)."""
    lines = ["slice_file_name,fsID,start,end,salience,fold,classID,class"]
    n = 0
    for fold in range(1, folds + 1):
        for class_id, label in enumerate(CLASSES):
            name = f"{1000 + n}-{class_id}-0-{fold}.wav"
            write_clip(root / "audio" / f"fold{fold}" / name, label, n, stereo=n == 1)
            lines.append(f"{name},{1000 + n},0.0,1.0,1,{fold},{class_id},{label}")
            n += 1
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "UrbanSound8K.csv").write_text("\n".join(lines) + "\n")
    return root / "metadata" / "UrbanSound8K.csv"


def write_tau_style(root: Path, *, device_in: str) -> Path:
    """A tab-separated TAU-style table with a split column; the device in a column or the name."""
    header = "filename\tscene_label\tsplit" + ("\tsource_label" if device_in == "column" else "")
    lines = [header]
    n = 0
    for split, segments in (("train", 3), ("evaluate", 1)):
        for label in CLASSES:
            for segment in range(segments):
                for device in ("a", "b"):
                    name = f"audio/{label}-city-{segment}-{split}-{device}.wav"
                    write_clip(root / name, label, n, stereo=n == 2)
                    lines.append(f"{name}\t{label}\t{split}" + (f"\t{device}" if device_in == "column" else ""))
                    n += 1
    (root / "list.tsv").write_text("\n".join(lines) + "\n")
    return root / "list.tsv"


def write_folders(root: Path, *, splits: bool, per_class: int = 5) -> Path:
    """``root/<class>/*.wav``, or ``root/{train,test}/<class>/*.wav``."""
    n = 0
    for split in ("train", "test") if splits else ("",):
        for label in CLASSES:
            for _ in range(per_class if split != "test" else 2):
                write_clip(root / split / label / f"clip{n}.wav", label, n, stereo=n == 3)
                n += 1
    return root


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def fast(tiny_overrides, tmp_path: Path, epochs: int = 1) -> list[str]:
    return [*tiny_overrides(epochs), f"data.cache_dir={tmp_path / 'cache'}"]


# --------------------------------------------------------------------------- reading by options


def read(root: Path, *options: str):
    return read_dataset(root, override_data(DataConfig(), options, root=str(root)))


def test_esc50_layout_reads_with_options_only(tmp_path: Path) -> None:
    table = write_esc(tmp_path)
    clipset = read(table, "data.audio_dir=" + str(tmp_path / "audio"), "data.label_column=category",
                   "data.fold_column=fold", "data.train_folds=[1,2,3,4]", "data.eval_folds=[5]")
    assert clipset.labels == list(CLASSES)
    assert {c.fold for c in clipset["train"]} == {"1", "2", "3", "4"}
    assert {c.fold for c in clipset["evaluate"]} == {"5"} and len(clipset["evaluate"]) == 6
    assert {c.device for c in clipset["train"]} == {"unknown"}  # 5-…-0.wav is not device "0"


def test_urbansound_layout_with_a_path_template(tmp_path: Path) -> None:
    table = write_urbansound(tmp_path)
    clipset = read(table, f"data.audio_dir={tmp_path / 'audio'}", "data.path_template=fold{fold}/{slice_file_name}",
                   "data.label_column=class", "data.fold_column=fold", "data.eval_folds=[10]")
    assert clipset.labels == list(CLASSES)
    assert len(clipset["train"]) == 27 and [c.fold for c in clipset["evaluate"]] == ["10"] * 3
    assert clipset["evaluate"][0].path == tmp_path / "audio" / "fold10" / "1027-0-0-10.wav"


@pytest.mark.parametrize("device_in", ["column", "name"])
def test_tau_style_tables_take_the_device_from_a_column_or_the_name(tmp_path: Path, device_in: str) -> None:
    table = write_tau_style(tmp_path, device_in=device_in)
    device = "data.device_column=source_label" if device_in == "column" else r"data.device_pattern=-(\w+)\.wav$"
    clipset = read(table, "data.split_column=split", device)
    assert list(clipset.splits) == ["train", "evaluate"] and len(clipset["train"]) == 18
    assert {c.device for c in clipset["evaluate"]} == {"a", "b"}
    if device_in == "name":  # the rest of the name pairs a segment's recordings
        first = clipset["train"][0]
        assert (first.device, first.segment) == ("a", "dog-city-0-train")


def test_folders_split_by_seeded_stratified_folds_or_by_their_own_split(tmp_path: Path) -> None:
    plain = read(write_folders(tmp_path / "plain", splits=False))
    assert plain.labels == list(CLASSES)
    assert len(plain["train"]) == 12 and len(plain["evaluate"]) == 3  # 15 clips, 5 stratified folds
    assert sorted(c.label for c in plain["evaluate"]) == list(CLASSES)  # one clip of each class
    assert plain["evaluate"] == read(tmp_path / "plain")["evaluate"]  # seeded
    reseeded = read(tmp_path / "plain", "data.split_seed=1")["evaluate"]
    assert sorted(c.label for c in reseeded) == list(CLASSES) and reseeded != plain["evaluate"]
    split = read(write_folders(tmp_path / "split", splits=True))
    assert list(split.splits) == ["test", "train"] and len(split["test"]) == 6 and split.labels == list(CLASSES)


def test_device_augmentation_without_devices_alters_every_clip(micirp_dir: Path) -> None:
    import torch

    from asc.augment import AugmentConfig, build_augmentations

    config = AugmentConfig(dir_p=1.0, ir_dir=str(micirp_dir))  # no source device named
    wave, _ = build_augmentations(config, ["unknown"], 16000, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 1600, generator=torch.Generator().manual_seed(1))
    changed = (wave(x, torch.zeros(4, dtype=torch.long)) - x).abs().mean(dim=1)
    assert (changed > 0.1).all()
    named = AugmentConfig(dir_p=1.0, ir_dir=str(micirp_dir), source_device="a")
    wave, _ = build_augmentations(named, ["a", "b"], 16000, generator=torch.Generator().manual_seed(0))
    out = wave(x, torch.tensor([0, 1, 0, 1]))
    assert torch.equal(out[[1, 3]], x[[1, 3]]) and not torch.equal(out[[0, 2]], x[[0, 2]])


# --------------------------------------------------------------------------- train and evaluate


@pytest.mark.slow
def test_esc50_layout_trains_and_evaluates_without_a_device_table(
        tmp_path: Path, tiny_overrides, capsys: pytest.CaptureFixture[str]) -> None:
    table = write_esc(tmp_path / "esc")
    options = [f"data.root={table}", f"data.audio_dir={tmp_path / 'esc' / 'audio'}", "data.label_column=category",
               "data.fold_column=fold", "data.train_folds=[1,2,3,4]", "data.eval_folds=[5]"]
    code, out, err = run_cli(["train", "--out", str(tmp_path / "run"), "--quiet", *fast(tiny_overrides, tmp_path),
                              *options], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metrics"]["n"] == 6 and report["metrics"]["labels"] == list(CLASSES)
    assert report["metrics"]["per_device"] == {} and report["metrics"]["per_group"] == {}
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "Per class" in markdown and "Per device" not in markdown and "by class and device" not in markdown
    assert not (tmp_path / "run" / "per_device.png").exists()
    # the same run on another fold of the same table: options only, no device lines either
    code, out, err = run_cli(["evaluate", str(tmp_path / "run"), "--data", str(table), "--quiet",
                              "--out", str(tmp_path / "eval"), "data.eval_folds=[1]", "data.train_folds=[2,3,4,5]"],
                             capsys)
    assert code == 0, err
    assert "6 clips" in out and "real" not in out
    assert "Per device" not in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.slow
def test_urbansound_layout_trains_through_the_cli(tmp_path: Path, tiny_overrides,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    table = write_urbansound(tmp_path / "us8k")
    code, _, err = run_cli(["train", "--out", str(tmp_path / "run"), "--quiet", *fast(tiny_overrides, tmp_path),
                            f"data.root={table}", f"data.audio_dir={tmp_path / 'us8k' / 'audio'}",
                            "data.path_template=fold{fold}/{slice_file_name}", "data.label_column=class",
                            "data.fold_column=fold", "data.eval_folds=[10]"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metrics"]["n"] == 3 and report["metrics"]["per_device"] == {}


@pytest.mark.slow
def test_tau_style_table_with_devices_reports_them(tmp_path: Path, tiny_overrides,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    table = write_tau_style(tmp_path / "tau", device_in="name")
    code, _, err = run_cli(["train", "--out", str(tmp_path / "run"), "--quiet", *fast(tiny_overrides, tmp_path),
                            f"data.root={table}", "data.split_column=split", r"data.device_pattern=-(\w+)\.wav$"],
                           capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "report.json").read_text())["metrics"]
    assert set(metrics["per_device"]) == {"a", "b"} and metrics["per_group"]["real"]["n"] == 6
    assert "Per device" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_folders_with_train_and_test_train_and_evaluate(tmp_path: Path, tiny_overrides,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folders(tmp_path / "tree", splits=True)
    code, _, err = run_cli(["train", "--out", str(tmp_path / "run"), "--quiet", *fast(tiny_overrides, tmp_path),
                            f"data.root={root}", "data.eval_split=test"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "report.json").read_text())["metrics"]
    assert metrics["n"] == 6 and metrics["labels"] == list(CLASSES) and metrics["per_device"] == {}
    code, out, err = run_cli(["evaluate", str(tmp_path / "run"), "--data", str(root), "--split", "all", "--quiet",
                              "--out", str(tmp_path / "all")], capsys)
    assert code == 0, err
    assert "21 clips" in out


@pytest.mark.slow
def test_synthetic_table_layout_end_to_end(tmp_path: Path, tiny_overrides, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["data", "synth", str(tmp_path / "synth"), "--preset", "tiny", "--format", "table",
                              "--quiet"], capsys)
    assert code == 0, err
    table = tmp_path / "synth" / "clips.csv"
    assert table.read_text().splitlines()[0] == "filename,scene_label,device,fold"
    options = [f"data.root={table}", "data.device_column=device", "data.fold_column=fold", "data.eval_folds=[5]"]
    clipset = read(table, *options[1:])
    assert len(clipset["train"]) == 70 and len(clipset["evaluate"]) == 90  # the TAU layout's split
    assert {c.fold for c in clipset["train"]} == {"1", "2", "3", "4"}
    code, _, err = run_cli(["train", "--out", str(tmp_path / "run"), "--quiet", *fast(tiny_overrides, tmp_path),
                            *options], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "report.json").read_text())["metrics"]
    assert metrics["n"] == 90 and set(metrics["per_group"]) == {"real", "seen", "unseen"}


@pytest.mark.slow
def test_bundle_evaluates_and_classifies_a_table_without_torch(tmp_path: Path, tiny_overrides, without_torch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    table = write_esc(tmp_path / "esc")
    audio = tmp_path / "esc" / "audio"
    options = [f"data.audio_dir={audio}", "data.label_column=category", "data.fold_column=fold", "data.eval_folds=[5]"]
    assert main(["train", "--out", str(tmp_path / "run"), "--quiet", *fast(tiny_overrides, tmp_path),
                 f"data.root={table}", *options]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "bundle"), "--quiet"]) == 0
    capsys.readouterr()
    script = "from asc.cli import main\ncode = main(sys.argv[1:])\nassert not BLOCKED, BLOCKED\nsys.exit(code)\n"
    done = without_torch(script, "evaluate", tmp_path / "bundle", "--data", table, "--out", tmp_path / "eval",
                         "--quiet", *options)
    assert done.returncode == 0, done.stderr
    assert "6 clips" in done.stdout and "real" not in done.stdout
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    trained = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metrics"]["per_device"] == {} and report["metrics"]["labels"] == list(CLASSES)
    # fp32 runtime vs torch: at most one of the six clips may flip on an untrained model
    assert report["metrics"]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"], abs=1 / 6 + 1e-9)
    classified = without_torch(script, "classify", tmp_path / "bundle", audio, "--format", "csv", "--quiet")
    assert classified.returncode == 0, classified.stderr
    assert len(classified.stdout.strip().splitlines()) == 1 + 30  # header + every clip, stereo and 8-22 kHz


def test_bundle_evaluation_reads_tables_without_torch(tmp_path: Path, without_torch) -> None:
    """The bundle path parses data.* options and reads a table with torch blocked."""
    table = write_esc(tmp_path)
    code = ("from pathlib import Path\n"
            "import asc.bundle_eval\n"
            "from asc.cli import main\n"
            "from asc.config import DataConfig, override_data\n"
            "from asc.data.source import read_dataset\n"
            "data = override_data(DataConfig(), sys.argv[2:], root=sys.argv[1])\n"
            "clips = read_dataset(Path(sys.argv[1]), data)\n"
            "print(len(clips['train']), len(clips['evaluate']))\n"
            "assert not BLOCKED, BLOCKED\n")
    done = without_torch(code, table, f"data.audio_dir={tmp_path / 'audio'}", "data.label_column=category",
                         "data.fold_column=fold")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["24", "6"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
