"""CSV/TSV tables and class-per-folder trees loaded by options, with real WAV files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asc.data.table import label_vocabulary, read_folder, read_rows, read_table, sniff_separator
from asc.errors import DatasetError

ESC_ROWS = [  # filename, fold, target, category (the ESC-50 layout)
    ("1-100-A-0.wav", 1, 0, "dog"),
    ("1-101-A-1.wav", 1, 1, "rooster"),
    ("2-200-A-0.wav", 2, 0, "dog"),
    ("4-400-A-1.wav", 4, 1, "rooster"),
    ("5-500-A-0.wav", 5, 0, "dog"),
    ("5-501-B-1.wav", 5, 1, "rooster"),
]


def write_wav(path: Path, rate: int = 8000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(rate // 10, np.float32), rate)


@pytest.fixture
def esc(tmp_path: Path) -> Path:
    """ESC-50-like: meta/esc50.csv beside audio/."""
    (tmp_path / "meta").mkdir()
    lines = ["filename,fold,target,category"] + [
        f"{f},{fold},{t},{c}" for f, fold, t, c in ESC_ROWS
    ]
    (tmp_path / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    for name, *_ in ESC_ROWS:
        write_wav(tmp_path / "audio" / name)
    return tmp_path


def test_esc50_like_table_splits_by_fold(esc: Path) -> None:
    clipset = read_table(
        esc / "meta" / "esc50.csv",
        audio_root=esc / "audio",
        path_column="filename",
        label_column="category",
        fold_column="fold",
        eval_folds=(5,),
    )
    assert list(clipset.splits) == ["train", "evaluate"]
    assert [c.path.name for c in clipset["train"]] == [r[0] for r in ESC_ROWS[:4]]
    assert [c.path.name for c in clipset["evaluate"]] == ["5-500-A-0.wav", "5-501-B-1.wav"]
    assert [c.label for c in clipset["evaluate"]] == ["dog", "rooster"]
    assert clipset.labels == ["dog", "rooster"]
    assert all(c.path.is_absolute() and c.path.is_file() for c in clipset["train"])
    assert {c.device for c in clipset["train"]} == {"unknown"}


def test_test_folds_device_column_and_no_fold_column(tmp_path: Path) -> None:
    rows = ["path;label;mic;fold", "a.wav;x;m1;1", "b.wav;y;m2;2", "c.wav;x;m1;3"]
    (tmp_path / "list.csv").write_text("\n".join(rows))
    for name in "abc":
        write_wav(tmp_path / f"{name}.wav")
    clipset = read_table(
        tmp_path / "list.csv",
        path_column="path",
        label_column="label",
        device_column="mic",
        fold_column="fold",
        eval_folds=["2"],
        test_folds=[3],
    )
    assert {name: [c.path.name for c in clips] for name, clips in clipset.splits.items()} == {
        "train": ["a.wav"],
        "evaluate": ["b.wav"],
        "test": ["c.wav"],
    }
    assert [c.device for c in clipset["evaluate"]] == ["m2"]
    # The audio root defaults to the table's folder; without a fold column all clips are "train".
    everything = read_table(tmp_path / "list.csv", path_column="path", label_column="label")
    assert list(everything.splits) == ["train"] and len(everything["train"]) == 3


def test_unlabelled_table(tmp_path: Path) -> None:
    (tmp_path / "files.tsv").write_text("filename\nx.wav\n")
    write_wav(tmp_path / "x.wav")
    clipset = read_table(tmp_path / "files.tsv", label_column=None)
    assert clipset["train"][0].label is None and clipset.labels == []


def test_separator_sniffing_and_quotes(tmp_path: Path) -> None:
    assert sniff_separator("filename\tscene_label") == "\t"
    assert sniff_separator("a;b;c") == ";"
    assert sniff_separator("a,b") == ","
    assert sniff_separator("filename") is None
    table = tmp_path / "t.csv"
    table.write_bytes(b'\xef\xbb\xbffilename,label\r\n"a, b.wav",x\r\n\r\n')
    rows = read_rows(table)
    assert (rows.header, rows.rows, rows.lines, rows.sep) == (
        ["filename", "label"],
        [["a, b.wav", "x"]],
        [2],
        ",",
    )


def test_wrong_column_lists_columns_and_option(esc: Path) -> None:
    with pytest.raises(DatasetError) as raised:
        read_table(esc / "meta" / "esc50.csv", audio_root=esc / "audio")
    message = str(raised.value)
    assert "no column 'scene_label'" in message
    assert "comma-separated columns found: filename, fold, target, category" in message
    assert "set data.label_column= to one of the columns found" in message


def test_table_errors(esc: Path, tmp_path: Path) -> None:
    table = esc / "meta" / "esc50.csv"
    with pytest.raises(DatasetError, match=r"fold\(s\) 5 are in both data.eval_folds and data.test_folds"):
        read_table(
            table, audio_root=esc / "audio", label_column="category", fold_column="fold",
            eval_folds=(5,), test_folds=(5,),
        )
    with pytest.raises(DatasetError, match="without a fold column"):
        read_table(table, label_column="category", eval_folds=(5,))
    with pytest.raises(
        DatasetError, match=r"audio file not found \(6 of 6 files listed in esc50.csv"
    ):
        read_table(table, label_column="category")
    (tmp_path / "ragged.csv").write_text("filename,label\na.wav,x\nb.wav\n")
    with pytest.raises(DatasetError, match="line 3 has 1 fields but the header has 2"):
        read_table(tmp_path / "ragged.csv", label_column="label")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DatasetError, match="table is empty"):
        read_table(tmp_path / "empty.csv")
    with pytest.raises(DatasetError, match="table not found"):
        read_table(tmp_path / "absent.csv")


def test_read_folder_is_recursive_per_class(tmp_path: Path) -> None:
    write_wav(tmp_path / "rain" / "a.wav")
    write_wav(tmp_path / "rain" / "day2" / "b.WAV")
    write_wav(tmp_path / "wind" / "c.wav")
    (tmp_path / "wind" / "notes.txt").write_text("not audio")
    (tmp_path / "empty_class").mkdir()
    clipset = read_folder(tmp_path)
    assert clipset.labels == ["rain", "wind"]
    assert [(c.path.relative_to(tmp_path).as_posix(), c.label) for c in clipset["train"]] == [
        ("rain/a.wav", "rain"),
        ("rain/day2/b.WAV", "rain"),
        ("wind/c.wav", "wind"),
    ]


def test_read_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="folder not found"):
        read_folder(tmp_path / "absent")
    with pytest.raises(DatasetError, match="folder is empty"):
        read_folder(tmp_path)
    write_wav(tmp_path / "loose.wav")
    with pytest.raises(
        DatasetError, match="1 audio files lie directly in the folder, in no class subfolder"
    ):
        read_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.mp3").write_text("")
    with pytest.raises(DatasetError, match=r"no .flac/.ogg/.wav files in any of the 1 subfolders"):
        read_folder(tmp_path)


def test_label_vocabulary_order() -> None:
    assert label_vocabulary(["tram", "airport", None, "bus", "tram"]) == ["airport", "bus", "tram"]
    assert label_vocabulary(["tram", "dog", "airport"]) == ["airport", "dog", "tram"]
    assert label_vocabulary(["street_traffic", "metro_station", "metro"]) == [
        "metro",
        "metro_station",
        "street_traffic",
    ]


def test_assigned_folds_are_stratified_balanced_and_seeded() -> None:
    from asc.data.clips import Clip
    from asc.data.splits import assign_folds, fold_order, split_by_folds

    clips = [Clip(Path(f"{label}{i}.wav"), label) for label, n in (("a", 7), ("b", 5), ("c", 3)) for i in range(n)]
    dealt = assign_folds(clips, 5, seed=0)
    assert [c.path for c in dealt] == [c.path for c in clips]  # order kept, only folds added
    sizes = [sum(c.fold == str(k) for c in dealt) for k in range(1, 6)]
    assert sizes == [3, 3, 3, 3, 3]
    for label in "ab":  # every class with at least k clips is in every fold
        assert {c.fold for c in dealt if c.label == label} == set("12345")
    assert dealt == assign_folds(clips, 5, seed=0) and dealt != assign_folds(clips, 5, seed=1)
    splits = split_by_folds(dealt, Path("t.csv"))
    assert {c.fold for c in splits["evaluate"]} == {"5"} and len(splits["train"]) == 12
    picked = split_by_folds(dealt, Path("t.csv"), train_folds=[1, 2], eval_folds=[3], test_folds=[4])
    assert [len(picked[s]) for s in ("train", "evaluate", "test")] == [6, 3, 3]  # fold 5 left out
    with pytest.raises(DatasetError, match=r"data.train_folds names fold\(s\) 9 that no clip is in \(folds found: 1, 2, 3, 4, 5\)"):
        split_by_folds(dealt, Path("t.csv"), train_folds=[9])
    with pytest.raises(DatasetError, match=r"fold\(s\) 2 are in both data.train_folds and data.eval_folds"):
        split_by_folds(dealt, Path("t.csv"), train_folds=[1, 2], eval_folds=[2])
    assert fold_order({"10", "2", "1", "extra"}) == ["1", "2", "10", "extra"]


def test_split_folders_above_class_folders(tmp_path: Path) -> None:
    write_wav(tmp_path / "train" / "rain" / "a.wav")
    write_wav(tmp_path / "train" / "wind" / "b.wav")
    write_wav(tmp_path / "val" / "rain" / "c.wav")
    clipset = read_folder(tmp_path)
    assert {name: [c.path.name for c in clips] for name, clips in clipset.splits.items()} == {
        "train": ["a.wav", "b.wav"], "val": ["c.wav"]}
    assert clipset.labels == ["rain", "wind"]
    (tmp_path / "test").mkdir()
    with pytest.raises(DatasetError, match="test: folder is empty"):
        read_folder(tmp_path)
