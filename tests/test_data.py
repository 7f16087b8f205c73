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
    assert first == {"train": 5, "test": 0, "ties": 0}
    exported = load_preference_dataset(str(tmp_path / "e1"))
    # Re-import the exported TRL-format pairs into a fresh store, export again: the same pairs.
    db2 = f"sqlite:///{tmp_path / 'second.db'}"
    run_import(ImportConfig(db=db2, file=str(tmp_path / "e1" / "train.jsonl")))
    run_export(ExportConfig(db=db2, out=str(tmp_path / "e2"), test_size=0.0))
    again = load_preference_dataset(str(tmp_path / "e2"))
    assert _pairs(exported["train"]) == _pairs(again["train"])
    multi = [r for r in exported["train"] if len(r["prompt"]) == 3]
    assert len(multi) == 1 and multi[0]["chosen"][0]["content"].startswith("Spaghetti")


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
    assert counts == {"train": 6 + 5, "test": 0, "ties": 1}
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
    assert counts == {"train": 2, "test": 0, "ties": 0}
