"""Config loading, dotted overrides and validation errors that name the field."""

from pathlib import Path

import pytest

from rayblora.config import ConfigError, config_from_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.steps=7", "adapter.target_modules=[q_proj,k_proj]", "cluster.use_gpu=true",
                             "data.shift_tasks=[]"])
    assert cfg.train.steps == 7 and cfg.adapter.target_modules == ("q_proj", "k_proj")
    assert cfg.cluster.use_gpu is True and cfg.data.shift_tasks == ()


@pytest.mark.parametrize("override, field", [
    ("train.steps=0", "train.steps"),
    ("train.steps=abc", "train.steps"),
    ("train.stpes=3", "train.stpes"),
    ("posterior.method=bogus", "posterior.method"),
    ("adapter.dropout=1.5", "adapter.dropout"),
    ("model.dtype=int8", "model.dtype"),
    ("nosection.x=1", "nosection.x"),
    ("train.steps", "train.steps"),
    ("cluster.use_gpu=maybe", "cluster.use_gpu"),
    ("posterior.min_members=9", "posterior.min_members"),
    ("cluster.max_concurrent_members=-1", "cluster.max_concurrent_members"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError, match=r"must be one of \[.*'ensemble'.*'map'"):
        load_config(None, ["posterior.method=nope"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.steps=11", "output.dir=x"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="train: must be a mapping"):
        config_from_dict({"train": [1, 2]})


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_name_their_launch_command(path):
    if path.name.endswith("_space.yaml"):  # a Tune search space over dotted fields, not a run config
        from rayblora.workflows.sweeps.space import load_space

        assert load_space(path)
    else:
        load_config(path)
    header = path.read_text().splitlines()[:6]
    assert header[0].startswith("#")
    assert any("ray job submit" in line or "serve run" in line or "rayblora" in line for line in header)
