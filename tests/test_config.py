from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from asc.config import OptimConfig, RunConfig, from_dict, load_config, parse_overrides, save_yaml, to_dict
from asc.errors import ConfigError


def test_overrides_are_typed_and_nested():
    config = load_config(RunConfig, None, ["optim.lr=0.05", "model.args.width=80", "train.epochs=3",
                                           "data.root=/x", "optim.name=adamw", "features.n_mels=128"])
    assert config.optim.lr == 0.05
    assert config.model.args == {"width": 80}
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.data.root == "/x"
    assert config.optim.name == "adamw"
    assert config.features.n_mels == 128


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(RunConfig, None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs.*integer"):
        load_config(RunConfig, None, ["train.epochs=2.5"])


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "did you mean 'optim.lr'"),
    ("optim.name=adam", "must be one of 'sgd', 'adamw'"),
    ("train.amp=maybe", "true or false"),
    ("optim", "key=value"),
    # values torch or the loader would reject with a traceback, and one that would train nothing
    ("train.batch_size=0", r"^train.batch_size=0 must be at least 1$"),
    ("train.epochs=-1", r"^train.epochs=-1 must be at least 1$"),
    ("train.device=gpu", r"^train.device='gpu' must be auto, cpu, cuda or cuda:N$"),
    ("data.num_workers=-3", r"^data.num_workers=-3 must be 0 \(load in the main process\) or more$"),
    ("data.clip_seconds=0", r"^data.clip_seconds=0.0 must be positive"),
    ("optim.lr=-1", r"^optim.lr=-1.0 must be positive$"),
    ("optim.momentum=1", r"^optim.momentum=1.0 must be in \[0, 1\)$"),
    ("optim.weight_decay=-0.1", r"^optim.weight_decay=-0.1 must be 0 or more$"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, [override])


def test_yaml_round_trip(tmp_path: Path):
    config = load_config(RunConfig, None, ["model.args.width=20", "data.clip_seconds=2"])
    save_yaml(to_dict(config), tmp_path / "config.yaml")
    again = load_config(RunConfig, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(config)


def test_yaml_file_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.2\n  warmup_epochs: 0\ntrain:\n  epochs: 7\n")
    config = load_config(RunConfig, path, ["optim.lr=0.3"])
    assert (config.optim.lr, config.optim.warmup_epochs, config.train.epochs) == (0.3, 0.0, 7)


def test_bad_yaml_files_are_one_line_errors(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(RunConfig, broken)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(RunConfig, tmp_path)
    binary = tmp_path / "clip.wav"
    binary.write_bytes(b"RIFF\xff\xfe\x00WAVEfmt \x80\x81")
    with pytest.raises(ConfigError, match=r"clip.wav: not a text file \(not UTF-8\); give a YAML config file"):
        load_config(RunConfig, binary)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(RunConfig, listing)


def test_parse_overrides_values_are_yaml():
    assert parse_overrides(["a.b=[1, 2]", "a.c=null", "d=text"]) == {"a": {"b": [1, 2], "c": None}, "d": "text"}


def test_from_dict_builds_nested_dataclasses():
    optim = from_dict(OptimConfig, {"grad_clip": 5})
    assert optim.grad_clip == 5.0 and dataclasses.is_dataclass(optim)


def test_data_options_are_validated_and_override_data_touches_only_data():
    from asc.config import DataConfig, override_data

    with pytest.raises(ConfigError, match="data.num_folds=1 must be at least 2"):
        load_config(RunConfig, overrides=["data.num_folds=1"])
    with pytest.raises(ConfigError, match="set one of them"):
        load_config(RunConfig, overrides=["data.device_column=mic", r"data.device_pattern=-(\w+)\.wav$"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(RunConfig, overrides=["data.format=csv"])
    data = override_data(DataConfig(), ["data.eval_folds=[5]", "data.label_column=category"], root="meta.csv")
    assert (data.root, data.eval_folds, data.label_column, data.train_folds) == ("meta.csv", ["5"], "category", None)
    with pytest.raises(ConfigError, match="override 'model…' does not apply here; only data.\\* settings do"):
        override_data(DataConfig(), ["model.args.width=8"])
    with pytest.raises(ConfigError, match="unknown config key 'data.label_col'; did you mean 'data.label_column'"):
        override_data(DataConfig(), ["data.label_col=x"])


def test_config_imports_without_torch(without_torch):
    done = without_torch("import asc.config, asc.augment\nassert not BLOCKED, BLOCKED\n")
    assert done.returncode == 0, done.stderr
