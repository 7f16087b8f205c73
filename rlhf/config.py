"""The config convention every stage follows, and the one error type the CLI turns into a one-line message.

A stage is a dataclass `<Stage>Config` (each field's `help` metadata is its `--help` text) and `run(config)`.
`configs/<stage>.yaml` holds exactly the dataclass fields, flat. On the command line, `--config x.yaml` sets the
values and any `--field value` given on the command line overrides them: the same precedence as TRL's TrlParser. We build the
argparse options ourselves (`add_arguments`) rather than through HfArgumentParser so that `rlhf --help` and the
quick commands do not import transformers and torch (~2 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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


def read_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a flat YAML config and check its keys against `cls`; an unknown key is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)} for {cls.__name__} (known: {', '.join(sorted(known))})")
    return values


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Build `cls` from a YAML file and keyword overrides (the Python-side twin of `rlhf <stage> --config`)."""
    values = read_yaml(path, cls) if path else {}
    values.update(overrides)
    return make_config(cls, values)


def make_config(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate a config; a failed cross-field check (ValueError in __post_init__) becomes a UserError."""
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise UserError(f"{cls.__name__}: {e}") from None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--name` option per dataclass field, typed from its annotation, with its help metadata.

    Supported annotations: str, int, float, bool (`--flag` or `--flag false`), `X | None`, Literal[...] (choices),
    list[X] (one or more values). Defaults are left to the dataclass: an option not given is None here.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            kind = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(kind), typing.get_args(kind)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
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
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        parser.add_argument(*flags, dest=f.name, **opts)


def from_args(cls: type[T], args: argparse.Namespace, config_path: str | None = None) -> T:
    """The config: dataclass defaults, then the YAML file's values, then the options given on the command line."""
    values = read_yaml(config_path, cls) if config_path else {}
    for f in dataclasses.fields(cls):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return make_config(cls, values)
