"""The config convention: every configs/<stage>.yaml matches its dataclass exactly; YAML and flags combine."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from rlhf.config import UserError, add_arguments, from_args, load_config, read_yaml
from rlhf.sample import SampleConfig

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))


def config_class_for(stem: str) -> type:
    module = importlib.import_module(f"rlhf.{stem}")
    wanted = stem.replace("_", "").lower() + "config"
    matches = [v for k, v in vars(module).items() if k.lower() == wanted and dataclasses.is_dataclass(v)]
    assert matches, f"configs/{stem}.yaml has no dataclass {wanted!r} in rlhf/{stem}.py"
    return matches[0]


def test_there_are_configs():
    assert any(p.stem == "sample" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_yaml_keys_equal_dataclass_fields(path):
    cls = config_class_for(path.stem)
    keys = set(yaml.safe_load(path.read_text()))
    fields = {f.name for f in dataclasses.fields(cls)}
    assert keys - fields == set(), f"unknown keys in {path.name}"
    assert fields - keys == set(), f"{path.name} lacks keys (every field is spelled out)"
    load_config(cls, path)  # and the values pass the dataclass's own checks


def test_unknown_key_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_new_tokens: 8\nmax_new_tokenz: 9\n")
    with pytest.raises(UserError, match="unknown key.*max_new_tokenz"):
        read_yaml(bad, SampleConfig)


def test_non_mapping_and_broken_yaml_are_clear_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        read_yaml(tmp_path / "list.yaml", SampleConfig)
    with pytest.raises(UserError, match="not valid YAML"):
        read_yaml(tmp_path / "broken.yaml", SampleConfig)


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("max_new_tokens: 8\ntemperature: 0.5\nprompt: [one, two]\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, SampleConfig)
    args = parser.parse_args(["--temperature", "0", "--top-p", "0.5"])
    config = from_args(SampleConfig, args, str(cfg))
    assert config.max_new_tokens == 8  # from YAML
    assert config.temperature == 0.0  # flag beats YAML
    assert config.top_p == 0.5  # flag, dashed spelling
    assert config.prompt == ["one", "two"]
    assert config.seed == SampleConfig().seed  # default


def test_cross_field_check_is_a_user_error():
    with pytest.raises(UserError, match="SampleConfig"):
        load_config(SampleConfig, n=0)


def test_bool_and_literal_flags():
    @dataclasses.dataclass
    class Demo:
        flag: bool = dataclasses.field(default=False, metadata={"help": "a flag"})
        mode: "typing.Literal['a', 'b']" = dataclasses.field(default="a", metadata={"help": "a mode"})  # noqa: F821

    import typing  # noqa: F401  (resolves the string annotation above)

    Demo.__annotations__["mode"] = typing.Literal["a", "b"]
    parser = argparse.ArgumentParser()
    add_arguments(parser, Demo)
    assert parser.parse_args(["--flag"]).flag is True
    assert parser.parse_args(["--flag", "false"]).flag is False
    assert parser.parse_args(["--mode", "b"]).mode == "b"
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--flag", "maybe"])
