"""The arena's rules (rlhf.arena) on a store, without the app; its statistics are tested in test_evaluate.py."""

from __future__ import annotations

import random

import pytest

from rlhf.arena import (
    Arena,
    arena_name,
    ask_both,
    conversation_text,
    draw_prompt,
    parse_contestants,
    parse_conversation,
    record_vote,
    standings,
)
from rlhf.config import UserError
from rlhf.store import Store


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'arena.db'}")


def test_contestants_are_named_as_the_store_records_them():
    base, prompted = parse_contestants(["base = smollm2", "prompted=smollm2 | Be kind."])
    assert (base["label"], base["model"], base["system"], base["name"]) == ("base", "smollm2", "", "smollm2")
    assert prompted["name"] == arena_name("smollm2", "Be kind.") == "smollm2 | system: Be kind."
    for entries in (["no-equals-sign"], ["=smollm2"], ["a="], ["a=m", "a=n"], ["a=m", "b=m"]):
        with pytest.raises(ValueError):
            parse_contestants(entries)


def test_a_vote_is_checked_saved_once_and_counted_in_the_standings(store):
    arena = Arena(parse_contestants(["base=m0", "aligned=m1"]))
    store.add_annotator("fan")
    messages = [{"role": "user", "content": "Review Alien."}]
    task_id = store.add_arena_task(messages, [("answer 0", "m0", {}), ("answer 1", "m1", {})])
    current = {"task_id": task_id, "labels": ["base", "aligned"], "shown_at": 0.0}
    assert record_vote(store, "fan", {"task_id": None}, "A") == ("Ask both models first.", False)
    assert record_vote(store, "fan", current, "left") == ("Choose A, B, tie or both bad.", False)
    assert record_vote(store, "fan", current, "B") == ("Saved: B is better.", True)
    assert record_vote(store, "fan", current, "A") == ("This one has its vote already; ask again.", False)
    figures = standings(store, arena)
    assert figures["votes"] == 1 and figures["win_rate_human"]["m1"]["mean"] == 1.0
    assert figures["ratings"]["m1"]["rating"] > figures["ratings"]["m0"]["rating"]


def test_an_empty_or_long_prompt_is_refused_before_any_model_runs(store):
    arena = Arena(parse_contestants(["a=missing-a", "b=missing-b"]))  # would fail to load if asked
    assert ask_both(store, arena, "   ", random.Random(0)) == {"task_id": None,
                                                              "message": "Type a prompt or draw one first."}
    assert "too long" in ask_both(store, arena, "x" * 4001, random.Random(0))["message"]
    assert store.tasks(kind="arena") == []


def test_an_arena_model_that_cannot_load_is_a_clear_error(store, tmp_path):
    arena = Arena(parse_contestants([f"a={tmp_path / 'missing-a'}", f"b={tmp_path / 'missing-b'}"]), max_new_tokens=4)
    with pytest.raises(UserError):  # the page shows its one line and stays usable
        ask_both(store, arena, "Review a film.", random.Random(0))
    assert store.tasks(kind="arena") == []  # nothing half-stored


def test_a_drawn_prompt_is_a_held_out_one_when_there_is_one(store):
    assert draw_prompt(store) == "Write a short review of your favourite film."
    store.add_prompts(["Train prompt."])
    assert draw_prompt(store) == "Train prompt."
    store.add_prompts(["Test prompt."], split="test")
    assert {draw_prompt(store) for _ in range(5)} == {"Test prompt."}


def test_the_arena_and_the_pairs_page_take_votes_only_on_their_own_kind_of_task(store):
    from rlhf import labeling

    store.add_annotator("fan")
    arena_task = store.add_arena_task([{"role": "user", "content": "Hi."}], [("a", "m0", {}), ("b", "m1", {})])
    [pid] = store.add_prompts(["Review a film."])
    pair_task = store.add_task(store.add_responses(pid, ["good", "bad"], model="m"), overlap=1)
    before = store.counts()
    message, saved = record_vote(store, "fan", {"task_id": pair_task, "shown_at": 0.0}, "A")
    assert not saved and "not an arena task" in message
    assert not record_vote(store, "fan", {"task_id": 10**6, "shown_at": 0.0}, "A")[1]
    message, vote_id = labeling.vote(store, "fan", {"task_id": arena_task, "left_is_a": True}, "left", "strong", "",
                                     "v1")
    assert vote_id is None and "arena task" in message
    assert store.counts() == before


def test_a_typed_conversation_becomes_its_turns_and_reads_back():
    typed = "System: Be brief.\nUser: Hi\nAssistant: Hello!\nuser: Review Alien,\nin two lines."
    turns = parse_conversation(typed)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[3]["content"] == "Review Alien,\nin two lines."
    assert parse_conversation(conversation_text(turns)) == turns
    assert parse_conversation("Review Alien. User: not a turn") == [
        {"role": "user", "content": "Review Alien. User: not a turn"}]  # a marker counts only at a line's start
    assert conversation_text([{"role": "user", "content": "Just this."}]) == "Just this."
    with pytest.raises(ValueError, match="ends with the user's turn"):
        parse_conversation("User: Hi\nAssistant: Hello!")
    with pytest.raises(ValueError, match="needs text"):
        parse_conversation("User: Hi\nAssistant:\nUser: Well?")


def test_a_conversation_is_asked_whole_and_a_malformed_one_is_refused(store):
    arena = Arena(parse_contestants(["a=missing-a", "b=missing-b"]))  # would fail to load if asked
    refused = ask_both(store, arena, "User: Hi\nAssistant: Hello!", random.Random(0))
    assert refused["task_id"] is None and "ends with the user's turn" in refused["message"]
    store.add_prompts([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "A film?"}]], split="test")
    assert draw_prompt(store) == "User: Hi\n\nAssistant: Hello!\n\nUser: A film?"
