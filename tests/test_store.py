"""The preference store on SQLite (and PostgreSQL where RLHF_TEST_POSTGRES_URL is set; CI sets it)."""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter

import pytest
from sqlalchemy import create_engine, text

from rlhf.store import AlreadyVoted, Store, StoreError, TaskFull


def _postgres_url() -> str:
    url = os.environ.get("RLHF_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must provide RLHF_TEST_POSTGRES_URL (.ci/run starts PostgreSQL)")
        pytest.skip("RLHF_TEST_POSTGRES_URL is not set")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    base = _postgres_url()
    # A fresh database per test, dropped afterwards.
    name = f"rlhf_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE "{name}"'))
    admin.dispose()


def _pairs(store: Store, n: int, overlap: int = 1, round: int = 0) -> list[int]:
    tasks = []
    for pid in store.add_prompts([f"Review film number {i}." for i in range(n)], source="test"):
        a, b = store.add_responses(pid, [f"good {pid}", f"bad {pid}"], model="m", params={"temperature": 0.7})
        tasks.append(store.add_task([a, b], overlap=overlap, round=round))
    return tasks


def test_vote_flow_and_one_vote_per_annotator(store_url):
    store = Store(store_url)
    store.add_annotator("ann")
    [task_id] = _pairs(store, 1, overlap=2)
    view = store.next_task("ann")
    assert view.id == task_id and view.responses == ["good 1", "bad 1"] and view.models == ["m", "m"]
    assert view.prompt == [{"role": "user", "content": "Review film number 0."}]
    store.submit("ann", task_id, "A", strength=3, left="B", rationale="clearer", seconds=4.2)
    with pytest.raises(AlreadyVoted):
        store.submit("ann", task_id, "B")
    assert store.next_task("ann") is None
    [vote] = store.votes()
    assert (vote["choice"], vote["strength"], vote["left"], vote["rationale"]) == ("A", 3, "B", "clearer")


def test_overlap_is_never_exceeded(store_url):
    store = Store(store_url)
    for name in ("a", "b", "c"):
        store.add_annotator(name)
    [task_id] = _pairs(store, 1, overlap=2)
    store.submit("a", task_id, "A")
    store.submit("b", task_id, "B")
    assert store.next_task("c") is None
    with pytest.raises(TaskFull):
        store.submit("c", task_id, "A")
    assert store.progress() == {"tasks": 1, "slots": 2, "votes": 2, "complete_tasks": 1}


def test_next_task_order_is_randomised_per_annotator_and_skip_undo_work(store_url):
    store = Store(store_url)
    store.add_annotator("x")
    store.add_annotator("y")
    tasks = _pairs(store, 12, overlap=2)
    order = {}
    for name in ("x", "y"):
        seen = []
        while (view := store.next_task(name)) is not None:
            seen.append(view.id)
            store.skip(name, view.id)
        order[name] = seen
    assert sorted(order["x"]) == sorted(order["y"]) == tasks
    assert order["x"] != order["y"]
    store.add_annotator("z")
    first = store.next_task("z")
    store.submit("z", first.id, "tie")
    assert store.undo_last("z") == first.id
    assert store.progress(annotator="z")["done"] == 0 and store.next_task("z").id == first.id
    assert store.undo_last("z") is None  # nothing left to undo


def test_undo_respects_the_time_window(store_url):
    store = Store(store_url)
    store.add_annotator("w")
    [task_id] = _pairs(store, 1)
    store.submit("w", task_id, "A")
    assert store.undo_last("w", window_s=0.0) is None
    assert len(store.votes()) == 1


def test_bad_input_is_rejected_and_stores_nothing(store_url):
    store = Store(store_url)
    store.add_annotator("v")
    [task_id] = _pairs(store, 1)
    for kwargs in (dict(choice="C"), dict(choice="A", strength=5), dict(choice="A", left="X")):
        with pytest.raises(StoreError):
            store.submit("v", task_id, **kwargs)
    with pytest.raises(StoreError):
        store.submit("nobody", task_id, "A")
    with pytest.raises(StoreError):
        store.add_prompts(["fine", "   "])  # one bad prompt: the whole call is rolled back
    assert store.add_prompts(["fine"]) and len(store.votes()) == 0
    with pytest.raises(StoreError):
        store.add_annotator("v")


def test_credentials_are_hashed_and_checked(store_url):
    store = Store(store_url)
    credential = store.add_annotator("boss", role="admin")
    assert store.authenticate("boss", credential).role == "admin"
    assert store.authenticate("boss", credential + "x") is None
    assert store.authenticate("nobody", credential) is None
    engine = create_engine(store_url)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT credential_hash FROM annotators")).scalar()
    engine.dispose()
    assert credential not in stored and stored.startswith("scrypt$")
    store.set_active("boss", False)
    assert store.authenticate("boss", credential) is None


def test_schema_version_mismatch_is_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE meta SET value = '999' WHERE key = 'schema_version'"))
    engine.dispose()
    with pytest.raises(StoreError, match="schema version 999"):
        Store(url)


def test_bad_url_is_one_line():
    with pytest.raises(StoreError, match="cannot open database"):
        Store("nosuchdialect://x")
    with pytest.raises(StoreError, match="cannot open database"):
        Store("sqlite:////nonexistent-dir/sub/x.db/..")


@pytest.mark.slow
def test_fifty_annotators_forty_votes_each_concurrently(store_url):
    """50 threads x 40 votes: exactly 2,000 votes, nobody twice on a task, no task over its overlap."""
    store = Store(store_url)
    names = [f"ann{i:02d}" for i in range(50)]
    for name in names:
        store.add_annotator(name)
    _pairs(store, 1100, overlap=2)  # 2,200 slots: every annotator can find 40 tasks
    errors = []

    def annotate(name: str) -> None:
        s = Store(store_url)  # each annotator its own engine, as separate app workers would have
        done = 0
        while done < 40:
            view = s.next_task(name)
            if view is None:
                errors.append(f"{name} ran out of tasks")
                return
            try:
                s.submit(name, view.id, "A" if done % 2 else "B")
                done += 1
            except TaskFull:
                continue  # somebody else took the last slot between next_task and submit
        s.engine.dispose()

    threads = [threading.Thread(target=annotate, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    votes = store.votes()
    assert len(votes) == 2000
    assert max(Counter((v["task_id"], v["annotator"]) for v in votes).values()) == 1
    assert max(Counter(v["task_id"] for v in votes).values()) <= 2
    assert Counter(v["annotator"] for v in votes) == {n: 40 for n in names}
