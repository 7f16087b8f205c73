"""The preference store on SQLite (and PostgreSQL where RLHF_TEST_POSTGRES_URL is set; CI sets it)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import StatementError

from rlhf.store import AlreadyVoted, Store, StoreError, Task, TaskFull


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


def _ranking_task(store: Store, k: int = 4, overlap: int = 2) -> int:
    [pid] = store.add_prompts(["Rank these reviews."], source="test")
    ids = store.add_responses(pid, [f"review {i}" for i in range(k)], model="m")
    return store.add_task(ids, kind="rank", overlap=overlap)


def test_rankings_are_stored_as_given_and_checked(store_url):
    store = Store(store_url)
    for name in ("r1", "r2", "r3"):
        store.add_annotator(name)
    task_id = _ranking_task(store, overlap=2)
    assert store.next_task("r1", kind="rank").id == task_id
    for bad in ([[0], [1], [2]], [[0, 1], [1, 2, 3]], [[0], [], [1, 2, 3]], [[0], [1], [2], [7]]):
        with pytest.raises(StoreError, match="exactly once"):
            store.submit_ranking("r1", task_id, bad, shown=[0, 1, 2, 3])
    with pytest.raises(StoreError, match="shown"):
        store.submit_ranking("r1", task_id, [[0], [1], [2], [3]], shown=[0, 1, 2])
    store.submit_ranking("r1", task_id, [[2], [3, 0], [1]], shown=[3, 1, 0, 2], seconds=9.5)
    store.submit_ranking("r2", task_id, None, shown=[0, 1, 2, 3])  # all of them bad
    with pytest.raises(TaskFull):
        store.submit_ranking("r3", task_id, [[0], [1], [2], [3]], shown=[0, 1, 2, 3])
    first, second = store.tasks(kind="rank")[0]["votes"]
    assert (first["choice"], first["ranking"], first["shown"]) == ("ranked", [[2], [0, 3], [1]], [3, 1, 0, 2])
    assert (second["choice"], second["ranking"]) == ("both_bad", None)
    assert store.progress(kind="rank") == {"tasks": 1, "slots": 2, "votes": 2, "complete_tasks": 1}
    assert store.undo_last("r2") == task_id and len(store.tasks(kind="rank")[0]["votes"]) == 1


def test_swapped_repeat_shows_the_other_side_and_stays_out_of_counts(store_url):
    store = Store(store_url)
    store.add_annotator("p")
    store.add_annotator("q")
    [t1, t2] = _pairs(store, 2)
    assert store.repeat_task("p") is None  # nothing judged yet
    store.submit("p", t1, "A", left="B")
    store.submit("p", t2, "tie")  # a tie says nothing about sides: never repeated
    view, left = store.repeat_task("p")
    assert view.how == "repeat" and view.id not in (t1, t2) and left == "A"  # last time B was on the left
    assert view.responses == store.task(t1).responses  # same positions; only the shown side changes
    assert store.repeat_task("p")[0].id == view.id  # asked again before voting: the same repeat, not a new one
    assert store.next_task("q") is None  # other annotators are never handed someone's repeat
    store.submit("p", view.id, "A", left="A")
    assert store.repeat_task("p") is None  # every A/B judgement repeated once
    assert store.progress() == {"tasks": 2, "slots": 2, "votes": 2, "complete_tasks": 2}
    [repeat] = [t for t in store.tasks() if t["how"] == "repeat"]
    assert repeat["repeat_of"] == t1 and repeat["votes"][0]["left"] == "A"


def test_model_verdict_and_the_review_queue(store_url):
    store = Store(store_url)
    store.add_annotator("h")
    [t1, t2] = _pairs(store, 2)
    v1 = store.submit("h", t1, "A", strength=3)
    v2 = store.submit("h", t2, "A", strength=1)
    store.set_model_verdict(v1, 0.05, queue=True)
    store.set_model_verdict(v2, 0.9, queue=False)
    [queued] = store.review_queue()
    assert (queued["vote_id"], queued["model_p_a"], queued["responses"]) == (v1, 0.05, ["good 1", "bad 1"])
    store.review(v1, "rejected")
    assert store.review_queue() == [] and [r["vote_id"] for r in store.review_queue("rejected")] == [v1]
    with pytest.raises(StoreError, match="not on the review queue"):
        store.review(v2, "kept")
    with pytest.raises(StoreError):
        store.set_model_verdict(v2, 1.5, queue=False)
    assert {v["vote_id"]: (v["model_p_a"], v["review"]) for v in store.votes()} == {v1: (0.05, "rejected"),
                                                                                    v2: (0.9, None)}


def _as_older_store(url: str, version: int, task_id: int) -> None:
    """Turn a store into one of schema `version` (2 or 3): the votes table as it was then, no edits table (version
    4's), and one vote (id 7) on `task_id` with the columns that version had."""
    sqlite = url.startswith("sqlite")
    datetime_type, id_type = ("DATETIME", "INTEGER") if sqlite else ("TIMESTAMP WITHOUT TIME ZONE", "SERIAL")
    v3 = version >= 3
    choices = "'A', 'B', 'tie', 'both_bad'" + (", 'ranked'" if v3 else "")
    columns = ("ranking JSON, shown JSON, model_p_a FLOAT, review VARCHAR(16), " if v3 else "")
    review = ("CONSTRAINT ck_vote_review CHECK (review is null or review in ('queued', 'kept', 'rejected'))," if v3
              else "")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE votes"))
        conn.execute(text("DROP TABLE edits"))
        conn.execute(text(f"""CREATE TABLE votes (id {id_type} NOT NULL, task_id INTEGER NOT NULL,
            annotator_id INTEGER NOT NULL, choice VARCHAR(16) NOT NULL, strength INTEGER NOT NULL,
            rationale TEXT NOT NULL, "left" VARCHAR(1) NOT NULL, guideline_version VARCHAR(64) NOT NULL, seconds FLOAT,
            created_at {datetime_type} NOT NULL, margin FLOAT, {columns}PRIMARY KEY (id),
            CONSTRAINT uq_one_vote_per_annotator UNIQUE (task_id, annotator_id),
            CONSTRAINT ck_vote_choice CHECK (choice in ({choices})), {review}
            CONSTRAINT ck_vote_strength CHECK (strength between 1 and 3),
            CONSTRAINT ck_vote_left CHECK ("left" in ('A', 'B')),
            FOREIGN KEY(task_id) REFERENCES tasks (id), FOREIGN KEY(annotator_id) REFERENCES annotators (id))"""))
        conn.execute(text("CREATE INDEX ix_votes_task_id ON votes (task_id)"))
        conn.execute(text("CREATE INDEX ix_votes_annotator_id ON votes (annotator_id)"))
        later = ", NULL, NULL, 0.25, 'queued'" if v3 else ""
        conn.execute(text("INSERT INTO votes VALUES "
                          f"(7, :t, 1, 'B', 3, 'why', 'A', 'v1', 2.5, '2026-01-01 00:00:00', 0.5{later})"),
                     {"t": task_id})
        conn.execute(text("UPDATE tasks SET vote_count = 1 WHERE id = :t"), {"t": task_id})
        conn.execute(text(f"UPDATE meta SET value = '{version}' WHERE key = 'schema_version'"))
    engine.dispose()


def test_a_version_2_store_is_upgraded_in_place(store_url):
    """A store written by schema version 2 (the votes table as it was) opens with its votes intact and takes
    rankings."""
    url = store_url
    store = Store(url)
    store.add_annotator("old")
    [task_id] = _pairs(store, 1)
    rank_id = _ranking_task(store, k=3, overlap=1)
    store.close()
    _as_older_store(url, 2, task_id)
    upgraded = Store(url)
    [vote] = upgraded.votes()
    assert (vote["vote_id"], vote["choice"], vote["strength"], vote["margin"], vote["rationale"]) == (
        7, "B", 3, 0.5, "why")
    assert vote["ranking"] is None and vote["review"] is None
    upgraded.submit_ranking("old", rank_id, [[1], [0, 2]], shown=[2, 0, 1])
    with pytest.raises(StoreError):
        upgraded.submit("old", task_id, "ranked")  # the check still guards pair choices
    assert Store(url).votes(kind="rank")[0]["ranking"] == [[1], [0, 2]]


def _row_counts(url: str) -> dict:
    engine = create_engine(url)
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                  for t in ("prompts", "responses", "tasks", "task_items")}
    engine.dispose()
    return counts


def test_add_arena_task_stores_what_the_four_separate_calls_did(store_url, tmp_path):
    messages = [{"role": "user", "content": "Write a film review."}]
    answers = [("A fine film.", "base", {"label": "Base", "system": "", "temperature": 0.7, "seed": 5}),
               ("A superb film!", "dpo", {"label": "DPO", "system": "Be kind.", "temperature": 0.7, "seed": 5})]
    store = Store(store_url)
    task_id = store.add_arena_task(messages, answers)
    # The same rows as labeling_ui's arena_ask wrote before, in four transactions.
    separate = Store(f"sqlite:///{tmp_path / 'separate.db'}")
    [pid] = separate.add_prompts([messages], source="arena", split="arena")
    ids = [separate.add_responses(pid, [t], model=m, params=p)[0] for t, m, p in answers]
    separate.add_task(ids, kind="arena", how="arena", overlap=1)

    def without_times(row: dict) -> dict:
        row = {k: v for k, v in row.items() if k not in ("created_at", "prompt_created_at")}
        row["responses"] = [{k: v for k, v in r.items() if k != "created_at"} for r in row["responses"]]
        return row

    [got] = store.tasks(kind="arena")
    [want] = separate.tasks(kind="arena")
    assert got["task_id"] == task_id and without_times(got) == without_times(want)
    assert (got["kind"], got["how"], got["overlap"], got["round"], got["prompt_source"], got["prompt_split"]) == (
        "arena", "arena", 1, 0, "arena", "arena")
    assert [(r["text"], r["model"], r["params"]) for r in got["responses"]] == answers
    view = store.task(task_id)
    assert view.prompt == messages and view.models == ["base", "dpo"]
    # Asking the same prompt again reuses it; the round is the caller's.
    again = store.add_arena_task(messages, answers, round=2)
    assert again != task_id and store.prompts_with_tasks(2) == store.prompts_with_tasks(0)


def test_add_arena_task_that_fails_halfway_stores_nothing(store_url):
    store = Store(store_url)
    _pairs(store, 1)
    before = _row_counts(store_url)
    messages = [{"role": "user", "content": "A prompt nobody has asked."}]
    with pytest.raises(StoreError, match="two answers"):
        store.add_arena_task(messages, [("only one", "base", {})])
    with pytest.raises(StoreError):
        store.add_arena_task([{"role": "user", "content": "  "}], [("a", "x", {}), ("b", "y", {})])
    # Failures after the prompt was written (parameters that are not JSON), and after the responses were too (a
    # forced error on inserting the task), in the same transaction.
    with pytest.raises(StatementError, match="JSON"):
        store.add_arena_task(messages, [("a", "x", {}), ("b", "y", {"seed": object()})])

    def fail(*_):
        raise RuntimeError("forced")

    event.listen(Task, "before_insert", fail)
    try:
        with pytest.raises(RuntimeError, match="forced"):
            store.add_arena_task(messages, [("a", "x", {}), ("b", "y", {})])
    finally:
        event.remove(Task, "before_insert", fail)
    assert _row_counts(store_url) == before
    assert store.random_prompt(split="arena") is None


def test_a_vote_must_fit_its_task_kind(store_url):
    """A/B/tie/both_bad only on pair and arena tasks, a ranking only on rank tasks; a refused vote takes no slot."""
    store = Store(store_url)
    store.add_annotator("k")
    [pair] = _pairs(store, 1)
    rank = _ranking_task(store, 3, overlap=1)
    [pid] = store.add_prompts(["An arena prompt."])
    arena = store.add_task(store.add_responses(pid, ["x", "y"], model="m"), kind="arena")
    with pytest.raises(StoreError, match=f"task {rank} is a rank task: it takes a ranking"):
        store.submit("k", rank, "A", strength=3)
    with pytest.raises(StoreError, match=f"task {pair} is a pair task"):
        store.submit_ranking("k", pair, [[0], [1]], shown=[0, 1])
    with pytest.raises(StoreError, match=f"task {arena} is a arena task"):
        store.submit_ranking("k", arena, [[1], [0]], shown=[1, 0])
    assert store.votes(kind="rank") == [] and store.votes() == []
    assert store.progress(kind="rank")["votes"] == 0 and store.next_task("k", kind="rank").id == rank
    store.submit("k", arena, "B")
    store.submit_ranking("k", rank, [[2], [0, 1]], shown=[0, 1, 2])
    with pytest.raises(StoreError, match="kind must be one of pair, arena, rank"):
        store.add_task(store.add_responses(pid, ["p", "q"]), kind="poll")
    with pytest.raises(StoreError, match="a pair task takes two responses"):
        store.add_task(store.add_responses(pid, ["p", "q", "r"]))


def test_free_text_from_annotators_is_bounded(store_url):
    from rlhf.store import GUIDELINE_MAX, PROMPT_MAX, RATIONALE_MAX

    store = Store(store_url)
    store.add_annotator("t")
    tasks = _pairs(store, 2)
    rank = _ranking_task(store, 3, overlap=1)
    before = store.counts()
    for kwargs in (dict(rationale="x" * (RATIONALE_MAX + 1)), dict(rationale=["not", "text"]),
                   dict(guideline_version="v" * (GUIDELINE_MAX + 1)), dict(seconds="abc"),
                   dict(seconds=float("nan")), dict(seconds=-1.0), dict(strength=True)):
        with pytest.raises(StoreError):
            store.submit("t", tasks[0], "A", **kwargs)
    with pytest.raises(StoreError, match=f"at most {RATIONALE_MAX}"):
        store.submit_ranking("t", rank, [[0], [1], [2]], shown=[0, 1, 2], rationale="y" * 5_000_000)
    for shown in ([0, 0, 1], ["a", 1, 2], [0, 1]):
        with pytest.raises(StoreError, match="shown must list"):
            store.submit_ranking("t", rank, [[0], [1], [2]], shown=shown)
    with pytest.raises(StoreError, match=f"at most {PROMPT_MAX}"):
        store.add_arena_task("z" * (PROMPT_MAX + 1), [("a", "m1", {}), ("b", "m2", {})])
    assert store.counts() == before
    store.submit("t", tasks[0], "A", rationale="x" * RATIONALE_MAX, guideline_version="v" * GUIDELINE_MAX, seconds=2)
    assert store.votes()[0]["rationale"] == "x" * RATIONALE_MAX


def test_a_database_password_never_appears_in_store_errors(tmp_path):
    from rlhf.store import masked_url

    assert masked_url("postgresql+psycopg2://rlhf:s3cret@db.example/rlhf") == (
        "postgresql+psycopg2://rlhf:***@db.example/rlhf")
    # Nothing listens on port 1: the connection fails, and its message must not carry the password.
    for url in ("postgresql+psycopg2://rlhf:s3cret@127.0.0.1:1/rlhf", "nosuchdialect://rlhf:s3cret@host/db",
                "postgresql+psycopg2://rlhf:s3cret@[bad"):
        with pytest.raises(StoreError) as e:
            Store(url)
        assert "s3cret" not in str(e.value) and "cannot open database" in str(e.value)


@pytest.mark.postgres
def test_a_wrong_postgres_password_is_masked_too():
    import os

    base = os.environ.get("RLHF_TEST_POSTGRES_URL") or pytest.skip("RLHF_TEST_POSTGRES_URL is not set")
    from sqlalchemy.engine import make_url

    url = make_url(base).set(password="not-the-password-xyz").render_as_string(hide_password=False)
    with pytest.raises(StoreError) as e:
        Store(url)
    assert "not-the-password-xyz" not in str(e.value)


def test_ids_and_splits_of_the_wrong_type_are_store_errors(store_url):
    """What an endpoint passes on may be anything: a wrong type is a StoreError, never a database error."""
    store = Store(store_url)
    store.add_annotator("w")
    [task_id] = _pairs(store, 1)
    before = store.counts()
    for bad in ("1", 1.0, True, 2**70, None):
        with pytest.raises(StoreError, match="no task"):
            store.submit("w", bad, "A")
        with pytest.raises(StoreError, match="no task"):
            store.skip("w", bad)
    with pytest.raises(StoreError, match="named by text"):
        store.submit(7, task_id, "A")
    for split in (["train"], "s" * 33):
        with pytest.raises(StoreError, match="a split is a name"):
            store.add_prompts(["a new prompt"], split=[split])
    assert store.counts() == before


def _rate_tasks(store: Store, texts: list[str], overlap: int = 1) -> list[int]:
    [pid] = store.add_prompts(["Review a film."], source="test")
    answers = [(t, "m", {}) for t in texts]
    _, task_ids = store.add_candidates(pid, answers, [], overlap=overlap, rate=True)
    return task_ids


def test_ratings_take_a_thumb_and_an_optional_likert_score(store_url):
    store = Store(store_url)
    store.add_annotator("ann")
    up, down, other = _rate_tasks(store, ["Lovely film.", "Dull film.", "A film."])
    view = store.next_task("ann", kind="rate")
    assert len(view.responses) == 1 and view.id in (up, down, other)
    store.submit_rating("ann", up, "up", likert=5, rationale="warm", seconds=2.0)
    store.submit_rating("ann", down, "down")
    with pytest.raises(AlreadyVoted):
        store.submit_rating("ann", up, "down")
    for bad in (0, 6, 2.5, True, "4"):
        with pytest.raises(StoreError, match="Likert"):
            store.submit_rating("ann", up, "up", likert=bad)
    with pytest.raises(StoreError, match="rating is one of up, down"):
        store.submit_rating("ann", up, "A")
    with pytest.raises(StoreError, match="takes a rating"):
        store.submit("ann", other, "A")  # a choice on a rating task
    [pair] = _pairs(store, 1)
    with pytest.raises(StoreError, match="takes a choice"):
        store.submit_rating("ann", pair, "up")
    votes = {v["task_id"]: (v["choice"], v["likert"]) for v in store.votes(kind="rate")}
    assert votes == {up: ("up", 5), down: ("down", None)}
    assert store.progress(annotator="ann", kind="rate")["done"] == 2
    assert store.undo_last("ann") == down
    assert {store.next_task("ann", kind="rate").id} <= {down, other} and store.progress(kind="rate")["votes"] == 1


def test_an_edit_is_kept_beside_its_response_and_replaced_by_a_second(store_url):
    store = Store(store_url)
    store.add_annotator("ann")
    store.add_annotator("bob")
    [task] = _pairs(store, 1)
    edit = store.save_edit("ann", task, 1, "  A better answer, <b>bold</b>.  ")
    assert store.edit_of("ann", task, 1) == "A better answer, <b>bold</b>."
    assert store.save_edit("ann", task, 1, "Better still.") == edit  # replaced, not added
    store.save_edit("bob", task, 0, "Bob's version.")
    [row] = store.tasks()
    assert [r["text"] for r in row["responses"]] == ["good 1", "bad 1"]  # the responses themselves are unchanged
    assert sorted((e["annotator"], e["position"], e["text"]) for e in row["edits"]) == [
        ("ann", 1, "Better still."), ("bob", 0, "Bob's version.")]
    assert store.counts()["edits"] == 2
    for position, text_, message in [(2, "x", "no response at position 2"), (0, "   ", "not empty"),
                                     (0, "good 1", "same as the answer"), (0, "x" * 20001, "at most 20,000")]:
        with pytest.raises(StoreError, match=message):
            store.save_edit("ann", task, position, text_)
    with pytest.raises(StoreError, match="no active annotator"):
        store.save_edit("nobody", task, 0, "x")
    assert store.counts()["edits"] == 2


def test_a_version_3_store_is_upgraded_to_take_ratings_and_edits(store_url):
    """A store written by schema version 3 (votes without likert, the old choice check, no edits table) opens with
    its votes intact and takes ratings and edits."""
    url = store_url
    store = Store(url)
    store.add_annotator("old")
    [task_id] = _pairs(store, 1)
    [rate_id] = _rate_tasks(store, ["Fine."])
    store.close()
    _as_older_store(url, 3, task_id)
    upgraded = Store(url)
    [vote] = upgraded.votes()
    assert (vote["vote_id"], vote["choice"], vote["margin"], vote["model_p_a"], vote["review"], vote["likert"]) == (
        7, "B", 0.5, 0.25, "queued", None)
    upgraded.submit_rating("old", rate_id, "up", likert=4)
    upgraded.save_edit("old", task_id, 0, "An improved answer.")
    assert Store(url).votes(kind="rate")[0]["likert"] == 4 and Store(url).counts()["edits"] == 1
    engine = create_engine(url)
    with engine.connect() as conn, pytest.raises(Exception, match="ck_vote_likert|CHECK"):
        conn.execute(text("UPDATE votes SET likert = 9 WHERE id = 7"))  # the database itself guards the range
    engine.dispose()
