"""Every pair and triple of registered methods is refused with one line naming the clash, or runs.

A refused list must fail before any folder is written; an accepted one must train one short epoch
and finalize through ``compress_run``, in job order whatever the argument order.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import yaml

from asc.compress.base import Job, method_classes
from asc.compress.stage import compress_run
from asc.config import RunConfig, load_config
from asc.errors import ConfigError
from asc.run_files import FINALIZED_NAME
from asc.train.loop import train_or_resume

METHODS = method_classes()
LISTS = [list(combo) for size in (2, 3) for combo in itertools.combinations(reversed(list(METHODS)), size)]
"""Argument order reversed from the pipeline order, so the stage has to sort them."""

FAST = {  # one epoch, the smallest settings that still exercise every method
    "structured": ["structured.ratio=0.5", "structured.round_to=2"],
    "prune": ["prune.sparsity=0.5", "prune.every=2"],
    "qat": ["qat.freeze_bn_epochs=0", "qat.freeze_observer_epochs=0"],
    "kd": ["kd.weight=1"],
    "pqk": ["pqk.sparsity=0.5", "pqk.freeze_bn_epochs=0", "pqk.freeze_observer_epochs=0"],
    "psg": ["psg.bits=4"],
    "map": ["map.sparsity=0.5", "map.every=2"],
    "qkd": ["qkd.bits=4"],
    "ppp": ["ppp.sparsity=1.0", "ppp.gate_lr=1000"],
    "ffl": [],
    "afd": ["afd.disc_channels=16"],
    "dcil": ["dcil.sparsity=0.5", "dcil.warmup=0.0"],
    "ft": ["train.epochs=2", "ft.paraphrase_epochs=1"],
}


TAP_READERS = {"ffl", "afd", "ft"}
"""Methods that read the student's named stages, which QAT's traced int8 graph no longer has."""
OPAQUE = {name for name, cls in METHODS.items() if not cls.keeps_stages}


FORWARD_OWNERS = {"ft", "map", "dcil", "pqk"}
"""Methods that replace the student's training forward (they declare the "logits" output)."""


def _tap_clash(names: list[str]) -> bool:
    return bool(TAP_READERS & set(names)) and bool(OPAQUE & set(names))


def _forward_clash(names: list[str]) -> bool:
    return len(FORWARD_OWNERS & set(names)) > 1


def _clash(names: list[str]) -> tuple[str, str, set[Job]] | None:
    for first, second in itertools.combinations(names, 2):
        shared = set(METHODS[first].jobs & METHODS[second].jobs)
        if shared:
            return first, second, shared
    return None


def test_the_lists_cover_every_pair_and_triple_and_the_known_crashes():
    n = len(METHODS)
    assert set(FAST) == set(METHODS) and len(LISTS) == math.comb(n, 2) + math.comb(n, 3)
    refused = [set(names) for names in LISTS if _clash(names)]
    assert {"pqk", "qat"} in refused and {"pqk", "kd"} in refused  # were a raw torch.export crash; a KeyError
    assert {"pqk", "prune"} in refused and {"psg", "qat"} in refused
    assert {"structured", "pqk"} not in refused and {"prune", "qat", "kd"} not in refused


@pytest.fixture(scope="module")
def source(tiny_overrides, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("compose") / "base"
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=1)), run, progress=False)
    return run


def _overrides(names: list[str]) -> list[str]:
    return ["train.epochs=1", "train.batch_size=16", *(item for name in names for item in FAST[name])]


@pytest.mark.parametrize("names", [n for n in LISTS if _clash(n)], ids="+".join)
def test_overlapping_lists_are_refused_before_any_folder_is_written(source: Path, names: list[str]):
    first, second, shared = _clash(names)
    out = source.with_name("refused-" + "+".join(names))
    with pytest.raises(ConfigError) as error:
        compress_run(source, out, names, _overrides(names), progress=False)
    message = str(error.value)
    assert "\n" not in message and message.endswith("; drop one")
    assert f"methods {first} and {second} both do" in message
    assert all(job.describe in message for job in shared)
    assert not out.exists()


@pytest.mark.parametrize("names", [n for n in LISTS if (_tap_clash(n) or _forward_clash(n)) and not _clash(n)],
                         ids="+".join)
def test_tap_readers_with_a_traced_student_or_two_forwards_are_refused_before_any_folder(source: Path,
                                                                                        names: list[str]):
    out = source.with_name("refused-" + "+".join(names))
    with pytest.raises(ConfigError) as error:
        compress_run(source, out, names, _overrides(names), progress=False)
    message = str(error.value)
    assert "\n" not in message
    if _forward_clash(names):
        assert "both produce logits" in message
    else:
        assert "reads the student's feature maps" in message and "then compress its run" in message
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("names", [n for n in LISTS if not (_clash(n) or _tap_clash(n) or _forward_clash(n))], ids="+".join)
def test_every_accepted_list_runs_an_epoch_and_finalizes(source: Path, names: list[str]):
    out = source.with_name("+".join(names))
    assert compress_run(source, out, names, _overrides(names), progress=False) == "compressed"
    assert (out / FINALIZED_NAME).is_file()
    plan = yaml.safe_load((out / "compress.yaml").read_text())
    ran = [method["name"] for method in plan["methods"]]
    assert ran == sorted(names, key=lambda name: min(METHODS[name].jobs))  # job order, not argument order
    report = json.loads((out / "report.json").read_text())
    assert report["precision"] == ("int8" if any(METHODS[name].quantizes for name in names) else "fp32")
    losses = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["losses"]
    assert ("kd.kd" in losses) == ("kd" in names) and losses["task"] > 0
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
