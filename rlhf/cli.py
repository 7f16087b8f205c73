"""`rlhf`: one entry point, one subcommand per stage. `rlhf COMMAND --help` lists a command's options.

Stage commands take `--config configs/<stage>.yaml` and then `--field value` overrides; the options are the
fields of the stage's dataclass, so `--help` and the YAML keys never drift apart. Only the chosen command's
module is imported (they pull in torch and transformers, ~2 s), so `rlhf --help` answers at once.
"""

from __future__ import annotations

import argparse
import re
import sys

from rlhf.config import UserError, add_arguments, from_args
from rlhf.console import quiet_libraries

# (command, one-line help, module, config class, entry function), in the order of the loop. Only the chosen
# command's module is imported.
STAGES = [
    ("sample", "Sample responses from a model for a few prompts and print them.", "rlhf.sample", "SampleConfig", "run"),
    ("demo", "The main job: a round of the loop with DPO and PPO on the embedded SmolLM2-135M (sentiment), report.",
     "rlhf.loop", "LoopConfig", "demo"),
    ("loop", "Rounds of generate -> label -> export -> DPO / reward + PPO -> evaluate; resumes where it stopped.",
     "rlhf.loop", "LoopConfig", "run"),
    ("rounds", "The rounds of the loop runs recorded in a store: labeling progress, reward model, win-rates, reports.",
     "rlhf.rounds", "RoundsConfig", "run"),
    ("sft", "Instruction fine-tuning on demonstrations (TRL's SFTTrainer); writes a model directory.",
     "rlhf.sft", "SFTConfig", "run"),
    ("generate", "Sample candidates from a policy into the store and pair them into labeling tasks.",
     "rlhf.generate", "GenerateConfig", "run"),
    ("label-sim", "Vote on open tasks as a simulated annotator (gold function + Bradley-Terry noise).",
     "rlhf.annotators", "LabelSimConfig", "label_sim"),
    ("label", "Start the labeling app (Gradio): annotators compare pairs or rank several; an arena; an admin page.",
     "labeling_ui.app", "LabelConfig", "launch"),
    ("reward", "Train a reward model on preference pairs (TRL's RewardTrainer); writes a model directory + "
     "metrics.json.",
     "rlhf.reward", "RewardConfig", "run"),
    ("dpo", "Align a policy on preference pairs with DPO (TRL's DPOTrainer); writes a model directory.",
     "rlhf.dpo", "DPOConfig", "run"),
    ("kto", "Align a policy on responses rated good or bad with KTO (TRL's KTOTrainer); writes a model directory.",
     "rlhf.kto", "KTOConfig", "run"),
    ("ppo", "Align a policy with PPO against a reward model or a reward function (our own, on accelerate).",
     "rlhf.ppo", "PPOConfig", "run"),
    ("evaluate", "Aligned vs base: win-rates (gold, reward model), KL, lengths; report.html.",
     "rlhf.evaluate", "EvaluateConfig", "run"),
]
STAGE_COMMANDS = [(name, help) for name, help, *_ in STAGES]
ALIASES = {"eval": "evaluate"}


def _stage(command: str, attribute: str):
    """The config class (attribute 3) or entry function (4) of a stage command, importing only its module."""
    import importlib

    row = next(r for r in STAGES if r[0] == command)
    try:
        module = importlib.import_module(row[2])
    except ModuleNotFoundError as e:
        if not e.name or e.name.split(".")[0] in ("rlhf", "labeling_ui"):
            raise  # our own module missing is a broken install or a bug: keep the traceback
        raise UserError(f"this command needs the Python package {e.name.split('.')[0]!r}, which is not installed "
                        f"(pip install {e.name.split('.')[0]})") from None
    return getattr(module, row[attribute])


# The options naming where a stage writes. Checked before the stage runs: it would otherwise find an unwritable
# directory only when it saves, after all its work. (`rlhf data export` writes at once and says so itself.)
OUTPUT_OPTIONS = ("output_dir", "runs_dir")


def _check_writable(config) -> None:
    """Each output directory of `config` exists as a writable directory or can be made (nothing is left behind)."""
    import tempfile
    from pathlib import Path

    for name in OUTPUT_OPTIONS:
        value = getattr(config, name, None)
        if not value:
            continue
        path = Path(value).expanduser().absolute()
        existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
        if not existing.is_dir():
            raise UserError(f"--{name} {value}: {existing} is not a directory")
        try:
            Path(tempfile.mkdtemp(prefix=".rlhf-write-check-", dir=existing)).rmdir()
        except OSError as e:
            raise UserError(f"--{name} {value}: cannot write in {existing} ({e.strerror or e})") from None


class _UsageError(Exception):
    """A command line argparse refuses (unknown option, a value of the wrong type): one line, exit status 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message} (`{prog} --help` lists the options)")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, except that a refused command line is one line (argparse prints the whole usage first,
    which for a stage is dozens of lines above the error); subcommands' parsers are of this class too. Prefixes of
    long options are refused: `--learning` silently meaning `--learning_rate` today would turn into an error, or
    into another option, the day an option sharing that prefix is added."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise _UsageError(self.prog, message)


# user:password@ in a URL, and libpq's password=... form: a database password must not reach a terminal or a log.
_PASSWORD = re.compile(r"(\b[a-z][\w+.-]*://[^/\s:@]*:)[^\s@]*@|(\bpassword\s*=\s*)[^\s'\"]+", re.IGNORECASE)


def masked(text: str) -> str:
    """`text` with any database password in it replaced by ***."""
    return _PASSWORD.sub(lambda m: f"{m.group(1)}***@" if m.group(1) else f"{m.group(2)}***", text)


def _one_line(text: str) -> str:
    return masked(" ".join(str(text).split()))


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rlhf",
        description="Preference alignment: label pairs in a browser, train a reward model, align with PPO or DPO, "
        "compare aligned and base models. Models, the default store and caches live in $RLHF_HOME "
        "(default ~/.cache/rlhf).",
    )
    parser.add_argument("--verbose", action="store_true", help="Also show the libraries' own progress bars, "
                        "per-step logs and deprecation warnings (RLHF_VERBOSE=1 does the same).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("models", help="The embedded default model and the model cache.",
                       description="Manage the model cache in $RLHF_HOME/models.")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION")
    pull = msub.add_parser("pull", help="Convert the embedded smollm2-135m-instruct into the cache (once).")
    pull.add_argument("--force", action="store_true", help="Convert again even if the cache has it.")
    msub.add_parser("list", help="Show the models in the cache.")

    d = sub.add_parser("data", help="Import prompts and preferences, export training data, annotator statistics.",
                       description="The preference store's data: import, export (TRL format), stats.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    from rlhf.data import ExportConfig, ImportConfig, StatsConfig

    for action, cls, help in [
        ("import", ImportConfig, "Import prompts (JSONL/CSV) or preferences (TRL format, HH-RLHF, a tasks dump)."),
        ("export", ExportConfig, "Export votes as TRL preference data: train/test split by prompt, ties apart."),
        ("stats", StatsConfig, "Annotator counts, speed, agreement (kappa, alpha), position and length bias."),
    ]:
        p = dsub.add_parser(action, help=help, description=help)
        p.add_argument("--config", default=None, help="YAML file of this command's options (flat keys); options "
                       "given on the command line override it.")
        add_arguments(p, cls)
        p.set_defaults(data_config=cls)

    a = sub.add_parser("annotators", help="Annotator accounts for the labeling app.",
                       description="Annotator accounts in the store (credentials are stored hashed).")
    asub = a.add_subparsers(dest="annotators_command", metavar="ACTION")
    add = asub.add_parser("add", help="Create an account and print its credential once.")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="Give the account the admin role.")
    add.add_argument("--db", default="", help="Database URL ('' = sqlite under $RLHF_HOME).")
    lst = asub.add_parser("list", help="List the accounts.")
    lst.add_argument("--db", default="", help="Database URL ('' = sqlite under $RLHF_HOME).")

    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen = ALIASES.get(chosen, chosen)
    for name, help in STAGE_COMMANDS:
        aliases = [a for a, target in ALIASES.items() if target == name]
        p = sub.add_parser(name, help=help, description=help, aliases=aliases)
        if name == chosen:
            p.add_argument("--config", default=None, help="YAML file of this command's options (flat keys); "
                           "options given on the command line override it.")
            p.add_argument("--verbose", action="store_true", help="Also show the libraries' own progress bars, "
                           "per-step logs and deprecation warnings.")
            add_arguments(p, _stage(name, 3))
    return parser


def _models(args: argparse.Namespace) -> None:
    from rlhf import models

    if args.models_command == "pull":
        print(models.pull_default(force=args.force))
    elif args.models_command == "list":
        rows = models.list_cached()
        if not rows:
            print(f"The cache {models.rlhf_home() / 'models'} is empty; `rlhf models pull` fills it.")
        for row in rows:
            state = "" if row["complete"] else "  (incomplete)"
            print(f"{row['name']:<32} {row['size_mb']:>8.1f} MB  {row['path']}{state}")
    else:
        raise UserError("say which: rlhf models pull | rlhf models list")


def _data(args: argparse.Namespace) -> None:
    from rlhf import data

    if getattr(args, "data_config", None) is None:
        raise UserError("say which: rlhf data import | export | stats")
    config = from_args(args.data_config, args, args.config)
    {"import": data.run_import, "export": data.run_export, "stats": data.run_stats}[args.data_command](config)


def _printable(text: str) -> str:
    """A stored name as a terminal line: control characters (a newline, an escape sequence that moves the cursor
    or hides text: an imported account can be named anything) shown escaped, not acted on."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _annotators(args: argparse.Namespace) -> None:
    from rlhf.store import Store

    if args.annotators_command == "add":
        store = Store(args.db or None)
        credential = store.add_annotator(args.name, role="admin" if args.admin else "annotator")
        print(f"created {'admin' if args.admin else 'annotator'} {args.name!r} in {masked(store.url)}")
        print(f"credential (shown once, store it now): {credential}")
    elif args.annotators_command == "list":
        for a in Store(args.db or None).list_annotators():
            flags = [a.role] + (["inactive"] if not a.active else []) + (["simulated"] if a.simulated else [])
            print(f"{_printable(a.name):<32} {', '.join(flags)}")
    else:
        raise UserError("say which: rlhf annotators add NAME | rlhf annotators list")


def _sample(config) -> None:
    from rlhf.sample import run

    for result in run(config):
        print(f"### {result['prompt']}")
        print(result["text"])
        suffix = "" if result["ended_with_eos"] else ", cut at max_new_tokens"
        print(f"({result['new_tokens']} tokens{suffix})\n")


def _os_error(e: OSError) -> str:
    """An OSError from a stage (an unwritable output directory, a full disk) as one line, with the path."""
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a UserError, a refused command line, an OSError such as an unwritable path)
    prints one line and returns 2; Ctrl+C one line and 130. Anything else is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Anywhere on the line (`rlhf --verbose demo`, `rlhf demo --verbose`), and before any library is imported.
    quiet_libraries(True if "--verbose" in argv else None)
    argv = [a for a in argv if a != "--verbose"]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        action = getattr(args, f"{args.command}_command", None) if args.command else None
        command = f"{args.command} {action}" if action else args.command
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "models":
            _models(args)
            return 0
        if args.command == "data":
            _data(args)
            return 0
        if args.command == "annotators":
            _annotators(args)
            return 0
        command = ALIASES.get(args.command, args.command)
        config = from_args(_stage(command, 3), args, args.config)
        _check_writable(config)
        if command == "sample":
            _sample(config)
        else:
            _stage(command, 4)(config)
        return 0
    except _UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    except UserError as e:
        print(_one_line(f"rlhf {command}: error: {e}"), file=sys.stderr)
        return 2
    except OSError as e:
        print(_one_line(f"rlhf {command}: error: {_os_error(e)}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhf {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under `accelerate launch`, tear the process group down before the interpreter does: gloo's worker threads
    left to interpreter shutdown abort the process (SIGABRT, "terminate called without an active exception") after
    a run that finished and saved, which the launcher reports as a failed run."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
