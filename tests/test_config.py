"""The config convention: every configs/<stage>.yaml matches its dataclass exactly; YAML and flags combine."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import typing
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
        mode: typing.Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "a mode"})

    parser = argparse.ArgumentParser()
    add_arguments(parser, Demo)
    assert parser.parse_args(["--flag"]).flag is True
    assert parser.parse_args(["--flag", "false"]).flag is False
    assert parser.parse_args(["--mode", "b"]).mode == "b"
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--flag", "maybe"])


# ---------------------------------------------------------------- sections: a config holding other stages' options


def test_every_section_of_every_yaml_matches_its_stage():
    from rlhf.config import section_class, section_fields, section_options

    checked = 0
    for path in CONFIGS:
        cls = config_class_for(path.stem)
        values = yaml.safe_load(path.read_text())
        for f in section_fields(cls):
            allowed = {g.name for g in section_options(f)}
            assert set(values[f.name]) <= allowed, (path.name, f.name, set(values[f.name]) - allowed)
            assert dataclasses.is_dataclass(section_class(f))
            checked += 1
    assert checked >= 7  # the loop's generate, label_sim, export, dpo, reward, ppo, evaluate


def test_loop_yaml_is_the_demo_defaults():
    from rlhf.loop import LoopConfig

    assert load_config(LoopConfig, Path(__file__).parent.parent / "configs" / "loop.yaml") == LoopConfig()


def test_the_loop_declares_no_stage_option_of_its_own():
    """The loop's fields are its own options and the few it sets in every stage that has them (so each stage's
    section cannot set those): no stage option is copied under the loop's name."""
    from rlhf.config import section_class, section_fields
    from rlhf.loop import LoopConfig

    # evaluate's db is a store of arena votes to report, which the loop leaves to the user (the loop's own store
    # holds labeling tasks): the same name, not the same option.
    not_shared = {("evaluate", "db")}
    sections = section_fields(LoopConfig)
    own = {f.name for f in dataclasses.fields(LoopConfig)} - {f.name for f in sections}
    for f in sections:
        stage_fields = {g.name for g in dataclasses.fields(section_class(f))}
        shared = {name for name in own & stage_fields if (f.name, name) not in not_shared}
        assert shared <= set(f.metadata["fixed"]), (f.name, shared - set(f.metadata["fixed"]))
    assert not any(name.startswith(("dpo_", "ppo_", "reward_", "eval_", "generate_")) for name in own)


def test_sections_merge_over_defaults_from_yaml_and_flags(tmp_path):
    from rlhf.loop import LoopConfig

    cfg = tmp_path / "loop.yaml"
    cfg.write_text("rounds: 2\nppo:\n  steps: 3\n  cliprange: 0.1\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, LoopConfig)
    args = parser.parse_args(["--ppo.learning_rate", "1e-5", "--dpo.beta", "0.3", "--ppo.steps", "4"])
    config = from_args(LoopConfig, args, str(cfg))
    defaults = LoopConfig()
    assert config.rounds == 2
    assert config.ppo == {**defaults.ppo, "steps": 4, "cliprange": 0.1, "learning_rate": 1e-5}  # flag beats YAML
    assert config.dpo == {**defaults.dpo, "beta": 0.3}
    assert config.reward == defaults.reward
    assert isinstance(config.ppo["learning_rate"], float)  # typed from PPOConfig's annotation


def test_a_bad_section_is_a_clear_error(tmp_path):
    from rlhf.loop import LoopConfig

    (tmp_path / "unknown.yaml").write_text("ppo:\n  learning_rat: 1.0e-5\n")
    with pytest.raises(UserError, match=r"unknown.yaml: ppo: unknown option\(s\) learning_rat for PPOConfig"):
        read_yaml(tmp_path / "unknown.yaml", LoopConfig)
    (tmp_path / "fixed.yaml").write_text("dpo:\n  output_dir: elsewhere\n")
    with pytest.raises(UserError, match="dpo: output_dir is set by LoopConfig itself"):
        read_yaml(tmp_path / "fixed.yaml", LoopConfig)
    (tmp_path / "flat.yaml").write_text("ppo: 3\n")
    with pytest.raises(UserError, match="ppo: expected a mapping of PPOConfig options"):
        read_yaml(tmp_path / "flat.yaml", LoopConfig)
    with pytest.raises(UserError, match="LoopConfig: ppo: batch_size must be a multiple of mini_batch_size"):
        load_config(LoopConfig, ppo={"batch_size": 6})  # the stage's own check, before the loop starts


def test_loop_help_lists_each_stage_option_with_the_loop_default(capsys):
    from rlhf.cli import main

    with pytest.raises(SystemExit):
        main(["loop", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "ppo options" in out and "--ppo.learning_rate PPO.LEARNING_RATE" in out
    assert "AdamW learning rate (policy and critic). (default: 0.0014)" in out  # the loop's value, not PPOConfig's
    assert "--dpo.beta" in out and "--evaluate.prompt_baselines" in out
    assert "--ppo.output_dir" not in out and "--dpo.model" not in out  # the loop sets those


# ---------------------------------------------------------------- value types: every key of every config


def _wrong_value(kind) -> object:
    """A value of the wrong type for an annotation: text for a number or a flag, a list for text, a mapping for a
    list (and a number for a Literal of names)."""
    origin = typing.get_origin(kind)
    if kind in (int, float) or kind is bool:
        return "abc" if kind is not bool else "maybe"
    if kind is str:
        return ["a", "b"]
    if origin is list:
        return {"a": 1}
    if origin is typing.Literal:
        return 3
    return 3  # a section: a number where a mapping belongs


def _every_key():
    for path in CONFIGS:
        cls = config_class_for(path.stem)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield pytest.param(cls, f.name, None, _wrong_value(hints[f.name]), id=f"{path.stem}.{f.name}")
            if "section" in f.metadata:
                from rlhf.config import section_class, section_options

                stage_hints = typing.get_type_hints(section_class(f))
                for g in section_options(f):
                    yield pytest.param(cls, f.name, g.name, _wrong_value(stage_hints[g.name]),
                                       id=f"{path.stem}.{f.name}.{g.name}")


@pytest.mark.parametrize("cls, key, option, value", list(_every_key()))
def test_a_value_of_the_wrong_type_is_one_line_naming_the_file_and_key(tmp_path, cls, key, option, value):
    name = f"{key}.{option}" if option else key
    written = {key: {option: value}} if option else {key: value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(written))
    with pytest.raises(UserError) as error:
        load_config(cls, path)
    message = str(error.value)
    assert message.startswith(f"{path}: {name}: expected") or (not option and "expected a mapping" in message)
    assert "\n" not in message
    with pytest.raises(UserError) as error:  # the same value from Python
        load_config(cls, **written)
    assert f"{name}: expected" in str(error.value) and "\n" not in str(error.value)


def test_values_are_typed_by_the_annotations(tmp_path):
    from rlhf.data import ExportConfig
    from rlhf.dpo import DPOConfig
    from rlhf.loop import LoopConfig

    cfg = tmp_path / "dpo.yaml"
    cfg.write_text("learning_rate: 1e-5\nepochs: 2\nbeta: 1\n")  # YAML 1.1 reads 1e-5 as text
    config = load_config(DPOConfig, cfg)
    assert config.learning_rate == 1e-5 and isinstance(config.epochs, float) and isinstance(config.beta, float)
    assert load_config(ExportConfig, out=tmp_path / "x", margins=(0, 1, 2)).out == str(tmp_path / "x")
    assert load_config(ExportConfig, margins=(0, 1, 2)).margins == [0.0, 1.0, 2.0]
    for bad, expected in [(dict(round=True), "round: expected an integer, got bool True"),  # a bool is no int
                          (dict(round=1.0), "round: expected an integer, got float 1.0"),
                          (dict(test_size=float("nan")), "test_size: expected a number, got float nan"),
                          (dict(margins="0 1 2"), "margins: expected a list of numbers, got str '0 1 2'"),
                          (dict(format="csv"), "format must be jsonl or parquet"),
                          (dict(round=None), "round: expected an integer, got an empty value"),
                          (dict(rounds=3), "ExportConfig: unknown option(s) rounds")]:
        with pytest.raises(UserError, match=re.escape(expected)):
            load_config(ExportConfig, **bad)
    (tmp_path / "resume.yaml").write_text("resume: yes\n")
    with pytest.raises(UserError, match="resume: expected a string, got bool True .quote it in YAML"):
        load_config(DPOConfig, tmp_path / "resume.yaml")
    (tmp_path / "loop.yaml").write_text("ppo:\n  learning_rate: 1e-5\n  lora: 1\n")
    with pytest.raises(UserError, match="loop.yaml: ppo.lora: expected true or false, got int 1"):
        load_config(LoopConfig, tmp_path / "loop.yaml")
    with pytest.raises(UserError, match=r"LoopConfig: ppo.steps: expected an integer, got str 'x'"):
        load_config(LoopConfig, ppo={"steps": "x"})


def test_unreadable_yaml_is_one_line(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"system: caf\xe9\n")
    (tmp_path / "keys.yaml").write_text("1: 2\nmax_new_tokens: 8\nzz: 1\n")
    with pytest.raises(UserError, match="latin1.yaml: not UTF-8 text"):
        read_yaml(tmp_path / "latin1.yaml", SampleConfig)
    with pytest.raises(UserError, match="unknown key.*1, zz"):  # keys that are not text sort too
        read_yaml(tmp_path / "keys.yaml", SampleConfig)


def test_a_key_given_twice_and_an_infinity_are_refused(tmp_path):
    from rlhf.dpo import DPOConfig
    from rlhf.loop import LoopConfig

    (tmp_path / "twice.yaml").write_text("beta: 0.1\nseed: 1\nbeta: 0.5\n")
    with pytest.raises(UserError, match=r"twice.yaml: not valid YAML: the key 'beta' is given twice \(line 3\)"):
        read_yaml(tmp_path / "twice.yaml", DPOConfig)
    (tmp_path / "section.yaml").write_text("ppo:\n  steps: 1\n  steps: 2\n")
    with pytest.raises(UserError, match="the key 'steps' is given twice"):
        read_yaml(tmp_path / "section.yaml", LoopConfig)
    # A YAML merge, then a key of the section's own over the merged one: no repeat.
    (tmp_path / "merge.yaml").write_text("generate: &g\n  max_new_tokens: 20\nppo:\n  <<: *g\n  max_new_tokens: 30\n")
    assert read_yaml(tmp_path / "merge.yaml", LoopConfig)["ppo"] == {"max_new_tokens": 30}
    (tmp_path / "unhashable.yaml").write_text("? [a, b]\n: 1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_yaml(tmp_path / "unhashable.yaml", DPOConfig)
    for text in ("beta: 1e400\n", "beta: .inf\n", "beta: -.inf\n"):
        (tmp_path / "inf.yaml").write_text(text)
        with pytest.raises(UserError, match="beta: expected a number"):
            load_config(DPOConfig, tmp_path / "inf.yaml")
