"""Candidate generation into the store, pairing, interruption, and simulated annotators voting on it."""

from __future__ import annotations

import pytest

import rlhf.generate as generate_module
from rlhf.annotators import LabelSimConfig, label_sim, sentiment
from rlhf.config import UserError, load_config
from rlhf.generate import GenerateConfig, run
from rlhf.store import Store


def _config(tmp_path, model, **kw):
    base = dict(model=model, db=f"sqlite:///{tmp_path / 'store.db'}", prompts="sentiment", limit=6, n=2,
                max_new_tokens=6, batch_size=4, device="cpu")
    return load_config(GenerateConfig, **{**base, **kw})


def test_generation_creates_responses_and_tasks(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, round=2, overlap=2)
    result = run(config)
    assert result["prompts"] == 6 and result["responses"] == 12 and result["tasks"] == 6
    tasks = Store(config.db).tasks()
    assert len(tasks) == 6 and {t["round"] for t in tasks} == {2} and {t["overlap"] for t in tasks} == {2}
    for task in tasks:
        assert len(task["responses"]) == 2
        assert {r["model"] for r in task["responses"]} == {tiny_model_dir}
        assert task["responses"][0]["params"]["max_new_tokens"] == 6


def test_across_pairing_takes_one_response_per_model(tmp_path, tiny_model_dir, tiny_reward_dir):
    # Any second causal LM on the same tokenizer will do; a copy of the policy under another path is enough.
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "other")
    config = _config(tmp_path, tiny_model_dir, pairing="across", second_model=str(tmp_path / "other"), n=1)
    run(config)
    for task in Store(config.db).tasks():
        assert sorted(r["model"] for r in task["responses"]) == sorted([tiny_model_dir, str(tmp_path / "other")])
        assert task["how"] == "across"


def test_ctrl_c_keeps_every_finished_prompt_and_nothing_half_written(tmp_path, tiny_model_dir, monkeypatch):
    real = generate_module.generate_batch
    calls = {"n": 0}

    def interrupted_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate_batch", interrupted_on_third_batch)
    config = _config(tmp_path, tiny_model_dir, limit=8)  # batch 4 = 2 prompts x 2 samples per batch
    result = run(config)
    assert result["interrupted"] and result["prompts"] == 4
    tasks = Store(config.db).tasks()
    assert len(tasks) == 4 and all(len(t["responses"]) == 2 for t in tasks)


def test_rank_makes_one_ranking_task_of_k_responses_per_prompt(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, n=4, rank=4, limit=3, round=1)
    assert run(config)["tasks"] == 3
    store = Store(config.db)
    assert store.tasks() == []  # no pairs
    ranked = store.tasks(kind="rank")
    assert len(ranked) == 3 and all(len(t["responses"]) == 4 and t["round"] == 1 for t in ranked)
    assert all(len({r["id"] for r in t["responses"]}) == 4 for t in ranked)


def test_simulated_oracle_ranks_by_gold(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, n=3, rank=3, limit=4)
    run(config)
    result = label_sim(LabelSimConfig(db=config.db, annotator="oracle", gold="sentiment", tau=0.0))
    assert result["rankings"] == 4
    for task in Store(config.db).tasks(kind="rank"):
        [vote] = task["votes"]
        golds = sentiment([None] * 3, [r["text"] for r in task["responses"]])
        flat = [p for group in vote["ranking"] for p in group]
        assert [golds[p] for p in flat] == sorted(golds, reverse=True) and sorted(vote["shown"]) == [0, 1, 2]


def test_bad_generate_options_are_clear():
    for bad in (dict(pairing="across"), dict(pairing="active"), dict(n=1), dict(pairing="best"), dict(n=4, rank=2),
                dict(n=3, rank=4), dict(n=10, rank=10)):
        with pytest.raises(UserError):
            load_config(GenerateConfig, **bad)


def test_simulated_annotator_with_zero_tau_agrees_with_gold(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, limit=8)
    run(config)
    # Make the gold order unambiguous: rewrite nothing, just check each stored vote against VADER itself.
    result = label_sim(LabelSimConfig(db=config.db, annotator="oracle", gold="sentiment", tau=0.0))
    assert result["votes"] == 8
    for vote in Store(config.db).votes():
        a, b = sentiment([None, None], vote["responses"])
        if a != b:
            assert vote["choice"] == ("A" if a > b else "B")
    assert Store(config.db).next_task("oracle") is None  # every open task got its vote


def test_a_missing_model_leaves_the_store_as_it_was(tmp_path):
    """The models load before the first write: a model that does not load stores no prompts (254 did)."""
    config = _config(tmp_path, str(tmp_path / "no-such-model"))
    Store(config.db).add_prompts(["already here"])
    before = Store(config.db).counts()
    with pytest.raises(UserError):
        run(config)
    assert Store(config.db).counts() == before


def test_label_sim_fails_before_creating_its_annotator(tmp_path, monkeypatch):
    """A gold function that fails, or a name that is a person's account: refused, and no annotator is made."""
    import types

    db = f"sqlite:///{tmp_path / 'store.db'}"
    broken = types.ModuleType("broken_gold")
    broken.score = lambda prompts, responses: 1 / 0
    monkeypatch.setitem(__import__("sys").modules, "broken_gold", broken)
    with pytest.raises(UserError, match="fails on a probe: ZeroDivisionError"):
        label_sim(LabelSimConfig(db=db, annotator="sim-broken", gold="broken_gold:score"))
    assert Store(db).counts()["annotators"] == 0
    Store(db).add_annotator("alice")
    with pytest.raises(UserError, match="'alice' is a person's account"):
        label_sim(LabelSimConfig(db=db, annotator="alice", gold="length"))
    assert not Store(db).annotator("alice").simulated and Store(db).counts()["votes"] == 0


def test_a_prompts_responses_and_tasks_are_one_transaction(tmp_path, tiny_model_dir, monkeypatch):
    """A failure while a prompt's tasks are written (here its second task) leaves none of that prompt's responses:
    no response is stored without its task."""
    import rlhf.store.writes as writes

    real, made = writes.TaskItem, []

    def failing_item(**kwargs):
        made.append(kwargs["task_id"])
        if len(set(made)) == 4:  # the second prompt's second task
            raise RuntimeError("killed halfway")
        return real(**kwargs)

    monkeypatch.setattr(writes, "TaskItem", failing_item)
    config = _config(tmp_path, tiny_model_dir, limit=2, n=4, pairs_per_prompt=2)
    with pytest.raises(RuntimeError):
        run(config)
    store = Store(config.db)
    counts = store.counts()
    # The first prompt complete (4 responses, 2 tasks), nothing of the second.
    assert (counts["responses"], counts["tasks"], counts["task_items"]) == (4, 2, 4)


def test_rate_adds_a_rating_task_per_response_and_the_simulated_annotator_rates_them(tmp_path, tiny_model_dir):
    """--rate: beside each prompt's pair, one rating task per response (the same responses); label-sim gives each a
    thumb from its gold against the threshold (tau 0: exactly) and a Likert score."""
    config = _config(tmp_path, tiny_model_dir, limit=3, rate=True)
    assert run(config)["tasks"] == 3 + 6
    store = Store(config.db)
    rated = store.tasks(kind="rate")
    assert len(rated) == 6 and all(len(t["responses"]) == 1 for t in rated)
    pair_responses = {r["id"] for t in store.tasks() for r in t["responses"]}
    assert {t["responses"][0]["id"] for t in rated} == pair_responses
    result = label_sim(LabelSimConfig(db=config.db, annotator="oracle", gold="sentiment", tau=0.0,
                                      rate_threshold=0.0, likert_step=0.25))
    assert (result["votes"], result["ratings"]) == (3 + 6, 6)
    for task in store.tasks(kind="rate"):
        [v] = task["votes"]
        g = sentiment(["p"], [task["responses"][0]["text"]])[0]
        assert v["choice"] == ("up" if g > 0.0 else "down") and 1 <= v["likert"] <= 5
