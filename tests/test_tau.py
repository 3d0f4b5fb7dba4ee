"""TAU reader and validator: the three real fixtures (partial downloads) and broken copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asc.data.clips import device_vocabulary
from asc.data.tau import Problem, check_tau, describe, read_tau
from asc.errors import DatasetError

DEV = {
    "2019": "tau2019uas/TAU-urban-acoustic-scenes-2019-development",
    "2020": "tau2020uas_mobile/TAU-urban-acoustic-scenes-2020-mobile-development",
    "2022": "tau2022uas_mobile/TAU-urban-acoustic-scenes-2022-mobile-development",
}
EVAL = {
    "2019": "tau2019uas/TAU-urban-acoustic-scenes-2019-evaluation",
    "2020": "tau2020uas_mobile/TAU-urban-acoustic-scenes-2020-mobile-evaluation",
    "2023": "tau2022uas_mobile/TAU-urban-acoustic-scenes-2023-mobile-evaluation",
}
META_HEADER = "filename\tscene_label\tidentifier\tsource_label\n"


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def warnings(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "warning"]


def write_wav(
    path: Path, rate: int = 8000, seconds: float = 0.1, value: float = 0.1, subtype: str = "PCM_16"
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.full(int(rate * seconds), value, np.float32), rate, subtype=subtype)


def make_tau(
    root: Path, rows: list[tuple[str, str, str]], train: list[str], evaluate: list[str]
) -> Path:
    """A small complete TAU folder: rows are (file stem, scene, identifier), audio for every row."""
    lines = [
        f"audio/{stem}.wav\t{scene}\t{ident}\t{stem.rsplit('-', 1)[1]}\n"
        for stem, scene, ident in rows
    ]
    (root / "evaluation_setup").mkdir(parents=True)
    (root / "meta.csv").write_text(META_HEADER + "".join(lines))
    scene_of = {stem: scene for stem, scene, _ in rows}
    for name, stems in (("train", train), ("evaluate", evaluate)):
        body = "".join(f"audio/{s}.wav\t{scene_of[s]}\n" for s in stems)
        (root / "evaluation_setup" / f"fold1_{name}.csv").write_text(
            "filename\tscene_label\n" + body
        )
    (root / "evaluation_setup" / "fold1_test.csv").write_text(
        "filename\n" + "".join(f"audio/{s}.wav\n" for s in evaluate)
    )
    for stem, _, _ in rows:
        write_wav(root / "audio" / f"{stem}.wav")
    return root


@pytest.fixture
def small_tau(tmp_path: Path) -> Path:
    rows = [
        ("park-lyon-1-10-a", "park", "lyon-1"),
        ("park-lyon-1-10-b", "park", "lyon-1"),
        ("park-lyon-1-10-s1", "park", "lyon-1"),
        ("bus-prague-2-20-a", "bus", "prague-2"),
        ("bus-prague-2-20-s4", "bus", "prague-2"),
        ("airport-milan-3-30-a", "airport", "milan-3"),
    ]
    return make_tau(
        tmp_path / "tau",
        rows,
        train=["park-lyon-1-10-a", "park-lyon-1-10-b", "park-lyon-1-10-s1", "bus-prague-2-20-a"],
        evaluate=["bus-prague-2-20-s4", "airport-milan-3-30-a"],
    )


def copy_fixture(tau_fixtures: Path, relative: str, tmp_path: Path) -> Path:
    target = tmp_path / Path(relative).name
    shutil.copytree(tau_fixtures / relative, target)
    return target


@pytest.mark.parametrize(
    ("year", "stem", "city"),
    [
        ("2019", "airport-barcelona-0-0", "barcelona"),
        ("2020", "airport-barcelona-0-0", "barcelona"),
        ("2022", "airport-lisbon-1000-40000-0", "lisbon"),
    ],
)
def test_partial_fixture_reads_the_one_present_clip(
    tau_fixtures: Path, year: str, stem: str, city: str
) -> None:
    clipset = read_tau(tau_fixtures / DEV[year], missing_audio="skip")
    assert set(clipset.splits) == {"train", "evaluate", "test"}
    (clip,) = clipset["train"]
    assert clip.path == (tau_fixtures / DEV[year] / "audio" / f"{stem}-a.wav").absolute()
    assert clip.path.is_absolute() and clip.path.is_file()
    assert (clip.label, clip.device, clip.city, clip.segment) == ("airport", "a", city, stem)
    assert clipset["evaluate"] == [] and clipset["test"] == []
    # Six distinct clips are listed and five are absent, in every release (2019 lists nine rows).
    assert clipset.extra["skipped_missing_audio"] == "5"


def test_label_vocabulary_comes_from_meta_in_tau_order(tau_fixtures: Path) -> None:
    clipset = read_tau(tau_fixtures / DEV["2019"], missing_audio="skip")
    assert clipset.labels == ["airport", "metro", "park", "street_pedestrian"]


def test_2019_duplicate_rows_are_removed_and_reported(tau_fixtures: Path) -> None:
    problems = check_tau(tau_fixtures / DEV["2019"])
    (duplicate,) = warnings(problems)
    assert duplicate.path.name == "meta.csv"
    assert "3 duplicate row(s)" in duplicate.message


@pytest.mark.parametrize("year", sorted(DEV))
def test_missing_audio_error_names_count_and_first_file(tau_fixtures: Path, year: str) -> None:
    with pytest.raises(DatasetError) as raised:
        read_tau(tau_fixtures / DEV[year])
    message = str(raised.value)
    assert "5 of 6 listed audio files are missing" in message
    assert Path(raised.value.path).parent == (tau_fixtures / DEV[year] / "audio").absolute()
    assert not Path(raised.value.path).exists()
    assert "data.missing_audio=skip" in message


@pytest.mark.parametrize("year", sorted(DEV))
def test_check_reports_only_the_missing_audio_on_dev_fixtures(
    tau_fixtures: Path, year: str
) -> None:
    (problem,) = errors(check_tau(tau_fixtures / DEV[year], decode=True))
    assert problem.path.name == "audio"
    assert problem.message.startswith("5 of 6 listed audio files are missing (first: audio/")


@pytest.mark.parametrize("name", sorted(EVAL))
def test_evaluation_sets_read_as_unlabelled(tau_fixtures: Path, tmp_path: Path, name: str) -> None:
    (problem,) = errors(check_tau(tau_fixtures / EVAL[name]))
    assert "3 of 3 listed audio files are missing" in problem.message
    root = copy_fixture(tau_fixtures, EVAL[name], tmp_path)
    for index in range(3):
        write_wav(root / "audio" / f"{index}.wav")
    assert check_tau(root) == []
    clipset = read_tau(root)
    assert list(clipset.splits) == ["test"] and clipset.labels == []
    assert [c.path.name for c in clipset["test"]] == ["0.wav", "1.wav", "2.wav"]
    assert {(c.label, c.device, c.city, c.segment) for c in clipset["test"]} == {
        (None, "unknown", None, None)
    }


def test_evaluation_set_without_any_audio_is_an_error_even_when_skipping(
    tau_fixtures: Path,
) -> None:
    with pytest.raises(DatasetError, match="3 of 3 listed audio files are missing"):
        read_tau(tau_fixtures / EVAL["2020"], missing_audio="skip")


def test_deleted_meta_is_named_with_its_columns(tau_fixtures: Path, tmp_path: Path) -> None:
    root = copy_fixture(tau_fixtures, DEV["2020"], tmp_path)
    (root / "meta.csv").unlink()
    (problem,) = check_tau(root)
    assert problem.path == root / "meta.csv" and problem.severity == "error"
    assert "meta.csv not found" in problem.message
    assert "filename scene_label identifier source_label" in problem.message
    with pytest.raises(DatasetError, match=r"meta\.csv: meta\.csv not found"):
        read_tau(root)


def test_comma_separated_meta_is_a_wrong_separator(tau_fixtures: Path, tmp_path: Path) -> None:
    root = copy_fixture(tau_fixtures, DEV["2020"], tmp_path)
    meta = root / "meta.csv"
    meta.write_text(meta.read_text().replace("\t", ","))
    (problem,) = [p for p in errors(check_tau(root)) if p.path == meta]
    assert "wrong separator: comma-separated, but TAU tables are tab-separated" in problem.message
    with pytest.raises(DatasetError, match="wrong separator"):
        read_tau(root, missing_audio="skip")


def test_misnamed_column_lists_expected_and_found(tau_fixtures: Path, tmp_path: Path) -> None:
    root = copy_fixture(tau_fixtures, DEV["2022"], tmp_path)
    meta = root / "meta.csv"
    meta.write_text(meta.read_text().replace("scene_label", "scene", 1))
    (problem,) = [p for p in errors(check_tau(root)) if p.path == meta]
    assert problem.message == (
        "missing column(s) scene_label (expected: filename scene_label identifier source_label; "
        "found: filename scene identifier source_label)"
    )


def test_root_problems(tau_fixtures: Path, tmp_path: Path) -> None:
    (missing,) = check_tau(tmp_path / "nowhere")
    assert missing.message == "dataset folder not found"
    (parent,) = check_tau(tau_fixtures / "tau2020uas_mobile")
    assert "not a TAU dataset folder" in parent.message
    assert (
        parent.fix is not None and "TAU-urban-acoustic-scenes-2020-mobile-development" in parent.fix
    )
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        read_tau(afile)


def test_complete_dataset_has_devices_cities_segments(small_tau: Path) -> None:
    assert check_tau(small_tau, decode=True) == []
    clipset = read_tau(small_tau)
    assert clipset.labels == ["airport", "bus", "park"]
    assert clipset.extra == {}
    assert [c.device for c in clipset["train"]] == ["a", "b", "s1", "a"]
    assert {c.segment for c in clipset["train"][:3]} == {"park-lyon-1-10"}
    assert [c.city for c in clipset["evaluate"]] == ["prague", "milan"]
    # The development test split has no labels in its file; they come from meta.csv.
    assert [c.label for c in clipset["test"]] == ["bus", "airport"]


def test_describe_counts_by_device_and_class(small_tau: Path) -> None:
    text = describe(read_tau(small_tau))
    lines = text.splitlines()
    assert lines[0].split() == ["device", "train", "evaluate", "test"]
    assert [line.split() for line in lines[1:6]] == [
        ["a", "2", "1", "1"],
        ["b", "1", "0", "0"],
        ["s1", "1", "0", "0"],
        ["s4", "0", "1", "1"],
        ["total", "4", "2", "2"],
    ]
    assert [line.split() for line in lines[8:11]] == [
        ["airport", "0", "1", "1"],
        ["bus", "1", "1", "1"],
        ["park", "3", "0", "0"],
    ]


def test_device_vocabulary_orders_dcase_devices_first() -> None:
    assert device_vocabulary(["s4", "x9", "a", "s1", "b", "a", "phone"]) == [
        "a",
        "b",
        "s1",
        "s4",
        "phone",
        "x9",
    ]


def test_no_fold_files_puts_everything_in_all(small_tau: Path) -> None:
    shutil.rmtree(small_tau / "evaluation_setup")
    clipset = read_tau(small_tau)
    assert list(clipset.splits) == ["all"] and len(clipset["all"]) == 6


def test_fold_files_disagreeing_with_meta(small_tau: Path) -> None:
    train = small_tau / "evaluation_setup" / "fold1_train.csv"
    text = train.read_text().replace("park-lyon-1-10-b.wav\tpark", "park-lyon-1-10-b.wav\tbus")
    train.write_text(text + "audio/tram-oslo-9-9-a.wav\ttram\n")
    messages = [p.message for p in errors(check_tau(small_tau)) if p.path == train]
    assert messages == [
        "1 of 5 files are not in meta.csv (first: audio/tram-oslo-9-9-a.wav)",
        "1 label(s) disagree with meta.csv "
        "(first: audio/park-lyon-1-10-b.wav (bus here, park in meta.csv))",
    ]


def test_broken_tables(small_tau: Path) -> None:
    meta = small_tau / "meta.csv"
    evaluate = small_tau / "evaluation_setup" / "fold1_evaluate.csv"
    test = small_tau / "evaluation_setup" / "fold1_test.csv"
    evaluate.write_text("filename\tscene_label\n")
    test.write_text("")
    # Line 8 repeats a file with another label; line 9 is blank; line 10 lacks two fields.
    meta.write_text(
        meta.read_text() + "audio/park-lyon-1-10-a.wav\tbus\tlyon-1\ta\n\naudio/x-a.wav\tpark\n"
    )
    found = {p.path.name: p.message for p in errors(check_tau(small_tau))}
    assert found == {
        "meta.csv": "1 row(s) do not have 4 fields (first at line 10)",
        "fold1_evaluate.csv": "table has a header but no rows",
        "fold1_test.csv": "table is empty",
    }
    meta.write_text("".join(meta.read_text().splitlines(keepends=True)[:-1]))
    assert [p.message for p in errors(check_tau(small_tau)) if p.path == meta] == [
        "1 file(s) listed more than once with different labels "
        "(first: audio/park-lyon-1-10-a.wav (park vs bus))"
    ]


def test_unreadable_and_undecodable_audio(small_tau: Path) -> None:
    broken = small_tau / "audio" / "park-lyon-1-10-b.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    nan = small_tau / "audio" / "bus-prague-2-20-a.wav"
    sf.write(nan, np.array([0.0, np.nan, 0.1], np.float32), 8000, subtype="FLOAT")
    probed = errors(check_tau(small_tau))
    assert [p.path for p in probed] == [broken]
    assert "not a readable audio file" in probed[0].message
    decoded = errors(check_tau(small_tau, decode=True))
    assert [p.path for p in decoded] == [broken, nan]
    assert "NaN" in decoded[1].message


def test_mixed_sample_rates_warn(small_tau: Path) -> None:
    write_wav(small_tau / "audio" / "park-lyon-1-10-a.wav", rate=16000)
    (problem,) = warnings(check_tau(small_tau))
    assert problem.message == "mixed sample rates: 8000 Hz (5 files), 16000 Hz (1 files)"


def test_source_label_disagreeing_with_file_name_warns(small_tau: Path) -> None:
    meta = small_tau / "meta.csv"
    meta.write_text(meta.read_text().replace("lyon-1\tb", "lyon-1\tc"))
    (problem,) = warnings(check_tau(small_tau))
    assert "1 file name device(s) disagree with source_label" in problem.message
    assert read_tau(small_tau)["train"][1].device == "b"


def test_invalid_missing_audio_option(small_tau: Path) -> None:
    with pytest.raises(ValueError, match="missing_audio"):
        read_tau(small_tau, missing_audio="ignore")  # type: ignore[arg-type]


def test_2019_meta_duplicates_are_read_once(tau_fixtures: Path, tmp_path: Path) -> None:
    root = copy_fixture(tau_fixtures, DEV["2019"], tmp_path)
    shutil.rmtree(root / "evaluation_setup")
    for line in (root / "meta.csv").read_text().splitlines()[1:]:
        if not (root / line.split("\t")[0]).exists():
            write_wav(root / line.split("\t")[0])
    clipset = read_tau(root)
    assert len((root / "meta.csv").read_text().splitlines()) == 10
    assert len(clipset["all"]) == 6
    assert len({clip.path for clip in clipset["all"]}) == 6
