"""The `rlhf` entry point: help for every command, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf.cli import STAGE_COMMANDS, main


def rlhf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    out = rlhf("--help")
    assert out.returncode == 0
    for name, _ in STAGE_COMMANDS + [("models", "")]:
        assert name in out.stdout


@pytest.mark.parametrize("command", [name for name, _ in STAGE_COMMANDS])
def test_every_stage_has_help_with_its_options_and_config(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "(default:" in out


def test_bad_config_file_is_one_line(tmp_path, capsys):
    assert main(["sample", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config file not found" in err


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["data", "export", "--round", "abc"], "rlhf data export: error: argument --round: invalid int value: 'abc'"),
    (["sample", "--n", "[1]"], "rlhf sample: error: argument --n: invalid int value"),
    (["dpo", "--lora", "maybe"], "argument --lora: expected true or false, got 'maybe'"),
    (["ppo", "--kl_estimator", "k2"], "invalid choice: 'k2' (choose from 'k1', 'k3')"),
    (["loop", "--ppo.steps", "x"], "invalid int value: 'x'"),
    (["sample", "--no-such-option", "1"], "unrecognized arguments: --no-such-option 1"),
    (["annotators", "add"], "the following arguments are required: name"),
])
def test_a_refused_command_line_is_one_line_and_status_2(argv, expected, capsys):
    """argparse would print the whole usage (dozens of lines for a stage) above its error."""
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert expected in err and "--help" in err


def test_annotators_add_does_not_print_the_database_password(tmp_path, capsys, monkeypatch):
    from rlhf import store as store_module

    url = "postgresql+psycopg2://rlhf:s3cret-pw@127.0.0.1:5432/rlhf"

    class FakeStore:  # the printed lines, without a PostgreSQL server
        def __init__(self, db):
            self.url = db

        def add_annotator(self, name, role):
            return "credential-xyz"

    monkeypatch.setattr(store_module, "Store", FakeStore)
    assert main(["annotators", "add", "alice", "--db", url]) == 0
    out = capsys.readouterr().out
    assert "s3cret-pw" not in out and "rlhf:***@127.0.0.1:5432/rlhf" in out and "credential-xyz" in out


def test_masked_hides_passwords_in_urls_and_libpq_strings():
    from rlhf.cli import masked

    assert masked("in postgresql://u:p%40ss/w@db.host:5432/x now") == "in postgresql://u:***@db.host:5432/x now"
    assert masked("connect: host=h user=u password=hunter2 dbname=x") == "connect: host=h user=u password=*** dbname=x"
    for kept in ("sqlite:///runs/a:b.db", "postgresql://u@host/db", "http://127.0.0.1:7860/"):
        assert masked(kept) == kept


def test_errors_from_a_stage_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    from rlhf import data
    from rlhf.config import UserError

    def unwritable(config):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(data, "run_export", unwritable)
    assert main(["data", "export", "--db", f"sqlite:///{tmp_path / 's.db'}"]) == 2
    assert _one_line_error(capsys) == f"rlhf data export: error: Permission denied: {tmp_path / 'out'}"

    def leaky(config):
        raise UserError("cannot open postgresql://u:pw@h/db:\n  FATAL: password authentication failed")

    monkeypatch.setattr(data, "run_export", leaky)
    assert main(["data", "export"]) == 2
    assert _one_line_error(capsys) == ("rlhf data export: error: cannot open postgresql://u:***@h/db: FATAL: password "
                                       "authentication failed")

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "run_export", interrupted)
    assert main(["data", "export"]) == 130
    assert _one_line_error(capsys) == "rlhf data export: interrupted"

    def bug(config):
        raise KeyError("a bug")

    monkeypatch.setattr(data, "run_export", bug)
    with pytest.raises(KeyError):
        main(["data", "export"])


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("round: abc\n")
    out = rlhf("data", "export", "--round", "x")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "invalid int value" in out.stderr
    out = rlhf("sample", "--config", str(bad))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "unknown key(s) round" in out.stderr


def test_data_commands_take_a_config_file(tmp_path, capsys):
    (tmp_path / "export.yaml").write_text("round: abc\n")
    assert main(["data", "export", "--config", str(tmp_path / "export.yaml")]) == 2
    assert _one_line_error(capsys).endswith("export.yaml: round: expected an integer, got str 'abc'")


@pytest.mark.parametrize("stage", ["dpo", "reward", "sft", "ppo", "evaluate"])
def test_an_unwritable_output_dir_is_refused_before_the_stage_runs(stage, tmp_path, capsys, monkeypatch):
    from rlhf import cli

    monkeypatch.setattr(cli, "_stage", lambda command, attribute, real=cli._stage: (
        real(command, 3) if attribute == 3 else pytest.fail("the stage ran")))
    extra = ["--aligned", "x"] if stage == "evaluate" else []
    assert main([stage, "--output_dir", "/proc/rlhf-out", *extra]) == 2
    assert "--output_dir /proc/rlhf-out: cannot write in /proc" in _one_line_error(capsys)
    (tmp_path / "a-file").write_text("x")
    assert main([stage, "--output_dir", str(tmp_path / "a-file" / "out"), *extra]) == 2
    assert f"{tmp_path / 'a-file'} is not a directory" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # the check leaves nothing behind


def test_a_missing_package_is_one_line_and_a_missing_module_of_ours_a_traceback(tmp_path, monkeypatch):
    from rlhf import cli
    from rlhf.config import UserError

    (tmp_path / "stage_needing_a_package.py").write_text("import no_such_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "STAGES", [("fake", "", "stage_needing_a_package", "Config", "run"),
                                        ("broken", "", "rlhf.no_such_module", "Config", "run")])
    with pytest.raises(UserError, match="needs the Python package 'no_such_package_xyz'.*pip install"):
        cli._stage("fake", 3)
    with pytest.raises(ModuleNotFoundError):
        cli._stage("broken", 3)


def test_annotators_list_escapes_control_characters_in_names(tmp_path, capsys):
    from rlhf.store import Store, import_tasks

    db = f"sqlite:///{tmp_path / 's.db'}"
    import_tasks(Store(db), [{"record": "annotator", "name": "eve\x1b[2J\nroot admin"}])
    assert main(["annotators", "list", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("\n") == 1 and "eve\\x1b[2J\\nroot admin" in out


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["sft", "--epochs", "many"], 2)])
def test_a_launched_command_closes_its_process_group(argv, status, tmp_path):
    """Under `accelerate launch` each process holds a gloo group; left to interpreter shutdown, its threads abort a
    process whose run had finished (SIGABRT, seen in CI as a failed 2-process SFT). `main` closes it, on success and
    on error alike."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if argv == ["--help"]:
            with pytest.raises(SystemExit):
                main(argv)
        else:
            assert main(argv) == status
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
