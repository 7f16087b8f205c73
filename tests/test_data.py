"""Import, export and quality figures of the preference store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import UserError
from rlhf.data import (
    ExportConfig,
    ImportConfig,
    StatsConfig,
    aggregate_task,
    hh_to_preference,
    load_preference_dataset,
    quality_stats,
    run_export,
    run_import,
    run_stats,
)
from rlhf.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
NONE_RATED = {"ratings_train": 0, "ratings_test": 0, "edits": 0}  # an export's counts where nothing was rated or edited


@pytest.fixture
def db(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


def _pairs(rows):
    """Comparable (prompt, chosen, rejected) triples of a dataset split."""
    return sorted((json.dumps(r["prompt"]), r["chosen"][-1]["content"], r["rejected"][-1]["content"]) for r in rows)


def test_hh_shared_prefix_becomes_the_prompt():
    pref = hh_to_preference("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: Apple.",
                            "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: Car.")
    assert pref["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "Name a fruit."}]
    assert pref["chosen"] == [{"role": "assistant", "content": "Apple."}]
    assert pref["rejected"] == [{"role": "assistant", "content": "Car."}]


def test_hh_round_trip_import_export_reimport(tmp_path, db):
    run_import(ImportConfig(db=db, file=str(FIXTURES / "hh_sample.jsonl")))
    first = run_export(ExportConfig(db=db, out=str(tmp_path / "e1"), test_size=0.0))
    assert first == {"train": 5, "test": 0, "ties": 0, **NONE_RATED}
    exported = load_preference_dataset(str(tmp_path / "e1"))
    # Re-import the exported TRL-format pairs into a fresh store, export again: the same pairs.
    db2 = f"sqlite:///{tmp_path / 'second.db'}"
    run_import(ImportConfig(db=db2, file=str(tmp_path / "e1" / "train.jsonl")))
    run_export(ExportConfig(db=db2, out=str(tmp_path / "e2"), test_size=0.0))
    again = load_preference_dataset(str(tmp_path / "e2"))
    assert _pairs(exported["train"]) == _pairs(again["train"])
    multi = [r for r in exported["train"] if len(r["prompt"]) == 3]
    assert len(multi) == 1 and multi[0]["chosen"][0]["content"].startswith("Spaghetti")


def test_imported_pairs_keep_their_margin_and_none_means_zero(tmp_path, db):
    """HH-RLHF has no strength: its pairs carry margin 0, not the "clear" strength's 0.5 (which would change the
    reward loss to -log sigmoid(r_c - r_r - 0.5)); a TRL row's own margin comes back as given, not snapped."""
    run_import(ImportConfig(db=db, file=str(FIXTURES / "hh_sample.jsonl")))
    run_export(ExportConfig(db=db, out=str(tmp_path / "hh"), test_size=0.0))
    assert [r["margin"] for r in load_preference_dataset(str(tmp_path / "hh"))["train"]] == [0.0] * 5
    rows = [{"prompt": "p1", "chosen": "good", "rejected": "bad", "margin": 0.7},
            {"prompt": "p2", "chosen": "fine", "rejected": "awful"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    db2 = f"sqlite:///{tmp_path / 'pairs.db'}"
    run_import(ImportConfig(db=db2, file=str(tmp_path / "pairs.jsonl")))
    run_export(ExportConfig(db=db2, out=str(tmp_path / "pairs"), test_size=0.0))
    exported = load_preference_dataset(str(tmp_path / "pairs"))["train"]
    margins = {r["prompt"][0]["content"]: r["margin"] for r in exported}
    assert margins == {"p1": 0.7, "p2": 0.0}


def test_tasks_dump_is_lossless(tmp_path, db):
    store = Store(db)
    store.add_annotator("ann")
    [pid] = store.add_prompts([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]],
                              source="chat", split="test")
    ids = store.add_responses(pid, ["Hello.", "Hey there, friend!"], model="m1", params={"temperature": 0.7})
    task = store.add_task(ids, round=3, how="active", overlap=2)
    vote = store.submit("ann", task, "B", strength=3, left="B", rationale="friendlier", guideline_version="v2",
                        seconds=3.5)
    store.set_model_verdict(vote, 0.9, queue=True)  # the reward model's verdict and the review state travel too
    ranked = store.add_task(store.add_responses(pid, ["One.", "Two.", "Three."], model="m2"), kind="rank", round=3)
    store.submit_ranking("ann", ranked, [[2], [0, 1]], shown=[1, 2, 0], rationale="ties", seconds=7.0)
    run_export(ExportConfig(db=db, out=str(tmp_path / "e")))
    db2 = f"sqlite:///{tmp_path / 'copy.db'}"
    run_import(ImportConfig(db=db2, file=str(tmp_path / "e" / "tasks.jsonl")))
    strip = lambda tasks: [{k: v for k, v in t.items() if k != "task_id"} for t in tasks]  # noqa: E731
    assert strip(Store(db2).tasks()) == strip(store.tasks())
    assert strip(Store(db2).tasks(kind="rank")) == strip(store.tasks(kind="rank"))
    assert Store(db2).tasks(kind="rank")[0]["votes"][0]["ranking"] == [[2], [0, 1]]


def test_export_splits_by_prompt_and_keeps_ties_apart(tmp_path, db):
    store = Store(db)
    for name in ("a", "b", "c"):
        store.add_annotator(name)
    choices = [("A", "A", "B"), ("tie", "tie", "A"), ("A", "B", "both_bad"), ("B", "B", "B")] * 10
    for i, votes in enumerate(choices):
        [pid] = store.add_prompts([f"prompt {i}"])
        ids = store.add_responses(pid, [f"first {i}", f"second {i}"], model="m")
        task = store.add_task(ids, overlap=3)
        for name, choice in zip("abc", votes):
            store.submit(name, task, choice, strength=3)
    counts = run_export(ExportConfig(db=db, out=str(tmp_path / "e"), test_size=0.3))
    assert counts["train"] + counts["test"] == 20 and counts["ties"] == 20
    data = load_preference_dataset(str(tmp_path / "e"))
    train_prompts = {json.dumps(r["prompt"]) for r in data["train"]}
    assert not train_prompts & {json.dumps(r["prompt"]) for r in data["test"]}
    assert {r["margin"] for r in data["train"]} == {1.0}  # strength 3 -> the third margin
    row = next(r for r in data["train"] if r["chosen"][0]["content"].startswith("second"))
    assert row["agreement"] == 1.0  # (B, B, B)


def test_aggregation_rules_by_hand():
    def task(*votes):
        return {"votes": [{"choice": c, "strength": s} for c, s in votes]}

    margins = (0.0, 0.5, 1.0)
    assert aggregate_task(task(("A", 3), ("A", 1), ("B", 3)), "majority", margins) == {
        "winner": "A", "margin": 0.5, "agreement": pytest.approx(2 / 3)}
    assert aggregate_task(task(("A", 2), ("B", 2)), "majority", margins)["label"] == "split"
    assert aggregate_task(task(("A", 1), ("B", 3)), "mean", margins)["winner"] == "B"
    assert aggregate_task(task(("A", 3), ("B", 3)), "mean", margins)["winner"] is None
    assert aggregate_task({"votes": []}, "majority", margins) is None


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "x", \n', r"bad.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "chosen": "b"}\n', r"bad.jsonl:1: needs prompt/chosen/rejected"),
    ('{"prompt": "a", "chosen": "  ", "rejected": "c"}\n', r"bad.jsonl:1: empty chosen"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
     r"bad.jsonl:2: duplicate of line 1"),
])
def test_bad_preference_files_name_the_line_and_store_nothing(tmp_path, db, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(UserError, match=message):
        run_import(ImportConfig(db=db, file=str(bad), kind="preferences"))
    assert Store(db).tasks() == []


def test_prompt_import_from_csv_and_jsonl(tmp_path, db):
    (tmp_path / "p.csv").write_text("prompt,split\nFirst prompt,train\nSecond prompt,test\n")
    assert run_import(ImportConfig(db=db, file=str(tmp_path / "p.csv"))) == {"prompts": 2}
    (tmp_path / "dup.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(UserError, match="dup.jsonl:3: duplicate of line 1"):
        run_import(ImportConfig(db=db, file=str(tmp_path / "dup.jsonl")))


def test_quality_stats_position_length_and_repeat_consistency(tmp_path, db):
    store = Store(db)
    store.add_annotator("lefty")
    store.add_annotator("fair")
    tasks = []
    for i in range(8):
        [pid] = store.add_prompts([f"q{i}"])
        ids = store.add_responses(pid, ["short", "a much longer answer"], model="m")
        tasks.append((store.add_task(ids, overlap=2), ids))
    for n, (task, _) in enumerate(tasks):
        store.submit("lefty", task, "A", left="A")  # always the left one, always the shorter one
        store.submit("fair", task, "B" if n % 2 else "A", left="B" if n % 2 else "A")
    # A swapped repeat of the first task: lefty again picks the left (now the other response): inconsistent.
    first_task, first_ids = tasks[0]
    repeat = store.add_task(list(reversed(first_ids)), how="repeat", repeat_of=first_task, overlap=1)
    store.submit("lefty", repeat, "A", left="A")
    stats = quality_stats(store.tasks())
    assert stats["annotators"]["lefty"]["left_share"] == 1.0
    assert stats["annotators"]["lefty"]["longer_share"] == pytest.approx(1 / 9)
    assert stats["annotators"]["lefty"]["repeat_consistency"] == 0.0
    fair = stats["annotators"]["fair"]["with_majority"]
    assert fair is None or 0 <= fair <= 1
    assert stats["krippendorff_alpha"] < 0.5 and "fair ~ lefty" in stats["cohen_kappa"]
    run_stats(StatsConfig(db=db))


def test_cli_data_and_annotators(tmp_path, capsys, db):
    assert main(["data", "import", "--db", db, "--file", str(FIXTURES / "hh_sample.jsonl")]) == 0
    assert main(["data", "export", "--db", db, "--out", str(tmp_path / "e"), "--test_size", "0"]) == 0
    assert (tmp_path / "e" / "train.jsonl").is_file()
    assert main(["annotators", "add", "alice", "--admin", "--db", db]) == 0
    out = capsys.readouterr().out
    credential = out.strip().splitlines()[-1].split(": ")[-1]
    assert Store(db).authenticate("alice", credential).role == "admin"
    assert main(["data", "import", "--db", db, "--file", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_a_ranking_of_four_exports_six_pairs_in_one_group(tmp_path, db):
    from rlhf.data import ranking_agreement

    store = Store(db)
    store.add_annotator("r1")
    store.add_annotator("r2")
    [pid] = store.add_prompts(["Rank four reviews."])
    ids = store.add_responses(pid, ["best", "worst", "second", "third"], model="m")
    task_id = store.add_task(ids, kind="rank", overlap=2)
    store.submit_ranking("r1", task_id, [[0], [2], [3], [1]], shown=[1, 3, 0, 2])
    run_export(ExportConfig(db=db, out=str(tmp_path / "e"), test_size=0.0))
    rows = [json.loads(line) for line in (tmp_path / "e" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["group"] for r in rows}) == 1
    margins = {(r["chosen"][0]["content"], r["rejected"][0]["content"]): r["margin"] for r in rows}
    # Four ranks: neighbours are 1/3 apart, first vs last 1.
    assert margins == pytest.approx({("best", "second"): 1 / 3, ("best", "third"): 2 / 3, ("best", "worst"): 1.0,
                                     ("second", "third"): 1 / 3, ("second", "worst"): 2 / 3, ("third", "worst"): 1 / 3})
    # A second annotator ties two and reverses one neighbour pair: the tie goes to the ties split.
    store.submit_ranking("r2", task_id, [[0, 2], [1], [3]], shown=[0, 1, 2, 3])
    counts = run_export(ExportConfig(db=db, out=str(tmp_path / "e2"), test_size=0.0))
    assert counts == {"train": 6 + 5, "test": 0, "ties": 1, **NONE_RATED}
    figures = ranking_agreement(store.tasks(kind="rank"))
    # r1 ranks (positions 0-3) = (0, 3, 1, 2), r2 = (0, 1, 0, 2). Of the 6 pairs, (0,1) (0,3) (1,2) (2,3) agree,
    # (1,3) disagrees, (0,2) is tied by r2: tau-b = (4 - 1) / sqrt((6 - 0) (6 - 1)).
    assert figures["rankings"] == 2 and figures["kendall_tau"] == pytest.approx(3 / 30 ** 0.5)
    assert figures["krippendorff_alpha_ordinal"] is not None
    # Shown first: r1 saw position 1 first (ranked last), r2 saw position 0 first (best, tied with 2): 1 of 2 on
    # top, against a chance of (1/4 + 2/4) / 2.
    assert figures["first_shown_on_top"] == 0.5 and figures["first_shown_on_top_by_chance"] == pytest.approx(3 / 8)


def test_export_leaves_out_repeats_and_rejected_votes(tmp_path, db):
    store = Store(db)
    store.add_annotator("a")
    tasks = []
    for i in range(3):
        [pid] = store.add_prompts([f"Prompt {i}."])
        tasks.append(store.add_task(store.add_responses(pid, [f"x{i}", f"y{i}"], model="m")))
    votes = [store.submit("a", t, "A", left="A") for t in tasks]
    repeat, left = store.repeat_task("a")
    store.submit("a", repeat.id, "A", left=left)
    store.set_model_verdict(votes[0], 0.02, queue=True)
    store.review(votes[0], "rejected")
    counts = run_export(ExportConfig(db=db, out=str(tmp_path / "e"), test_size=0.0))
    assert counts == {"train": 2, "test": 0, "ties": 0, **NONE_RATED}


# ---------------------------------------------------------------- bad input: one line, store unchanged (issue 24)


def _intact(url: str, before: dict) -> None:
    """The store holds exactly what it held `before`, and SQLite finds nothing wrong with the file."""
    store = Store(url)
    assert store.counts() == before
    if url.startswith("sqlite"):
        from sqlalchemy import text

        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    store.close()


def _seeded(url: str) -> dict:
    """A store with one pair task and its vote (so "unchanged" means more than "still empty"); its counts."""
    store = Store(url)
    store.add_annotator("ann")
    [pid] = store.add_prompts(["Seed prompt."])
    store.submit("ann", store.add_task(store.add_responses(pid, ["yes", "no"], model="m")), "A")
    counts = store.counts()
    store.close()
    return counts


def _task_row(**changes) -> dict:
    row = {"prompt": "Rank three.", "kind": "rank", "responses": [{"text": "one"}, {"text": "two"}, {"text": "three"}],
           "votes": [{"annotator": "r", "choice": "ranked", "ranking": [[0], [1], [2]], "shown": [2, 0, 1]}]}
    for key, value in changes.items():
        if key.startswith("vote_"):
            row["votes"][0][key[5:]] = value
        else:
            row[key] = value
    return row


def _pair_row(**vote) -> dict:
    return {"prompt": "Pick one.", "responses": [{"text": "left"}, {"text": "right"}],
            "votes": [{"annotator": "p", "choice": "A", **vote}]}


@pytest.mark.parametrize("row, message", [
    (_task_row(vote_ranking=[[0]]), "ranking placing each of the positions 0-2"),  # made export die: KeyError 1
    (_task_row(vote_ranking=[[0], [0], [1]]), "exactly once"),
    (_task_row(vote_ranking=[[0, 1, 2, 3]]), "exactly once"),
    (_task_row(vote_ranking=None), "ranked vote needs a ranking"),
    (_task_row(vote_shown=[0, 0, 1]), "shown must list"),
    (_task_row(vote_choice="A"), "a rank task takes choice ranked, both_bad"),
    (_task_row(kind="quiz"), "kind must be one of pair, arena, rank"),
    (_task_row(kind="pair"), "a pair task takes two responses"),
    (_task_row(round="abc"), "round must be a whole number"),
    (_task_row(overlap="lots"), "overlap must be a whole number"),
    (_task_row(prompt_split=["train"]), "prompt_split must be a name"),
    (_pair_row(choice="ranked", ranking=[[0], [1]]), "a pair task takes choice A, B, tie, both_bad"),
    (_pair_row(strength=7), "strength must be 1, 2 or 3"),
    (_pair_row(strength=True), "strength must be 1, 2 or 3"),
    (_pair_row(left="middle"), "left must be A or B"),
    (_pair_row(margin=float("nan")), "margin must be a finite number"),
    (_pair_row(margin="abc"), "margin must be a finite number"),
    (_pair_row(seconds="abc"), "seconds must be a finite number"),
    (_pair_row(seconds=-1), "seconds must be a finite number"),
    (_pair_row(model_p_a=1.5), r"model_p_a must be a finite number in \[0, 1\]"),
    (_pair_row(review="maybe"), "review must be one of"),
    (_pair_row(rationale="x" * 5000), "a rationale is text of at most 4000 characters"),
    ({"record": "annotator", "name": "eve", "role": "root"}, "role must be annotator or admin"),
    (_pair_row(role="root"), "role must be annotator or admin"),
    ({"prompt": [{"role": "wizard", "content": "hi"}], "responses": [{"text": "a"}, {"text": "b"}]}, "role is one of"),
    ({"record": "blob", "prompt": "x"}, "unknown record type 'blob'"),
    ({"prompt": "Two votes.", "responses": [{"text": "a"}, {"text": "b"}], "overlap": 2,
      "votes": [{"annotator": "d", "choice": "A"}, {"annotator": "d", "choice": "B"}]}, "same annotator"),
])
def test_a_tasks_import_refuses_rows_that_break_exports(tmp_path, store_url, row, message):
    before = _seeded(store_url)
    good = {"prompt": "Fine.", "responses": [{"text": "a"}, {"text": "b"}],
            "votes": [{"annotator": "g", "choice": "B"}]}
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=f"tasks.jsonl:2: .*{message}"):
        run_import(ImportConfig(db=store_url, file=str(path), kind="tasks"))
    _intact(store_url, before)


@pytest.mark.parametrize("line, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same response"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "margin": float("nan")}, "margin must be a finite number"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "margin": "abc"}, "margin must be a finite number, not 'abc'"),
    ({"prompt": [{"role": "wizard", "content": "p"}], "chosen": "x", "rejected": "y"}, "roles must be system"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "y"}, "missing field 'content'"),
])
def test_a_bad_preference_row_is_refused_with_on_bad_row_fail(tmp_path, store_url, line, message):
    before = _seeded(store_url)
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(UserError, match=f"prefs.jsonl:2: {message}"):
        run_import(ImportConfig(db=store_url, file=str(path), on_bad_row="fail"))
    _intact(store_url, before)


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n', r"bad.jsonl:2: not UTF-8 text \(byte 0xe9\)"),
    ("bad.csv", b"prompt\nfine\nok\ncaf\xff\n", r"bad.csv:4: not UTF-8 text \(byte 0xff\)"),
    ("bad.json", b'[{"prompt": "a"},\n {"prompt": ]', r"bad.json:2: not valid JSON"),
    ("bad.json", b'{"prompt": "a"}', r"bad.json: expected a JSON list of objects"),
    ("bad.parquet", b"PAR1 this is not parquet at all", r"bad.parquet: not a readable Parquet file"),
    ("split.jsonl", b'{"prompt": "a", "split": ["train", "test"]}\n', r"split.jsonl:1: split must be text, not list"),
    ("src.jsonl", b'{"prompt": "a", "source": 7}\n', r"src.jsonl:1: source must be text, not int"),
    ("role.jsonl", b'{"messages": [{"role": "root", "content": "a"}]}\n', r"role.jsonl:1: roles must be system"),
])
def test_unreadable_files_are_one_line_from_the_cli(tmp_path, capsys, name, content, message):
    db = f"sqlite:///{tmp_path / 'store.db'}"
    before = _seeded(db)
    (tmp_path / name).write_bytes(content)
    assert main(["data", "import", "--db", db, "--file", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    _intact(db, before)


def test_export_into_an_unwritable_path_is_one_line(tmp_path, capsys, db):
    _seeded(db)
    (tmp_path / "a-file").write_text("not a directory")
    assert main(["data", "export", "--db", db, "--out", str(tmp_path / "a-file" / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the export to" in err and "Traceback" not in err


def test_importing_the_same_file_twice_adds_nothing_the_second_time(tmp_path, store_url, capsys):
    hh = str(FIXTURES / "hh_sample.jsonl")
    assert run_import(ImportConfig(db=store_url, file=hh)) == {"annotators": 1, "responses": 10, "votes": 5,
                                                                 "tasks": 5}
    before = Store(store_url).counts()
    assert run_import(ImportConfig(db=store_url, file=hh)) == {"skipped": 5}
    assert "skipped 5 already in the store" in capsys.readouterr().out
    assert Store(store_url).counts() == before
    # A lossless dump of that store, imported into it again, and a prompts file imported twice: the same.
    store = Store(store_url)
    [pid] = store.add_prompts(["Waiting for generation."])
    store.add_responses(pid, ["an unpaired sample"], model="m")
    (tmp_path / "dump.jsonl").write_text("".join(json.dumps(r) + "\n" for r in store.dump()))
    before = store.counts()
    # 5 tasks and the unpaired sample are skipped (the annotator record names one who exists: nothing to add).
    assert run_import(ImportConfig(db=store_url, file=str(tmp_path / "dump.jsonl"))) == {"skipped": 5 + 1}
    assert store.counts() == before
    (tmp_path / "p.jsonl").write_text('{"prompt": "new one"}\n{"prompt": "Waiting for generation."}\n')
    assert run_import(ImportConfig(db=store_url, file=str(tmp_path / "p.jsonl"))) == {"prompts": 1, "skipped": 1}
    assert run_import(ImportConfig(db=store_url, file=str(tmp_path / "p.jsonl"))) == {"prompts": 0, "skipped": 2}


def test_hh_rlhf_as_published_imports_its_good_rows_and_lists_the_bad(tmp_path, store_url, capsys):
    """Anthropic's harmless-base files hold rows ending in an empty reply and pairs whose histories differ
    before the last reply (the fixture reproduces both, at lines 4 and 5): the rest imports."""
    path = FIXTURES / "hh_harmless_shapes.jsonl"
    before = Store(store_url).counts()
    with pytest.raises(UserError, match=r"hh_harmless_shapes.jsonl:4: empty rejected response"):
        run_import(ImportConfig(db=store_url, file=str(path), on_bad_row="fail"))
    _intact(store_url, before)
    result = run_import(ImportConfig(db=store_url, file=str(path)))
    assert result["tasks"] == 4 and result["bad_rows"] == 2
    out = capsys.readouterr().out
    assert "left out 2 bad rows" in out
    assert "hh_harmless_shapes.jsonl:4: empty rejected response" in out
    assert "hh_harmless_shapes.jsonl:5: chosen and rejected do not share the same conversation" in out
    tasks = Store(store_url).tasks()
    assert len(tasks) == 4 and max(len(t["prompt"]) for t in tasks) == 3


def test_a_prompt_import_is_one_transaction(tmp_path, db, monkeypatch):
    """Prompts of several splits are written together: a failure halfway (here the 3rd prompt, of the second
    split) leaves none of them, not the first split's."""
    import rlhf.store.writes as writes

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "split": "train" if i < 2 else "test"})
                                              + "\n" for i in range(4)))
    before = Store(db).counts()
    real, calls = writes.prompt_key, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed halfway")
        return real(*args, **kwargs)

    monkeypatch.setattr(writes, "prompt_key", failing)
    with pytest.raises(RuntimeError):
        run_import(ImportConfig(db=db, file=str(tmp_path / "p.jsonl")))
    assert Store(db).counts() == before


def test_imported_votes_have_no_shown_side(db):
    run_import(ImportConfig(db=db, file=str(FIXTURES / "hh_sample.jsonl")))
    stats = quality_stats(Store(db).tasks())
    [who] = stats["annotators"].values()
    assert who["votes"] == 5 and who["left_share"] is None and who["sided_votes"] == 0 and stats["sided_votes"] == 0
    from rlhf.data import format_stats

    assert "100.0%" not in format_stats(stats) and "0 A/B votes with a shown side" in format_stats(stats)


def test_export_skips_votes_that_do_not_fit_a_ranking_task(tmp_path, db):
    """A store written before votes were checked against their task: an A/B vote and a partial ranking on a
    ranking task are left out of the export (they made it die with KeyError, or became three both-bad ties)."""
    from rlhf.store import Annotator, Vote

    store = Store(db)
    [pid] = store.add_prompts(["Rank three."])
    task = store.add_task(store.add_responses(pid, ["one", "two", "three"], model="m"), kind="rank", overlap=3)
    with store.session() as s:
        for name, choice, ranking in (("x", "A", None), ("y", "ranked", [[0]]), ("z", "ranked", [[2], [1], [0]])):
            who = Annotator(name=name)
            s.add(who)
            s.flush()
            s.add(Vote(task_id=task, annotator_id=who.id, choice=choice, ranking=ranking))
    assert run_export(ExportConfig(db=db, out=str(tmp_path / "e"), test_size=0.0)) == {"train": 3, "test": 0,
                                                                                         "ties": 0, **NONE_RATED}


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"prompt": "a", "chosen": "b"\n', r"bad.jsonl:1: not valid JSON"),
    ("latin1.jsonl", b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n', r"latin1.jsonl:1: not UTF-8"),
    ("holes.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                    b'{"prompt": null, "chosen": "b", "rejected": "c"}\n', r"holes.jsonl:2: prompt must be text"),
    ("broken.parquet", b"PAR1 not parquet", r"broken.parquet: not a readable Parquet file"),
    ("roles.jsonl", b'{"prompt": [{"content": "a"}], "chosen": "b", "rejected": "c"}\n',
     r"not text or \{role, content\}"),
])
def test_a_trainer_s_bad_preference_file_is_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_preference_dataset(str(tmp_path / name))


def test_loading_writes_no_progress_bars_around_an_error(tmp_path, capsys):
    """`datasets` draws progress bars on stderr; above an error they made the CLI's one line several."""
    (tmp_path / "cols.csv").write_text("prompt,chosen\na,b\n")
    with pytest.raises(UserError, match="missing column"):
        load_preference_dataset(str(tmp_path / "cols.csv"))
    assert capsys.readouterr().err == ""


def test_ratings_and_edits_export_for_kto_and_sft_and_round_trip(tmp_path, db):
    """Ratings become KTO rows (majority thumb, mean Likert; an even split is left out), each edit an SFT
    demonstration and pairs edited > original (both originals for a pair), marked edit = true; the tasks dump
    carries ratings and edits losslessly."""
    store = Store(db)
    for name in ("a", "b", "c"):
        store.add_annotator(name)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Review a film."}]
    [pid] = store.add_prompts([conversation])
    _, [pair, up, down, split] = store.add_candidates(
        pid, [("Good film.", "m", {}), ("Bad film.", "m", {}), ("Meh film.", "m", {})], [([0, 1], "random")],
        overlap=3, rate=True)
    store.submit("a", pair, "A")
    store.submit_rating("a", up, "up", likert=5)
    store.submit_rating("b", up, "up", likert=4)
    store.submit_rating("a", down, "down", likert=1)
    store.submit_rating("b", down, "up")
    store.submit_rating("c", down, "down")  # 2 of 3 down
    store.submit_rating("a", split, "up")
    store.submit_rating("b", split, "down")  # an even split: no label
    store.save_edit("c", pair, 1, "A film worth seeing, <i>truly</i>.")
    store.save_edit("a", down, 0, "Better film.")
    counts = run_export(ExportConfig(db=db, out=str(tmp_path / "e"), test_size=0.0))
    assert (counts["ratings_train"], counts["edits"], counts["train"]) == (2, 2, 1 + 2 + 1)
    ratings = [json.loads(line) for line in (tmp_path / "e" / "ratings_train.jsonl").read_text().splitlines()]
    by_text = {r["completion"][0]["content"]: r for r in ratings}
    assert (by_text["Good film."]["label"], by_text["Good film."]["likert"]) == (True, 4.5)
    assert (by_text["Bad film."]["label"], by_text["Bad film."]["agreement"]) == (False, pytest.approx(2 / 3))
    assert by_text["Good film."]["prompt"] == conversation  # the whole conversation is the prompt
    demos = [json.loads(line) for line in (tmp_path / "e" / "edits.jsonl").read_text().splitlines()]
    assert {d["messages"][-1]["content"] for d in demos} == {"A film worth seeing, <i>truly</i>.", "Better film."}
    assert all(d["messages"][:-1] == conversation for d in demos)
    pairs = load_preference_dataset(str(tmp_path / "e"))["train"]
    edited = sorted((r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in pairs if r["edit"])
    better = "A film worth seeing, <i>truly</i>."
    assert edited == [(better, "Bad film."), (better, "Good film."), ("Better film.", "Bad film.")]
    assert [r["edit"] for r in pairs if r["chosen_model"] == "m"] == [False]
    without = run_export(ExportConfig(db=db, out=str(tmp_path / "no-edits"), test_size=0.0, edit_pairs=False))
    assert (without["train"], without["edits"]) == (1, 2)
    # The lossless dump: ratings (with Likert) and edits come back as they were.
    db2 = f"sqlite:///{tmp_path / 'copy.db'}"
    run_import(ImportConfig(db=db2, file=str(tmp_path / "e" / "tasks.jsonl")))
    strip = lambda tasks: [{k: v for k, v in t.items() if k != "task_id"} for t in tasks]  # noqa: E731
    for kind in ("pair", "rate"):
        assert strip(Store(db2).tasks(kind=kind)) == strip(store.tasks(kind=kind))
    assert Store(db2).counts()["edits"] == 2


@pytest.mark.parametrize("change, message", [
    ({"kind": "rate"}, "a rate task takes one response"),
    ({"votes": [{"annotator": "x", "choice": "A"}]}, "a rate task takes choice up, down"),
    ({"votes": [{"annotator": "x", "choice": "up", "likert": 7}]}, "Likert score is a whole number"),
    ({"edits": [{"annotator": "x", "position": 1, "text": "new"}]}, "position must name one of the task's 1"),
    ({"edits": [{"annotator": "x", "position": 0, "text": "Fine."}]}, "same as the answer"),
])
def test_a_rating_import_with_bad_rows_changes_nothing(tmp_path, db, change, message):
    row = {"kind": "rate", "prompt": "p", "responses": [{"text": "Fine.", "model": "m"}], **change}
    if change.get("kind") == "rate":
        row["responses"] = [{"text": "One."}, {"text": "Two."}]
    store = Store(db)
    before = store.counts()
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"record": "task", **row}) + "\n")
    with pytest.raises(UserError, match=message):
        run_import(ImportConfig(db=db, file=str(tmp_path / "tasks.jsonl"), kind="tasks"))
    assert store.counts() == before


def test_rating_agreement_by_hand(tmp_path, db):
    """Two raters on 6 responses agree on 5 thumbs: p_o = 5/6, p_e = (3*4 + 3*2) / 36 = 1/2, kappa = 2/3; Likert
    scores identical on every response give ordinal alpha 1; `rlhf data stats` prints both."""
    store = Store(db)
    store.add_annotator("a")
    store.add_annotator("b")
    [pid] = store.add_prompts(["Rate me."])
    _, tasks = store.add_candidates(pid, [(f"answer {i}", "m", {}) for i in range(6)], [], overlap=2, rate=True)
    for i, (x, y) in enumerate(zip(["up", "up", "up", "down", "down", "down"], ["up", "up", "up", "up", "down",
                                                                                 "down"])):
        store.submit_rating("a", tasks[i], x, likert=1 + i % 5)
        store.submit_rating("b", tasks[i], y, likert=1 + i % 5)
    ratings = quality_stats(store.tasks(kind="rate"))["ratings"]
    assert ratings["cohen_kappa"] == {"a ~ b": pytest.approx(2 / 3)}
    assert ratings["krippendorff_alpha_ordinal"] == pytest.approx(1.0)
    assert (ratings["ratings"], ratings["up_share"]) == (12, pytest.approx(7 / 12))
    printed = run_stats(StatsConfig(db=db))
    assert printed["ratings"]["cohen_kappa"] == {"a ~ b": pytest.approx(2 / 3)}


def test_rated_responses_import_as_rating_tasks_and_export_back(tmp_path, db):
    """A file of rated responses (KTO's format: label, or a Likert score only: 4-5 up, 1-2 down, 3 no label) becomes
    rating tasks with their vote; a bad row is left out and listed; the export gives the same labels back."""
    rows = [{"prompt": "p1", "completion": "Lovely.", "label": True},
            {"prompt": [{"role": "user", "content": "p2"}], "completion": [{"role": "assistant", "content": "Dull."}],
             "label": "false", "likert": 2},
            {"prompt": "p3", "completion": "Fine.", "likert": 5},
            {"prompt": "p4", "completion": "So-so.", "likert": 3},
            {"prompt": "p5", "completion": "Odd.", "label": "maybe"}]
    path = tmp_path / "ratings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_import(ImportConfig(db=db, file=str(path)))
    assert (result["tasks"], result["votes"], result["bad_rows"]) == (3, 3, 2)
    votes = {v["responses"][0]: (v["choice"], v["likert"]) for v in Store(db).votes(kind="rate")}
    assert votes == {"Lovely.": ("up", None), "Dull.": ("down", 2), "Fine.": ("up", 5)}
    run_export(ExportConfig(db=db, out=str(tmp_path / "e"), test_size=0.0))
    exported = [json.loads(line) for line in (tmp_path / "e" / "ratings_train.jsonl").read_text().splitlines()]
    assert sorted((r["completion"][0]["content"], r["label"]) for r in exported) == [
        ("Dull.", False), ("Fine.", True), ("Lovely.", True)]
    with pytest.raises(UserError, match=r"ratings.jsonl:4: no label, and no Likert score but 3"):
        run_import(ImportConfig(db=db, file=str(path), on_bad_row="fail"))
    assert Store(db).counts()["tasks"] == 3
