"""Bad input, table-driven (issue 24): every case is one clear line, and the store is as it was afterwards.

The cases are tables in tests/bad_input_cases.py. Each runs on a fresh copy of one seeded SQLite store (accounts, a
pair, a full pair, a voted pair, a ranking task and an arena task) and asserts, by where the input comes in:
  CLI         `rlhf.cli.main([...])` in-process (a few through `python -m rlhf.cli`): exit status 2, one line on
              stderr, no traceback, the line saying what is wrong;
  store API   a `UserError` (StoreError) whose message is one line;
  app         the built app's event functions, called as functions for a signed-in user: a message for the page,
              no exception;
and then that every table holds the same rows (counts and content) and `PRAGMA integrity_check` is ok.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bad_input_cases import (
    CONFIG_CASES,
    DEAD_PG,
    EXPORT_CASES,
    FLAG_CASES,
    IMPORT_CASES,
    SECRET,
    STORE_CASES,
    TRAINING_DATA_CASES,
    imp,
    with_config,
    xfail,
)

from rlhf.cli import main
from rlhf.config import UserError


def failing_gold(prompts, responses):
    """A gold function (`test_bad_input:failing_gold`) that fails when called."""
    raise RuntimeError("this gold function always fails")


# ---------------------------------------------------------------- the seeded store and its snapshot


def _seed(url: str) -> dict:
    from rlhf.store import Store

    store = Store(url)
    for name, role in [("boss", "admin"), ("alice", "annotator"), ("bob", "annotator"), ("carol", "annotator"),
                       ("exboss", "admin")]:
        store.add_annotator(name, role=role)
    store.set_active("carol", False)
    store.set_active("exboss", False)
    p1, p2, p3 = store.add_prompts(["Write a haiku.", "Name a colour.", "Say hi."])
    r1 = store.add_responses(p1, ["An old pond.", "A frog jumps.", "Splash."], model="m")
    r2 = store.add_responses(p2, ["Red.", "Blue."], model="m")
    r3 = store.add_responses(p3, ["Hi!", "Hello.", "Hey."], model="m")
    ids = {"prompts": [p1, p2, p3], "r1": r1, "r2": r2, "r3": r3}
    ids["pair"] = store.add_task(r2, overlap=3)
    ids["full"] = store.add_task(r3[:2], overlap=1)
    ids["voted"] = store.add_task([r3[0], r3[2]], overlap=3)
    ids["rank"] = store.add_task(r1, kind="rank", overlap=2)
    ids["arena"] = store.add_arena_task([{"role": "user", "content": "Tell a joke."}],
                                        [("Knock knock.", "base", {}), ("Why did the chicken...", "dpo", {})])
    store.submit("bob", ids["full"], "A", strength=3)
    ids["vote"] = store.submit("alice", ids["voted"], "B", strength=1, rationale="shorter")
    store.submit_ranking("bob", ids["rank"], [[2], [0, 1]], shown=[1, 2, 0])
    store.close()
    return ids


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("bad-input") / "seed.db"
    ids = _seed(f"sqlite:///{path}")
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    return path, ids


def snapshot(path: Path) -> tuple[dict, str, str]:
    """Rows per table, a digest of every table's content, and PRAGMA integrity_check."""
    con = sqlite3.connect(path)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        counts, digest = {}, hashlib.sha256()
        for t in tables:
            rows = con.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall()
            counts[t] = len(rows)
            digest.update(repr((t, rows)).encode())
        return counts, digest.hexdigest(), con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


class Ctx:
    """One case's world: its own copy of the seeded store, a folder for its files, the seed's ids."""

    def __init__(self, folder: Path, template: tuple[Path, dict]):
        self.dir = folder
        self.path = folder / "store.db"
        shutil.copy(template[0], self.path)
        self.db = f"sqlite:///{self.path}"
        self.ids = template[1]
        self._store = None
        self.before = snapshot(self.path)

    @property
    def store(self):
        from rlhf.store import Store

        if self._store is None:
            self._store = Store(self.db)
        return self._store

    def folder(self, name: str) -> str:
        (self.dir / name).mkdir(parents=True, exist_ok=True)
        return str(self.dir / name)

    def file(self, name: str, content: str | bytes) -> str:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def close(self):
        if self._store is not None:
            self._store.close()

    def assert_unchanged(self):
        """Checked in the test itself, not in a fixture's teardown, so that an xfail mark covers it too."""
        self.close()
        assert_same(self.before, snapshot(self.path))


def assert_same(before: tuple, after: tuple) -> None:
    counts, digest, integrity = after
    assert integrity == "ok"
    assert counts == before[0], "a refused input changed the row counts"
    assert digest == before[1], "a refused input changed stored rows"


@pytest.fixture
def ctx(tmp_path, template):
    c = Ctx(tmp_path, template)
    yield c
    c.close()


def one_line(text: str) -> str:
    text = text.strip()
    assert text, "no message at all"
    assert "\n" not in text and "Traceback" not in text, text
    return text


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit (before one-line errors landed)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, expected", IMPORT_CASES + EXPORT_CASES + CONFIG_CASES + FLAG_CASES
                         + TRAINING_DATA_CASES)
def test_cli(ctx, capsys, argv, expected):
    code, out, err = run_cli(argv(ctx), capsys)
    line = one_line(err)
    assert code == 2, (code, line)
    assert re.search(expected, line, re.IGNORECASE), line
    assert SECRET not in out + err
    ctx.assert_unchanged()


def test_label_on_a_port_in_use(ctx, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(["label", "--db", ctx.db, "--port", str(port)], capsys)
    assert code == 2 and re.search(rf"port {port}.*in use", one_line(err))
    ctx.assert_unchanged()


# ---------------------------------------------------------------- through a real process


@pytest.mark.parametrize("argv, expected", [
    pytest.param(imp("p.jsonl", b'{"prompt": "caf\xe9"}\n'), r"p.jsonl:1.*UTF-8", id="process-import-not-utf8"),
    pytest.param(with_config(["data", "export"], "round: abc\n"), r"round: expected an integer",
                 id="process-config-wrong-type"),
    pytest.param(lambda c: ["data", "stats", "--db", c.db, "--round", "x"], r"invalid int value",
                 id="process-bad-flag"),
    pytest.param(lambda c: ["data", "export", "--db", c.db, "--out", "/proc/rlhf-export"], r"/proc/rlhf-export",
                 id="process-export-unwritable"),
    pytest.param(lambda c: ["annotators", "list", "--db", DEAD_PG], r"cannot open", id="process-dead-postgres"),
])
def test_a_real_process(ctx, argv, expected):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-m", "rlhf.cli", *argv(ctx)], capture_output=True, text=True, timeout=120,
                         env=env, cwd=ctx.dir)
    line = one_line(out.stderr)
    assert out.returncode == 2 and re.search(expected, line), (out.returncode, line)
    assert SECRET not in out.stdout + out.stderr
    ctx.assert_unchanged()


@pytest.mark.parametrize("call, expected", STORE_CASES)
def test_store_api(ctx, call, expected):
    with pytest.raises(UserError) as error:
        call(ctx.store, ctx.ids)
    message = one_line(str(error.value))
    assert re.search(expected, message, re.IGNORECASE), message
    assert SECRET not in message
    ctx.assert_unchanged()


# ---------------------------------------------------------------- the app's endpoints


@pytest.fixture(scope="module")
def app(tmp_path_factory, template):
    """The built app (not launched) over one store, whose file is put back to the seed before each case."""
    from labeling_ui.app import LabelConfig, build_app
    from rlhf.store import Store

    folder = tmp_path_factory.mktemp("bad-input-app")
    path = folder / "store.db"
    shutil.copy(template[0], path)
    store = Store(f"sqlite:///{path}")
    blocks = build_app(LabelConfig(db=store.url, repeat_share=0.0), store)
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    handlers = {f.fn.__name__: f.fn for f in fns if f.fn is not None}
    return store, path, handlers


@pytest.fixture
def page(app, template):
    """Calls one of the app's event functions as a signed-in user; the store is the seed's, checked afterwards."""
    import gradio as gr

    store, path, handlers = app
    store.engine.dispose()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copy(template[0], path)
    before = snapshot(path)

    def call(name: str, *args, user: str = "alice"):
        return handlers[name](*args, request=gr.Request(username=user))

    def assert_unchanged():
        store.engine.dispose()
        assert_same(before, snapshot(path))

    call.ids, call.store, call.assert_unchanged = template[1], store, assert_unchanged
    return call


def _rank_screen(call, user: str = "alice") -> dict:
    import random

    from rlhf import labeling

    return labeling.next_ranking(call.store, user, None, random.Random(0))


def _app_case(id_: str, run, expected: str, item: int | None = None, owner: str = "APP"):
    marks = [xfail(id_, item, owner)] if item else []
    return pytest.param(run, expected, id=id_, marks=marks)


def _vote(task, choice="left", strength="clear", rationale="", user="alice"):
    """/vote on a seeded task (by its name in the seed's ids) or on whatever `task` is."""
    return lambda p: p("api_vote", p.ids.get(task, task) if isinstance(task, str) else task, True, choice, strength,
                       rationale, user=user)


APP_CASES = [
    _app_case("vote-no-task", _vote(99999), r"task"),
    _app_case("vote-task-id-text", _vote("abc"), r"task"),
    _app_case("vote-choice-maybe", _vote("pair", choice="maybe"), r"Choose"),
    _app_case("vote-choice-a-list", _vote("pair", choice=["left"]), r"Choose"),
    _app_case("vote-strength-very", _vote("pair", strength="very"), r"how sure"),
    _app_case("vote-huge-rationale", _vote("pair", rationale="x" * 200_000), r"Not saved"),
    _app_case("vote-rationale-a-mapping", _vote("pair", rationale={"a": 1}), r"rationale|Not saved"),
    _app_case("vote-on-a-ranking", _vote("rank"), r"rank"),
    _app_case("vote-on-an-arena-task", _vote("arena"), r"arena"),
    _app_case("vote-on-a-full-task", _vote("full"), r"all its votes"),
    _app_case("vote-twice", _vote("voted"), r"already"),
    _app_case("vote-deactivated", _vote("pair", user="carol"), r"deactivated|not active|signed"),
    _app_case("submit-nothing-on-screen", lambda p: p("on_submit", {"task_id": None}, "left", "clear", "")[1],
              r"No task"),
    _app_case("page-submit-huge-rationale", lambda p: p("on_submit", {"task_id": p.ids["pair"], "left_is_a": True},
                                                   "left", "clear", "x" * 200_000)[1], r"Not saved"),
    _app_case("rank-twice-the-same", lambda p: p("on_rank_submit", _rank_screen(p), "1 1 2", "")[1], r"only once"),
    _app_case("rank-number-9", lambda p: p("on_rank_submit", _rank_screen(p), "9 1 2", "")[1], r"not 9"),
    _app_case("rank-incomplete", lambda p: p("on_rank_submit", _rank_screen(p), "1", "")[1], r"still to place"),
    _app_case("rank-huge-rationale", lambda p: p("on_rank_submit", _rank_screen(p), "1 2 3", "x" * 200_000)[1],
              r"Not yet"),
    _app_case("rank-on-a-pair", lambda p: p("on_rank_submit", {"task_id": p.ids["pair"], "shown": [0, 1, 2]},
                                            "1 2 3", "")[1], r"pair|rank"),
    _app_case("admin-prompts-as-annotator", lambda p: p("on_add_prompts", "A new prompt", "train"), r"Admins only"),
    _app_case("admin-prompts-deactivated-admin", lambda p: p("on_add_prompts", "A new prompt", "train",
                                                             user="exboss"), r"Admins only"),
    _app_case("admin-prompts-too-many", lambda p: p("on_add_prompts", "\n".join(f"p{i}" for i in range(600)),
                                                    "train", user="boss"), r"at most"),
    _app_case("admin-prompts-too-long", lambda p: p("on_add_prompts", "x" * 50_000, "train", user="boss"),
              r"at most"),
    _app_case("admin-account-as-annotator", lambda p: p("on_add_annotator", "mallory", True), r"Admins only"),
    _app_case("admin-account-deactivated-admin", lambda p: p("on_add_annotator", "mallory", True, user="exboss"),
              r"Admins only"),
    _app_case("admin-account-existing", lambda p: p("on_add_annotator", "alice", False, user="boss"), r"exists"),
    _app_case("admin-account-long-name", lambda p: p("on_add_annotator", "n" * 300, False, user="boss"), r"name"),
    _app_case("admin-keep-text", lambda p: p("on_keep", "abc", user="boss"), r"number"),
    _app_case("admin-keep-nan", lambda p: p("on_keep", float("nan"), user="boss"), r"number"),
    _app_case("admin-keep-no-vote", lambda p: p("on_keep", 99999, user="boss"), r"99999"),
    _app_case("admin-reject-as-annotator", lambda p: p("on_reject", p.ids["vote"]), r"Admins only"),
    _app_case("admin-export-as-annotator", lambda p: p("on_export", "/tmp/never"), r"Admins only"),
    _app_case("admin-export-unwritable", lambda p: p("on_export", "/proc/rlhf-export", user="boss"),
              r"cannot write"),
    _app_case("admin-overview-as-annotator", lambda p: p("on_overview"), r"Admins only"),
    _app_case("admin-queue-deactivated-admin", lambda p: p("on_queue", user="exboss"), r"Admins only"),
]


@pytest.mark.parametrize("run, expected", APP_CASES)
def test_app(page, run, expected):
    message = run(page)
    assert isinstance(message, str), message
    assert re.search(expected, one_line(message), re.IGNORECASE), message
    page.assert_unchanged()


def test_an_arena_vote_on_a_pair_task_is_refused(page):
    """The arena's vote is for arena tasks: a pair task's id on the arena page stores nothing (item 3)."""
    from labeling_ui.app import arena_vote

    current = {"task_id": page.ids["pair"], "labels": ["x", "y"], "shown_at": time.time()}
    assert "Saved" not in one_line(arena_vote(page.store, "alice", current, "A"))
    page.assert_unchanged()


def test_there_are_at_least_100_cases():
    cases = IMPORT_CASES + EXPORT_CASES + CONFIG_CASES + FLAG_CASES + TRAINING_DATA_CASES + STORE_CASES + APP_CASES
    assert len(cases) >= 100 and len({c.id for c in cases}) == len(cases)
