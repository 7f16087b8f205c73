"""The config convention every stage follows, and the one error type the CLI turns into a one-line message.

A stage is a dataclass `<Stage>Config` (each field's `help` metadata is its `--help` text) and `run(config)`.
`configs/<stage>.yaml` holds exactly the dataclass fields, flat. On the command line, `--config x.yaml` sets the
values and any `--field value` given on the command line overrides them: the same precedence as TRL's TrlParser.
We build the argparse options ourselves (`add_arguments`) rather than through HfArgumentParser so that
`rlhf --help` and the quick commands do not import transformers and torch.

Values from YAML and from `load_config(**overrides)` are typed by the same annotations (`coerce`): a value of the
wrong type is a one-line UserError naming the file and the key (`ppo.steps` inside a section).

A config that runs other stages (the loop) holds one *section* per stage (`section(...)`): a mapping of that
stage's own options, merged over the stage's defaults. In YAML it is a nested mapping whose keys are checked
against the stage's dataclass; on the command line it is `--<section>.<option> value` (e.g. `--ppo.learning_rate
1e-5`). Options the running config sets itself (a stage's model, data and output paths) are not in a section.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def rlhf_home() -> Path:
    """Where the model cache and the default store live: $RLHF_HOME, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_HOME") or Path.home() / ".cache" / "rlhf")


class UserError(Exception):
    """Bad input from the user (a file, a flag, a missing package): the CLI prints it as one line and exits 2."""


def resume_checkpoint(output_dir: str, resume: str) -> str | None:
    """A stage's `resume` option as a checkpoint directory: '' / no -> None; latest / yes -> the newest
    output_dir/checkpoint-N (None when there is none yet); else that path, which must hold a checkpoint."""
    if not resume or resume.lower() in ("false", "no"):
        return None
    if resume.lower() in ("latest", "true", "yes"):
        found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                 and (p / "trainer_state.json").is_file()]
        return str(max(found, key=lambda p: int(p.name.split("-")[-1]))) if found else None
    if not (Path(resume) / "trainer_state.json").is_file():
        raise UserError(f"no checkpoint at {resume} (expected a checkpoint-N directory with trainer_state.json)")
    return resume


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text becomes its `--help` line (HfArgumentParser reads `metadata['help']`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def section(stage: str, help: str, defaults: dict[str, Any], fixed: tuple[str, ...],
            check_with: dict[str, Any] | None = None) -> Any:
    """A field holding another stage's options: `stage` is "module:ConfigClass", `defaults` the values this config
    gives that stage (merged over the stage's own defaults), `fixed` the options this config sets itself, and
    `check_with` stand-ins for those of them the stage cannot be checked without (the section is checked early,
    before the values it will run with exist)."""
    return field(defaults, help, section=stage, fixed=tuple(fixed), check_with=dict(check_with or {}))


# ---------------------------------------------------------------- value types, from the dataclass annotations
# YAML and `load_config(**overrides)` hand over values of any type; argparse types only the command line's.

# PyYAML reads YAML 1.1, where 1e-5 (no dot) is a string, not a float: such a string is taken where a number belongs.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_PLURAL = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}


class _WrongType(Exception):
    """A value that does not fit its annotation; the message is what was expected."""


def _expected(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("empty" if a is type(None) else _expected(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        return "a list of " + (_PLURAL.get(args[0], _expected(args[0])) if args else "values")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(kind, getattr(kind, "__name__", str(kind)))


def _shown(value: Any) -> str:
    if value is None:
        return "an empty value"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def coerce(kind: Any, value: Any) -> Any:
    """`value` as the annotation `kind` (str, int, float, bool, Literal, list[X], X | None, dict) wants it, or
    _WrongType. An int is taken for a float (and becomes one), a path for a string; a bool is never an int, and a
    NaN or an infinity is no number here (a NaN passes every range check in __post_init__)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(option, value)
            except _WrongType:
                pass
    elif origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            try:
                return [coerce(args[0], v) for v in value] if args else list(value)
            except _WrongType:
                pass
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif kind is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    elif kind is dict:
        if isinstance(value, dict):
            return value
    else:
        return value  # an annotation this module does not check
    raise _WrongType(_expected(kind))


def _type_problem(hints: dict[str, Any], key: str, value: Any, name: str) -> str:
    """The one line for a value of the wrong type: its key as written (`name`), what was expected, what came."""
    hint = " (quote it in YAML to make it text)" if hints[key] is str and isinstance(value, (bool, int, float)) else ""
    return f"{name}: expected {_expected(hints[key])}, got {_shown(value)}{hint}"


def typed_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` (options of `cls`, sections left as they are) typed by the annotations; ValueError on the first
    one of the wrong type, naming its key."""
    hints, out = typing.get_type_hints(cls), dict(values)
    for key, value in values.items():
        if key in hints and hints[key] is not dict:
            try:
                out[key] = coerce(hints[key], value)
            except _WrongType:
                raise ValueError(_type_problem(hints, key, value, key)) from None
    return out


def section_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "section" in f.metadata]


def section_class(f: dataclasses.Field) -> type:
    module, name = f.metadata["section"].split(":")
    return getattr(importlib.import_module(module), name)


def section_options(f: dataclasses.Field) -> list[dataclasses.Field]:
    """The stage's fields that a section may set: all but the ones the running config sets itself."""
    return [g for g in dataclasses.fields(section_class(f)) if g.name not in f.metadata["fixed"]]


def _section_problem(f: dataclasses.Field, values: Any, owner: str) -> str | None:
    if not isinstance(values, dict):
        return f"{f.name}: expected a mapping of {section_class(f).__name__} options, got {_shown(values)}"
    fixed = sorted(set(values) & set(f.metadata["fixed"]))
    if fixed:
        return f"{f.name}: {', '.join(fixed)} is set by {owner} itself, not in the {f.name} section"
    unknown = sorted(map(str, set(values) - {g.name for g in section_options(f)}))
    if unknown:
        return f"{f.name}: unknown option(s) {', '.join(unknown)} for {section_class(f).__name__}"
    hints, typed = typing.get_type_hints(section_class(f)), {}
    for key, value in values.items():
        try:
            typed[key] = coerce(hints[key], value)
        except _WrongType:
            return _type_problem(hints, key, value, f"{f.name}.{key}")
    try:  # the stage's own checks, before a long run reaches that stage
        section_class(f)(**{**typed, **f.metadata["check_with"]})
    except (ValueError, TypeError) as e:
        return f"{f.name}: {e}"
    return None


def check_sections(config: Any) -> None:
    """Every section of `config` names only options of its stage (ValueError otherwise, as __post_init__ raises)."""
    for f in section_fields(type(config)):
        problem = _section_problem(f, getattr(config, f.name), type(config).__name__)
        if problem:
            raise ValueError(problem)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, except that a key given twice in one mapping is an error (PyYAML keeps the last one
    silently: the earlier value, the one the user may be looking at, would not be used)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` then a key of its own overrides a default: that is no repeat
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the loader itself refuses it, with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a flat YAML config and check its keys against `cls`; an unknown key is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it: {e.strerror or e}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - known))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)} for {cls.__name__} "
                        f"(known: {', '.join(sorted(known))})")
    for f in section_fields(cls):
        problem = _section_problem(f, values[f.name], cls.__name__) if f.name in values else None
        if problem:
            raise UserError(f"{path}: {problem}")
    try:
        return typed_values(cls, values)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Build `cls` from a YAML file and keyword overrides (the Python-side twin of `rlhf <stage> --config`)."""
    values = read_yaml(path, cls) if path else {}
    values.update(overrides)
    return make_config(cls, values)


def make_config(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate a config; a failed cross-field check (ValueError in __post_init__) becomes a UserError. A
    section's values are merged over the section's defaults, key by key."""
    unknown = sorted(map(str, set(values) - {f.name for f in dataclasses.fields(cls)}))
    if unknown:
        raise UserError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
    values = dict(values)
    for f in section_fields(cls):
        if isinstance(values.get(f.name), dict):
            values[f.name] = {**f.default_factory(), **values[f.name]}  # type: ignore[misc]
    try:
        return cls(**typed_values(cls, values))
    except (ValueError, TypeError) as e:
        raise UserError(f"{cls.__name__}: {e}") from None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_option(parser, f: dataclasses.Field, kind: Any, name: str, default: Any) -> None:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")  # argparse formats %
    opts: dict[str, Any] = {"help": help_text, "default": None}
    if kind is bool:
        opts.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
    elif origin is typing.Literal:
        opts.update(type=type(args[0]), choices=list(args))
    elif origin is list:
        opts.update(type=args[0] if args else str, nargs="+")
    else:
        opts.update(type=kind)
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **opts)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--name` option per dataclass field, typed from its annotation, with its help metadata; a section adds
    `--section.option` for each option of its stage, in a group of its own.

    Supported annotations: str, int, float, bool (`--flag` or `--flag false`), `X | None`, Literal[...] (choices),
    list[X] (one or more values). Defaults are left to the dataclass: an option not given is None here.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            continue
        _add_option(parser, f, hints[f.name], f.name, _default(f))
    for f in section_fields(cls):
        stage = section_class(f)
        fixed = ", ".join(f.metadata["fixed"])
        group = parser.add_argument_group(f"{f.name} options",
                                          f"{f.metadata['help']} Not here, since {cls.__name__} sets them: {fixed}.")
        stage_hints, given = typing.get_type_hints(stage), _default(f)
        for g in section_options(f):
            _add_option(group, g, stage_hints[g.name], f"{f.name}.{g.name}", given.get(g.name, _default(g)))


def from_args(cls: type[T], args: argparse.Namespace, config_path: str | None = None) -> T:
    """The config: dataclass defaults, then the YAML file's values, then the options given on the command line."""
    values = read_yaml(config_path, cls) if config_path else {}
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            given = {g.name: getattr(args, f"{f.name}.{g.name}") for g in section_options(f)
                     if getattr(args, f"{f.name}.{g.name}", None) is not None}
            if given or f.name in values:
                values[f.name] = {**(values.get(f.name) or {}), **given}
        elif getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return make_config(cls, values)
