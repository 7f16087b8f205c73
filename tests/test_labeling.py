"""The rules of annotation (rlhf.labeling) on a store, without the app: what is served, the votes, the reward
model's verdict and the review queue, rankings, undo and the admin's rights."""

from __future__ import annotations

import random

import pytest

from rlhf import labeling
from rlhf.labeling import (
    model_verdict,
    next_pair,
    next_ranking,
    parse_order,
    placed_first,
    read_order,
    sides,
    stored_choice,
    submit_ranking,
    undo,
    vote,
)
from rlhf.store import Store

XSS = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"> **bold**"


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'labeling.db'}")
    for i in range(3):
        [pid] = s.add_prompts([f"Review film {i}."])
        ids = s.add_responses(pid, [f"Great film {i}! {XSS}", f"Dull film {i}. " + "long " * 30000], model="m")
        s.add_task(ids, overlap=2)
    return s


def test_sides_shown_map_to_stored_responses():
    assert [stored_choice(c, True) for c in ("left", "right", "tie", "both_bad")] == ["A", "B", "tie", "both_bad"]
    assert [stored_choice(c, False) for c in ("left", "right", "tie", "both_bad")] == ["B", "A", "tie", "both_bad"]
    assert sides({"a": "x", "b": "y", "left_is_a": True}) == ("x", "y")
    assert sides({"a": "x", "b": "y", "left_is_a": False}) == ("y", "x")


def test_vote_maps_screen_sides_to_stored_choice(store):
    store.add_annotator("ann")
    rng = random.Random(0)
    seen = 0
    while (task := next_pair(store, "ann", None, rng))["task_id"] is not None:
        message, _ = vote(store, "ann", task, "left", "strong", " because ", "v1")
        assert message.startswith("Saved")
        seen += 1
    assert seen == 3
    for v in store.votes():
        # "left" was chosen every time: the stored choice is whichever response was on the left.
        assert v["choice"] == v["left"] and v["strength"] == 3 and v["rationale"] == "because"
        assert v["guideline_version"] == "v1" and v["seconds"] is not None


def test_vote_needs_a_choice_and_undo_returns_the_task(store):
    store.add_annotator("ann")
    task = next_pair(store, "ann", None, random.Random(1))
    assert vote(store, "ann", task, "", "clear", "", "v1")[0].startswith("Choose")
    assert vote(store, "ann", task, "tie", "clear", "", "v1")[0].startswith("Saved")
    assert vote(store, "ann", task, "tie", "clear", "", "v1") == ("You had already voted on that one.", None)
    assert undo(store, "ann", 300).startswith("Your last vote was undone")
    assert store.votes() == []


def test_swapped_repeats_come_back_with_the_other_side_left(store):
    store.add_annotator("ann")
    rng = random.Random(3)
    first = next_pair(store, "ann", None, rng)
    vote(store, "ann", first, "left", "clear", "", "v1")
    repeat = next_pair(store, "ann", None, rng, repeat_share=1.0)  # always a repeat while one is possible
    assert repeat["task_id"] != first["task_id"] and repeat["left_is_a"] != first["left_is_a"]
    assert set(sides(repeat)) == set(sides(first)) and sides(repeat)[0] == sides(first)[1]
    vote(store, "ann", repeat, "right", "clear", "", "v1")  # the same response as before: consistent
    from rlhf.data import quality_stats

    stats = quality_stats(store.tasks())
    assert stats["annotators"]["ann"]["repeat_consistency"] == 1.0
    assert next_pair(store, "ann", None, rng, repeat_share=1.0)["task_id"] not in (first["task_id"], repeat["task_id"])


class FixedScores:
    """A reward model with known scores per response text (the queue rule is what is tested here)."""

    def __init__(self, scores: dict):
        self.scores = scores

    def score(self, prompts, responses):
        import torch

        return torch.tensor([self.scores[r] for r in responses])


def test_reward_model_verdict_comes_after_the_vote_and_queues_strong_disagreement(store, tiny_reward_dir):
    import math

    from rlhf.reward import RewardModel

    store.add_annotator("ann")
    rng = random.Random(5)
    task = next_pair(store, "ann", None, rng)
    assert "reward" not in str(task).lower()  # nothing about the model before the vote
    a, b = task["a"], task["b"]
    # Left chosen strongly while the model gives the left response e^-3 / (1 + e^-3) = 4.7 %: queued.
    left, right = (a, b) if task["left_is_a"] else (b, a)
    _, vote_id = vote(store, "ann", task, "left", "strong", "", "v1")
    message = model_verdict(store, FixedScores({left: 0.0, right: 3.0}), task, vote_id, "left", "strong", 0.2)
    assert message.startswith("The reward model gives the left response 5 %") and "queued for review" in message
    [queued] = store.review_queue()
    p_a = 1 / (1 + math.exp(3.0)) if task["left_is_a"] else 1 - 1 / (1 + math.exp(3.0))
    assert queued["vote_id"] == vote_id and queued["model_p_a"] == pytest.approx(p_a)
    # The same disagreement voiced only "clear" is shown but not queued; the real tiny reward model's verdict is the
    # sigmoid of its score difference.
    second = next_pair(store, "ann", None, rng)
    _, vote_2 = vote(store, "ann", second, "right", "clear", "", "v1")
    scorer = RewardModel.load(tiny_reward_dir, precision="fp32")
    message = model_verdict(store, scorer, second, vote_2, "right", "clear", 0.2)
    r_a, r_b = scorer.score([second["messages"]] * 2, [second["a"], second["b"]]).tolist()
    p_left = 1 / (1 + math.exp(r_b - r_a)) if second["left_is_a"] else 1 / (1 + math.exp(r_a - r_b))
    assert f"{100 * p_left:.0f} %" in message and "queued" not in message
    assert len(store.review_queue()) == 1


def test_parse_order_reads_numbers_ties_and_says_what_is_wrong():
    assert parse_order("3 1 4 2", 4) == [[3], [1], [4], [2]]
    assert parse_order("3=1 > 4, 2", 4) == [[3, 1], [4], [2]]
    assert parse_order("3 =1 4 2", 4) == [[3, 1], [4], [2]]
    for text, message in (("3 1 4", "still to place: 2"), ("3 1 4 2 2", "only once"), ("5 1 2 3", "not 5"),
                          ("= 1 2 3 4", "start with a number"), ("1 2 3 four", "unexpected")):
        with pytest.raises(ValueError, match=message):
            parse_order(text, 4)
    # The page's chips and its read-out (the HTML is tested with the app).
    assert read_order(parse_order("3=1 4 2", 4)) == "#3 = #1 > #4 > #2"
    assert placed_first("3=1 4 2", 4) == [3, 1, 4, 2] and placed_first("2", 4) == [2, 1, 3, 4]
    assert placed_first("", 4) == [1, 2, 3, 4] and placed_first("9 3 x", 4) == [3, 1, 2, 4]


def test_a_ranking_maps_shown_numbers_back_to_task_positions(store):
    store.add_annotator("ranker")
    [pid] = store.add_prompts(["Rank four."])
    ids = store.add_responses(pid, ["r0", "r1", "r2", "r3"], model="m")
    task_id = store.add_task(ids, kind="rank", overlap=1)
    task = next_ranking(store, "ranker", None, random.Random(2))
    assert task["task_id"] == task_id and sorted(task["shown"]) == [0, 1, 2, 3]
    assert [c for c in task["responses"]] == [f"r{p}" for p in task["shown"]]
    assert submit_ranking(store, "ranker", task, "1 2", False, "", "v1")[0].startswith("Not yet: still to place")
    message, _ = submit_ranking(store, "ranker", task, "2 = 4 1 3", False, "ok", "v1")
    assert message == "Saved your ranking."
    [v] = store.tasks(kind="rank")[0]["votes"]
    s = task["shown"]
    assert v["ranking"] == [sorted([s[1], s[3]]), [s[0]], [s[2]]] and v["shown"] == s and v["rationale"] == "ok"
    assert next_ranking(store, "ranker", None, random.Random(2))["task_id"] is None


def test_admin_rules_check_the_role_before_touching_the_store(store, tmp_path):
    store.add_annotator("ann")
    store.add_annotator("boss", role="admin")
    assert not labeling.is_admin(store, "ann") and labeling.is_admin(store, "boss")
    for rule, args in ((labeling.overview, ()), (labeling.review_queue, ()), (labeling.review, (1, "kept")),
                       (labeling.add_prompts, ("new prompt", "test")), (labeling.add_annotator, ("eve", True)),
                       (labeling.export, (str(tmp_path / "out"),))):
        with pytest.raises(PermissionError):
            rule(store, "ann", *args)
    assert "eve" not in [a.name for a in store.list_annotators()] and not (tmp_path / "out").exists()
    assert store.random_prompt(split="test") is None  # the refused prompt was not stored
    assert labeling.add_prompts(store, "boss", " \n\n", "test") == []
    assert labeling.add_annotator(store, "boss", " ", False) is None
    with pytest.raises(ValueError):
        labeling.review(store, "boss", "seven", "kept")
    figures = labeling.overview(store, "boss")
    assert figures["pairs"]["tasks"] == 3 and figures["awaiting_review"] == 0 and figures["annotators"] == []


def test_a_deactivated_admin_has_no_admin_rights(store, tmp_path):
    store.add_annotator("boss", role="admin")
    store.set_active("boss", False)
    assert not labeling.is_admin(store, "boss")
    with pytest.raises(PermissionError):
        labeling.export(store, "boss", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_text_over_the_limits_is_refused_with_a_message_and_nothing_stored(store):
    store.add_annotator("ann")
    store.add_annotator("boss", role="admin")
    task = next_pair(store, "ann", None, random.Random(0))
    long = "y" * (labeling.RATIONALE_MAX + 1)
    assert vote(store, "ann", task, "left", "clear", long, "v1") == (
        f"Not saved: the rationale has {len(long):,} characters; at most {labeling.RATIONALE_MAX:,}, please.", None)
    [pid] = store.add_prompts(["Rank two."])
    store.add_task(store.add_responses(pid, ["r0", "r1"], model="m"), kind="rank", overlap=1)
    ranking = next_ranking(store, "ann", None, random.Random(0))
    assert submit_ranking(store, "ann", ranking, "1 2", False, long, "v1")[0].startswith("Not yet: the rationale has")
    assert store.votes() == [] and store.tasks(kind="rank")[0]["votes"] == []
    before = store.counts()
    from rlhf.store import StoreError

    with pytest.raises(StoreError, match="nothing was stored"):
        labeling.add_prompts(store, "boss", "fine\n" + "z" * (labeling.ADMIN_PROMPT_MAX + 1), "train")
    with pytest.raises(StoreError, match="at most 500 prompts"):
        labeling.add_prompts(store, "boss", "\n".join(f"p{i}" for i in range(labeling.ADMIN_PROMPTS_MAX + 1)), "")
    assert store.counts() == before


def test_a_rating_by_thumb_and_likert_and_its_undo(store):
    store.add_annotator("ann")
    [pid] = store.add_prompts([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                {"role": "user", "content": "Review a film."}]])
    store.add_candidates(pid, [("A lovely film.", "m", {}), ("A dull film.", "m", {})], [], rate=True)
    current = labeling.next_rating(store, "ann", None)
    assert len(current["messages"]) == 3 and current["response"] in ("A lovely film.", "A dull film.")
    assert "0 rated by you · 2 left for you · 0/2 ratings on 2 responses" in current["status"]
    assert labeling.rate(store, "ann", current, "", None, "", "v1") == (
        "Choose first: thumbs up or down (keys 1 and 2).", None)
    for bad in ("0", "6", "3.5", "three"):
        message, vote_id = labeling.rate(store, "ann", current, "up", bad, "", "v1")
        assert vote_id is None and "whole number from 1 to 5" in message
    assert store.counts()["votes"] == 0
    message, vote_id = labeling.rate(store, "ann", current, "up", "4", "warm", "v1")
    assert message == "Saved: thumbs up, 4 of 5." and vote_id
    [row] = store.votes(kind="rate")
    assert (row["choice"], row["likert"], row["rationale"], row["guideline_version"]) == ("up", 4, "warm", "v1")
    assert labeling.rate(store, "ann", current, "down", None, "", "v1")[0] == "You had already rated that one."
    assert undo(store, "ann", 60) == "Your last vote was undone; it is back in your queue."
    assert store.votes(kind="rate") == []
    assert labeling.rate(store, "ann", current, "down", "", "", "v1")[0] == "Saved: thumbs down."


def test_an_edit_on_the_compare_page_maps_the_side_to_the_response(store):
    store.add_annotator("ann")
    pair = next_pair(store, "ann", None, random.Random(0))
    left, right = sides(pair)
    message = labeling.save_edit(store, "ann", pair, "right", f"  Better: {XSS}  ")
    assert message.startswith("Saved your improved answer")
    position = 1 if pair["left_is_a"] else 0  # the right side's stored position
    assert store.edit_of("ann", pair["task_id"], position) == f"Better: {XSS}"
    assert store.edit_of("ann", pair["task_id"], 1 - position) is None
    assert labeling.edit_of(store, "ann", pair, "right") == f"Better: {XSS}"
    assert labeling.edit_of(store, "ann", pair, "left") is None and labeling.edit_of(store, "ann", {}, "left") is None
    assert labeling.save_edit(store, "ann", pair, "right", right) == (
        "Not saved: the edit is the same as the answer: change something first.")
    assert labeling.save_edit(store, "ann", pair, "middle", "x") == "Not saved: choose the answer to improve."
    assert labeling.save_edit(store, "ann", pair, "left", "x" * 20001).startswith("Not saved: the edit has 20,001")
    assert labeling.save_edit(store, "ann", {}, "left", "x") == "No task on screen."
    assert store.counts()["edits"] == 1
