"""The rounds of loop runs as the store records them (rlhf.rounds): records, the figures a step adds, the live
figures, the plots' rows and `rlhf rounds`. The loop writing them end to end: tests/test_loop.py."""

from __future__ import annotations

import pytest

from rlhf.cli import main
from rlhf.rounds import (
    curves,
    describe,
    record_step,
    report_path,
    reward_agreement,
    rounds,
    run_key,
    step_figures,
    wilson_interval,
)
from rlhf.store import Store, StoreError

REWARD = {"test_pairs": 40, "test_prompts": 8, "accuracy": 0.7, "accuracy_ci": [0.6, 0.8], "train_pairs": 300,
          "ceiling": {"value": 0.9, "ci": [0.85, 0.95], "pairs": 40}, "verdict": "better than chance"}
EVALUATION = {"config": {"output_dir": "EVAL"}, "best_prompt_baseline": "prompt", "models": [
    {"label": "base", "role": "base", "kl_vs_base": 0.0},
    {"label": "prompt", "role": "prompt", "win_rate_gold": 0.6, "win_rate_gold_ci": [0.5, 0.7], "kl_vs_base": 3.0},
    {"label": "dpo", "role": "aligned", "win_rate_gold": 0.8, "win_rate_gold_ci": [0.7, 0.9],
     "win_rate_gold_vs_prompt": 0.66, "win_rate_gold_vs_prompt_ci": [0.55, 0.77], "kl_vs_base": 7.5,
     "win_rate_reward": 0.9, "win_rate_reward_ci": [0.8, 1.0]},
    {"label": "rloo", "role": "aligned", "win_rate_reward": 0.7, "win_rate_reward_ci": [0.6, 0.8],
     "kl_vs_base": None}]}


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'r.db'}")


def test_records_are_json_by_key_and_refuse_the_schema_key(store):
    store.put_record("loop:a", {"x": [1, "é"]})
    store.put_record("loop:a", {"x": 2})  # replaced, not added
    store.put_record("loop_b", {"y": 1})  # '_' in the prefix is a character, not LIKE's wildcard
    store.put_record("other", {"z": 1})
    assert store.records("loop:") == {"loop:a": {"x": 2}}
    assert set(store.records("")) == {"loop:a", "loop_b", "other"}  # never the schema version
    for bad in ("", "schema_version", "k" * 65):
        with pytest.raises(StoreError):
            store.put_record(bad, {})
    assert store.records("schema") == {}


def test_each_step_adds_its_figures():
    assert step_figures("export", {"train": 10, "test": 2, "ties": 1, "_seconds": 3}) == {
        "labels": {"train": 10, "test": 2, "ties": 1}}
    reward = step_figures("reward", REWARD)["reward"]
    assert (reward["accuracy"], reward["ceiling"], reward["train_pairs"], reward["test_pairs"]) == (0.7, 0.9, 300, 40)
    assert step_figures("reward", {"test_pairs": 0})["reward"]["verdict"].startswith("no test pairs")
    figures = step_figures("evaluate", EVALUATION)
    dpo, rloo = figures["models"]  # the aligned ones only, by the best judge each has
    assert dpo == {"label": "dpo", "judge": "gold", "kl": 7.5, "vs_base": 0.8, "vs_base_ci": [0.7, 0.9],
                   "vs_prompt": 0.66, "vs_prompt_ci": [0.55, 0.77]}
    assert rloo == {"label": "rloo", "judge": "reward", "kl": None, "vs_base": 0.7, "vs_base_ci": [0.6, 0.8]}
    assert figures["report"].endswith("EVAL/report.html") and figures["prompt_baseline"] == "prompt"
    assert step_figures("dpo", {"loss": 1.0}) == {}


def _vote(store, who: str, choice: str, p_a: float | None, round_: int = 1) -> None:
    [pid] = store.add_prompts([f"prompt {who} {choice} {p_a} {round_}"])
    task = store.add_task(store.add_responses(pid, ["one", "two"], model="m"), round=round_)
    vote_id = store.submit(who, task, choice)
    if p_a is not None:
        store.set_model_verdict(vote_id, p_a, queue=False)


def test_the_app_reward_models_agreement_with_the_votes_arriving(store):
    store.add_annotator("ann")
    assert reward_agreement(store.votes()) is None  # no judged vote yet
    # Agrees (A, 0.8), agrees (B, 0.1), disagrees (A, 0.3), a coin flip (0.5): (1 + 1 + 0 + 0.5) / 4.
    for choice, p_a in (("A", 0.8), ("B", 0.1), ("A", 0.3), ("B", 0.5)):
        _vote(store, "ann", choice, p_a)
    _vote(store, "ann", "tie", 0.9)  # not decisive: left out
    _vote(store, "ann", "A", None)  # cast without a reward model in the app: left out
    figure = reward_agreement(store.votes())
    assert figure["votes"] == 4 and figure["agreement"] == pytest.approx(2.5 / 4)
    assert figure["ci"] == pytest.approx(list(wilson_interval(2.5, 4)))


def test_the_wilson_interval_by_hand():
    # p = 0.5, n = 4, z = 1.96: centre 0.5; half = 1.96 / (1 + 0.9604) * sqrt(0.0625 + 0.060025) = 0.3500
    lo, hi = wilson_interval(2, 4)
    assert lo == pytest.approx(0.5 - 0.3500, abs=1e-3) and hi == pytest.approx(0.5 + 0.3500, abs=1e-3)
    # One vote, a miss: not [0, 0] but [0, 0.79] (1.96^2 / (1 + 1.96^2) = 0.7935).
    assert wilson_interval(0, 1) == pytest.approx((0.0, 0.7935), abs=1e-4)


def test_rounds_combine_the_record_with_live_progress_then_the_plots_rows(store, tmp_path):
    assert rounds(store) == [] and describe([]).startswith("No loop run")
    root = tmp_path / "runs" / "demo"
    (root / "round-1" / "eval").mkdir(parents=True)
    (root / "round-1" / "eval" / "report.html").write_text("<p>report</p>")
    store.add_annotator("ann")
    _vote(store, "ann", "A", 0.9, round_=1)
    record_step(store, root, "demo", 1, "generate", {"tasks": 1})
    record_step(store, root, "demo", 1, "export", {"train": 120, "test": 30, "ties": 0})
    record_step(store, root, "demo", 1, "reward", REWARD)
    record_step(store, root, "demo", 1, "evaluate", {**EVALUATION,
                                                      "config": {"output_dir": str(root / "round-1" / "eval")}})
    record_step(store, root, "demo", 1, "evaluate", EVALUATION | {"config": {"output_dir": str(
        root / "round-1" / "eval")}})  # resumed: recorded once
    record_step(store, root, "demo", 2, "generate", {"tasks": 1})
    [run] = rounds(store)
    assert run["key"] == run_key(root) and run["name"] == "demo" and run["root"] == str(root.resolve())
    first, second = run["rounds"]
    assert first["steps"] == ["generate", "export", "reward", "evaluate"] and second["steps"] == ["generate"]
    assert first["pairs"]["votes"] == 1 and first["annotators"][0]["annotator"] == "ann"
    assert first["reward_agreement"]["agreement"] == 1.0 and second["reward_agreement"] is None
    assert report_path(store, run["key"], 1) == (root / "round-1" / "eval" / "report.html").resolve()
    assert report_path(store, run["key"], 2) is None and report_path(store, "other", 1) is None
    rows = curves([run])
    assert rows["accuracy"] == [
        {"run": "demo", "pairs": 300, "series": "reward model", "accuracy": 0.7, "ci": [0.6, 0.8]},
        {"run": "demo", "pairs": 300, "series": "ceiling", "accuracy": 0.9, "ci": [0.85, 0.95]}]
    assert {(r["series"], r["win_rate"]) for r in rows["wins"]} == {
        ("dpo vs base", 0.8), ("dpo vs prompt", 0.66), ("rloo vs base", 0.7)}
    shown = describe([run])
    assert "held-out accuracy 70.0 % [60.0, 80.0] on 40 pairs, ceiling 90.0 %" in shown
    assert "dpo: vs base 80.0 % [70.0, 90.0], vs prompt 66.0 % [55.0, 77.0] (gold), KL 7.50 nats" in shown
    assert ("round 1: steps done generate, export, reward, evaluate; labeling: pairs 1/1 votes, 1/1 tasks complete"
            in shown)
    assert "round 2: steps done generate; labeling: no tasks yet" in shown


def test_a_report_path_is_only_a_recorded_report_file(store, tmp_path):
    root = tmp_path / "run"
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    record_step(store, root, "x", 1, "evaluate", {"models": [], "config": {"output_dir": str(tmp_path)}})
    store.put_record(run_key(root) + "x", {"rounds": {"1": {"report": str(secret)}}})  # not a report file
    assert report_path(store, run_key(root), 1) is None  # recorded, but no report.html there
    assert report_path(store, run_key(root) + "x", 1) is None


def test_the_cli_prints_the_rounds_or_one_line_for_a_missing_store(store, tmp_path, capsys):
    record_step(store, tmp_path / "r", "r", 1, "export", {"train": 5, "test": 1, "ties": 0})
    assert main(["rounds", "--db", store.url]) == 0
    assert "run r (" in capsys.readouterr().out
    assert main(["rounds", "--db", store.url, "--json"]) == 0
    assert '"labels"' in capsys.readouterr().out
    assert main(["rounds", "--db", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf rounds: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.db").exists()
