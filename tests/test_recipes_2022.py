"""DCASE 2022+ Task 1: the synthetic corpus in the TAU 2022 Mobile layout, its 2024 training subsets,
the TAU reader on it and on the real 2022 fixture, and the 2022 recipe end to end."""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf

from asc.config import DataConfig
from asc.data.clips import TAU_SCENES
from asc.data.source import read_dataset
from asc.data.synthetic import SynthConfig, synthesize
from asc.data.synthetic.config import SUBSET_PERCENTS
from asc.data.synthetic.devices import ALL_DEVICES
from asc.data.synthetic.subsets import choose_subsets, subset_size
from asc.data.tau import check_tau, read_tau
from asc.errors import ConfigError, DatasetError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NAME_2022 = re.compile(r"^audio/([a-z_]+)-(synth\d\d-\d+)-(\d+)-(\d+)-([a-z0-9]+)\.wav$")
TRAIN_DEVICES = ("a", "b", "c", "s1", "s2", "s3")


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle, delimiter="\t"))
    return header, rows


def recording_of(filename: str) -> str:
    """``…-<segment>-<piece>-<device>`` → ``…-<segment>-<device>``: one device's whole recording."""
    *segment, _piece, device = Path(filename).stem.split("-")
    return "-".join([*segment, device])


def device_of(filename: str) -> str:
    return Path(filename).stem.rsplit("-", 1)[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tau2022") / "corpus"
    synthesize(root, SynthConfig.preset("tau2022-tiny", workers=1), progress=False)
    return root


def test_2022_layout_file_names_pieces_and_fold_tables(corpus: Path) -> None:
    config = SynthConfig.preset("tau2022-tiny")
    assert (config.clip_seconds, config.segment_seconds, config.pieces) == (2.0, 1.0, 2)
    header, meta = read_rows(corpus / "meta.csv")
    assert header == ["filename", "scene_label", "identifier", "source_label"]
    pieces: dict[str, set[str]] = {}
    for filename, scene, identifier, device in meta:
        match = NAME_2022.match(filename)
        assert match, filename
        assert (match[1], match[2], match[5]) == (scene, identifier, device)
        pieces.setdefault(recording_of(filename), set()).add(match[4])
    assert set(map(frozenset, pieces.values())) == {frozenset({"0", "1"})}  # every recording cut in two
    info = sf.info(corpus / meta[0][0])
    assert (info.frames, info.samplerate) == (16000, 16000)  # 1-s files
    setup = corpus / "evaluation_setup"
    train, evaluate = read_rows(setup / "fold1_train.csv")[1], read_rows(setup / "fold1_evaluate.csv")[1]
    # train: per scene 2 device-a recordings + 1 for each of b, c, s1-s3, two 1-s files each
    assert Counter(device_of(r[0]) for r in train) == {"a": 40, **{d: 20 for d in TRAIN_DEVICES[1:]}}
    assert Counter(device_of(r[0]) for r in evaluate) == {d: 20 for d in ALL_DEVICES}
    assert [r[0] for r in read_rows(setup / "fold1_test.csv")[1]] == [r[0] for r in evaluate]


def test_2024_subsets_are_nested_whole_recordings_of_the_training_split(corpus: Path) -> None:
    train = {r[0]: r[1] for r in read_rows(corpus / "evaluation_setup" / "fold1_train.csv")[1]}
    subsets = {}
    for percent in SUBSET_PERCENTS:
        header, rows = read_rows(corpus / "split_setup" / f"split{percent}.csv")
        assert header == ["filename", "scene_label"]
        assert all(train[name] == scene for name, scene in rows)  # inside the training split, same labels
        subsets[percent] = {name for name, _ in rows}
    assert subsets[100] == set(train)
    for small, large in itertools.pairwise(SUBSET_PERCENTS):
        assert subsets[small] <= subsets[large]
    for chosen in subsets.values():  # a recording's 1-s files are in or out together
        recordings = {recording_of(name) for name in chosen}
        assert {name for name in train if recording_of(name) in recordings} == chosen
    # tiny: 2 device-a recordings per scene → round(0.5 · 2) = 1; the other devices keep their only one
    assert len(subsets[50]) == 10 * (1 + 5) * 2
    assert len(subsets[5]) == len(subsets[50])  # "at least one per scene and device"


def test_subset_sizes_follow_the_percentages_per_scene_and_device() -> None:
    # TAU 2022-like strata: 1,000 device-a recordings and 75 of each other device per scene (7.5 → 7)
    recordings = [(f"{scene}-{device}-{k}", scene, device) for scene in TAU_SCENES for device in TRAIN_DEVICES
                  for k in range(1000 if device == "a" else 75)]
    subsets = choose_subsets(recordings, SUBSET_PERCENTS, seed=0)
    for percent, expected_a, expected_other in [(5, 50, 4), (10, 100, 7), (25, 250, 19), (50, 500, 37),
                                                (100, 1000, 75)]:
        counts = Counter(r.rsplit("-", 1)[0] for r in subsets[percent])
        assert set(counts.values()) == {expected_a, expected_other}, percent
        assert all(counts[f"{s}-a"] == expected_a for s in TAU_SCENES)
    assert subsets[5] <= subsets[10] <= subsets[25] <= subsets[50] <= subsets[100]
    assert choose_subsets(recordings, SUBSET_PERCENTS, seed=0) == subsets  # deterministic
    assert choose_subsets(recordings, SUBSET_PERCENTS, seed=1)[5] != subsets[5]
    assert (subset_size(5, 10), subset_size(5, 30), subset_size(5, 31), subset_size(100, 7)) == (1, 1, 2, 7)


def test_reader_gives_subsets_as_splits_and_train_split_selects_one(corpus: Path) -> None:
    clipset = read_tau(corpus)
    assert list(clipset.splits) == ["train", "evaluate", "test", *(f"split{p}" for p in SUBSET_PERCENTS)]
    clip = clipset.splits["split50"][0]
    assert clip.device == device_of(clip.path.name)
    assert re.fullmatch(r"[a-z_]+-synth\d\d-\d+-\d+-[01]", clip.segment)  # pairs devices per 1-s piece
    config = DataConfig(root=str(corpus), train_split="split25")
    chosen = read_dataset(corpus, config).split(config.train_split)
    assert len(chosen) == 120 and {c.device for c in chosen} == set(TRAIN_DEVICES)
    assert read_tau(corpus).splits["split25"] == chosen  # the same clips, in the same order, every time


def test_subset_file_with_evaluation_clips_is_refused(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "tau"
    shutil.copytree(corpus, root, ignore=shutil.ignore_patterns("audio"))
    (root / "audio").symlink_to(corpus / "audio")
    evaluate = read_rows(root / "evaluation_setup" / "fold1_evaluate.csv")[1]
    leak = root / "split_setup" / "split10.csv"
    leak.write_text(leak.read_text() + f"{evaluate[0][0]}\t{evaluate[0][1]}\n")
    with pytest.raises(DatasetError, match=r"split10\.csv: 1 of 121 files are not in the training split"):
        read_tau(root)
    assert [p.severity for p in check_tau(root)] == ["error"]


def test_real_2022_fixture_reads_1s_names(tau_fixtures: Path, tmp_path: Path) -> None:
    root = tau_fixtures / "tau2022uas_mobile" / "TAU-urban-acoustic-scenes-2022-mobile-development"
    clipset = read_tau(root, missing_audio="skip")
    assert clipset.extra["skipped_missing_audio"] == "5"  # the fixture ships one of six listed files
    (clip,) = clipset.splits["train"]
    assert (clip.label, clip.device, clip.city, clip.segment) == ("airport", "a", "lisbon", "airport-lisbon-1000-40000-0")
    assert sf.info(clip.path).frames == 44100
    # the 2024 subset files, placed next to the dataset as the baseline does, become splits
    copy = tmp_path / "tau2022"
    shutil.copytree(root, copy)
    (copy / "split_setup").mkdir()
    (copy / "split_setup" / "split5.csv").write_text("filename\tscene_label\naudio/airport-lisbon-1000-40000-0-a.wav"
                                                     "\tairport\n")
    subset = read_tau(copy, missing_audio="skip")
    assert [c.path.name for c in subset.splits["split5"]] == ["airport-lisbon-1000-40000-0-a.wav"]


def test_cli_writes_the_2022_layout(tmp_path: Path) -> None:
    from asc.cli import main

    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--preset", "tiny", "--layout", "tau2022", "--quiet", "workers=1"]) == 0
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["config"]["segment_seconds"] == 1.0 and manifest["counts"]["train"]["a"] == 20
    assert sorted(p.name for p in (out / "split_setup").iterdir()) == sorted(f"split{p}.csv" for p in SUBSET_PERCENTS)
    with pytest.raises(ConfigError, match="segment_seconds"):
        SynthConfig.preset("tiny", segment_seconds=3.0)


# ----------------------------------------------------------------------------------- the recipe

TINY = ["data.synth_preset=tau2022-tiny", "features.sample_rate=16000", "features.n_fft=512",
        "features.win_length=512", "features.hop_length=256", "features.n_mels=32", "model.args.width=8",
        "train.epochs=1", "train.batch_size=8", "recipe.teacher_overrides=[model.args.width=8]",
        "recipe.qat_overrides=[train.epochs=1,qat.freeze_bn_epochs=0,qat.freeze_observer_epochs=0]"]


def load_recipe(name: str):
    sys.path.insert(0, str(RECIPES))
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_run", RECIPES / name / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_2022_recipe_end_to_end_and_the_complexity_gate(tmp_path: Path, micirp_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe("dcase2022_task1")
    out = tmp_path / "r"
    args = ["--quick", "--quiet", "--out", str(out), "--ir-dir", str(micirp_dir),
            f"data.cache_dir={tmp_path / 'cache'}", *TINY]
    assert recipe.main(args) == 0
    printed = capsys.readouterr().out
    assert all(f"=== stage {n}: " in printed for n in range(1, 8))
    assert "complexity gate passed: student" in printed and "complexity gate passed: int8 student" in printed
    for teacher in ("t0", "t1"):
        assert (out / "teachers" / teacher / "report.json").is_file()
    assert len(list((out / "teachers" / "logits").glob("teacher-logits-*.npy"))) == 4  # 2 teachers x 2 splits
    import numpy as np

    assert np.load(out / "teachers" / "ensemble-train.npy").shape == (140, 10)
    assert (out / "student" / "report.json").is_file() and (out / "qat" / "finalized.pt2").is_file()
    manifest = json.loads((out / "export" / "student" / "bundle.json").read_text())
    assert manifest["precision"] == "int8"
    summary = (out / "evaluate" / "summary.md").read_text()
    for row in ("| t0 |", "| t1 |", "| ensemble |", "| student-fp32 |", "| student-int8 |"):
        assert row in summary
    assert "OVER" not in summary
    # rerunning a stage reuses its output
    assert recipe.main([*args, "--stage", "2", "--stop-stage", "2"]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("teacher t") == 2 and rerun.count(": finished:") == 2
    # an over-budget student is refused before anything is trained, with its numbers, in one line
    assert recipe.main([*args, "--stage", "4", "--stop-stage", "4", "model.args.width=200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run.py: error: student bcresnet_mod")
    assert "1,856,310 > 128,000: FAIL" in err[0] and "79,348,000 > 30,000,000: FAIL" in err[0]


@pytest.mark.slow
def test_2024_recipe_tabulates_every_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe("dcase2024_task1")
    out = tmp_path / "r"
    args = ["--quick", "--quiet", "--out", str(out), f"data.cache_dir={tmp_path / 'cache'}", *TINY,
            "recipe.splits=[50,100]"]
    assert recipe.main(args) == 0
    assert "device impulse-response augmentation is off" in capsys.readouterr().out  # no --ir-dir: said, not silent
    for split, clips in (("split50", 120), ("split100", 140)):
        config = json.loads((out / split / "teachers" / "t0" / "report.json").read_text())["config"]
        assert config["data"]["train_split"] == split and config["augment"]["dir_p"] == 0
        import numpy as np

        assert len(np.load(out / split / "teachers" / f"ensemble-{split}.npy")) == clips
        assert (out / split / "export" / "student" / "bundle.json").is_file()
    rows = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| 50 %", "| 100 %", "| mean"]
    assert rows[1].split(" | ")[1] == "120" and rows[2].split(" | ")[1] == "140"


@pytest.mark.slow
def test_2025_recipe_ships_one_bundle_that_routes_by_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe("dcase2025_task1")
    out = tmp_path / "r"
    args = ["--quick", "--quiet", "--out", str(out), f"data.cache_dir={tmp_path / 'cache'}", *TINY,
            "recipe.devices=[a,s1]",
            "recipe.device_overrides=[train.epochs=1,train.batch_size=8,qat.freeze_bn_epochs=0,qat.freeze_observer_epochs=0]"]
    assert recipe.main(args) == 0
    printed = capsys.readouterr().out
    assert all(f"=== stage {n}: " in printed for n in range(1, 9))
    combined = out / "export" / "device-specific"
    manifest = json.loads((combined / "bundle.json").read_text())
    assert sorted(manifest["device_models"]) == ["a", "s1"] and manifest["precision"] == "int8"
    rows = {line.split(" | ")[0].strip("| "): line for line in (out / "evaluate" / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    assert set(rows) == {"general", "device-specific", "device-specific bundle (int8 runtime)"}
    # devices without a model (b, c, s2-s6) score as the general model does; the shipped bundle as torch does
    general, routed = rows["general"].split(" | ")[1:10], rows["device-specific"].split(" | ")[1:10]
    without_model = [1, 2, 4, 5, 6, 7, 8]  # b, c, s2-s6 of a, b, c, s1, ..., s6
    assert [general[i] for i in without_model] == [routed[i] for i in without_model]
    assert rows["device-specific bundle (int8 runtime)"].split(" | ")[1:] == rows["device-specific"].split(" | ")[1:]
    assert recipe.main([*args[:-2], "recipe.devices=[s4]"]) == 2  # s4 has no training clips: one line, exit 2
    assert "recipe.devices: ['s4'] have no clips in split25" in capsys.readouterr().err
