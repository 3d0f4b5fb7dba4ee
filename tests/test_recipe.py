"""The DCASE 2021 recipe end to end on a tiny corpus: stages, skipping and resuming."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "dcase2021_task1a" / "run.py"

TINY = ["data.synth_preset=tiny", "features.sample_rate=16000", "features.n_fft=512", "features.hop_length=256",
        "features.n_mels=32", "model.args.width=8", "train.epochs=2", "train.batch_size=8"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("dcase2021_run", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_recipe_stages_run_skip_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    recipe = load_recipe()
    out = tmp_path / "recipe"
    args = ["--quick", "--quiet", "--out", str(out), f"data.cache_dir={tmp_path / 'cache'}", *TINY]
    assert recipe.main(args) == 0
    printed = capsys.readouterr().out
    assert "=== stage 1: data" in printed and "=== stage 5: evaluate" in printed
    assert "total" in printed and "unseen devices" in printed
    report = json.loads((out / "evaluate" / "uncompressed" / "report.json").read_text())
    trained = json.loads((out / "train" / "report.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
    assert report["split"] == "evaluate"
    # the table counts what DCASE 2021 limits, non-zero bytes, beside all bytes
    cells = [line.strip("| ").split(" | ") for line in (out / "evaluate" / "summary.md").read_text().splitlines()
             if line.startswith("| ")]
    table = {row[0]: dict(zip(cells[0], row, strict=True)) for row in cells[1:]}
    assert cells[0][-4:] == ["non-zero kB", "kB", "MMACs / 1 s", "dcase2021"]
    assert table["uncompressed"]["accuracy %"] == f"{100 * report['metrics']['accuracy']:.1f}"
    assert float(table["pqk"]["non-zero kB"]) < 0.5 * float(table["pqk"]["kB"])  # 86 % of the conv weights pruned
    assert int(table["structured"]["parameters"].replace(",", "")) < int(
        table["uncompressed"]["parameters"].replace(",", ""))
    assert {row["dcase2021"] for row in table.values()} == {"within"}
    # compress: both variants finalized; export: one bundle per model, int8 for the compressed ones
    for variant in ("pqk", "structured"):
        assert (out / "compress" / variant / "finalized.pt2").is_file()
        assert f"| {variant} |" in (out / "evaluate" / "summary.md").read_text()
        manifest = json.loads((out / "export" / variant / "bundle.json").read_text())
        assert manifest["precision"] == "int8" and "top1_agreement" in manifest["metrics"]
    assert json.loads((out / "export" / "uncompressed" / "bundle.json").read_text())["precision"] == "fp32"
    # the quick profile's translation was fitted from the corpus' paired clips and saved with the run
    assert (out / "train" / "translation.pt").is_file()

    assert recipe.main([*args, "--stage", "2", "--stop-stage", "2"]) == 0
    assert "is finished" in capsys.readouterr().out


def test_recipe_reports_a_broken_dataset_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    recipe = load_recipe()
    broken = tmp_path / "TAU"
    (broken / "evaluation_setup").mkdir(parents=True)
    (broken / "evaluation_setup" / "fold1_train.csv").write_text("filename\tscene_label\n")
    assert recipe.main(["--quiet", "--data", str(broken), "--out", str(tmp_path / "o"), "--stop-stage", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("run.py: error: ") and "meta.csv" in err[-1]


def test_recipe_rejects_unknown_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    recipe = load_recipe()
    assert recipe.main(["--out", str(tmp_path), "model.widht=3"]) == 2
    assert "unknown config key 'model.widht'" in capsys.readouterr().err
    assert recipe.main(["--out", str(tmp_path), "recipe.splits=[5]"]) == 2  # the 2022+ recipes' section: not here
    assert "no recipe.* settings" in capsys.readouterr().err


def test_results_tables_show_the_sizes_their_rules_limit():
    common = load_recipe().common
    row = common.Row("m", 0.5, 0.4, None, params=1000, kilobytes=4.0, nonzero_kilobytes=1.5, mmacs=2.0, within=True)
    assert common.markdown_table([row], "dcase2021").splitlines()[2] == "| m | 50.0 | 40.0 |  | 1,000 | 1.5 | 4.0 | 2.00 | within |"
    assert common.markdown_table([row], "dcase2022").splitlines()[2] == "| m | 50.0 | 40.0 |  | 1,000 | 4.0 | 2.00 | within |"


@pytest.mark.slow
def test_compare_tabulates_variants_and_reuses_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    spec = importlib.util.spec_from_file_location("dcase2021_compare", RECIPE.with_name("compare.py"))
    sys.path.insert(0, str(RECIPE.parent))
    try:
        compare = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compare)
    finally:
        sys.path.remove(str(RECIPE.parent))
    args = ["--study", "norms", "--variants", "BN,RFN", "--quick", "--quiet", "--out", str(tmp_path / "study"),
            f"data.cache_dir={tmp_path / 'cache'}", *TINY]
    assert compare.main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| BN", "| RFN"))]
    assert len(rows) == 2
    summary = (tmp_path / "study" / "summary.md").read_text()
    assert "unseen (s4–s6)" in summary and "| RFN |" in summary
    stamp = (tmp_path / "study" / "BN" / "report.json").stat().st_mtime_ns
    assert compare.main(args) == 0
    assert (tmp_path / "study" / "BN" / "report.json").stat().st_mtime_ns == stamp
    assert compare.main([*args[:2], "--variants", "GN", *args[4:]]) == 2


def test_recipe_makes_openmp_threads_sleep_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch):
    """Spinning OpenMP waits made the quick run 2.7x slower on a shared 2-core machine."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    load_recipe()  # importing the recipe is enough: its stages (and compare.py's) load torch later
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    load_recipe()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
