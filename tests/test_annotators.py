"""Simulated annotators: gold functions and Bradley-Terry noise."""

from __future__ import annotations

import math
import random

import pytest

from rlhf.annotators import (
    keyword,
    length,
    load_gold,
    prob_left_wins,
    sentiment,
    simulate_ranking,
    simulate_rating,
    simulate_vote,
)
from rlhf.config import UserError


def test_sentiment_orders_reviews():
    good, bad, flat = sentiment([None] * 3, ["A wonderful, moving film. I loved it.", "Dull and awful.", "A film."])
    assert good > 0.5 and bad < -0.5 and flat == 0.0


def test_length_and_keyword_gold_by_hand():
    assert length([None, None], ["one two three four", "one two"], target=4) == [0.0, -0.5]
    assert keyword([None, None], ["Great! I LOVE it", "greatness lovely"], words=("great", "love")) == [2.0, 0.0]


def test_load_gold_specs():
    assert load_gold("sentiment") is sentiment
    assert load_gold("length:2")([None], ["a b"]) == [0.0]
    assert load_gold("keyword:fine")([None], ["fine day"]) == [1.0]
    assert load_gold("rlhf.annotators:sentiment") is sentiment
    for bad in ["nope", "length:x", "rlhf.annotators:missing", "no_such_module_xyz:f"]:
        with pytest.raises(UserError):
            load_gold(bad)


def test_bradley_terry_probability_by_hand():
    assert prob_left_wins(1.0, 0.0, tau=1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert prob_left_wins(0.0, 0.0, tau=0.5, position_bias=math.log(3)) == pytest.approx(0.75)
    assert prob_left_wins(0.2, 0.1, tau=0.0) == 1.0 and prob_left_wins(0.1, 0.2, tau=0.0) == 0.0


def _agreement(tau: float, n: int = 2000, seed: int = 0) -> float:
    rng = random.Random(seed)
    agree = 0
    for _ in range(n):
        ga, gb = rng.uniform(-1, 1), rng.uniform(-1, 1)
        vote = simulate_vote(ga, gb, tau=tau, a_on_left=rng.random() < 0.5, rng=rng)
        agree += (vote.choice == "A") == (ga > gb)
    return agree / n


def test_zero_tau_agrees_with_gold_on_every_pair():
    assert _agreement(tau=0.0) == 1.0
    assert _agreement(tau=1e-6) == 1.0


def test_huge_tau_agrees_about_half_the_time():
    assert abs(_agreement(tau=1e6) - 0.5) < 0.05  # n=2000: 4.5 standard errors


def test_ties_and_position_bias():
    rng = random.Random(0)
    assert simulate_vote(0.50, 0.51, tau=1.0, eps=0.05, rng=rng).choice == "tie"
    # Equal gold, strong left bias: the left response wins whichever of A/B it is.
    lefts = [simulate_vote(0.0, 0.0, tau=1.0, position_bias=3.0, a_on_left=i % 2 == 0, rng=rng) for i in range(400)]
    left_chosen = sum((v.choice == "A") == (i % 2 == 0) for i, v in enumerate(lefts)) / 400
    assert left_chosen > 0.9


def test_strength_grows_with_certainty():
    rng = random.Random(0)
    assert simulate_vote(1.0, -1.0, tau=0.01, rng=rng).strength == 3
    assert simulate_vote(0.01, 0.0, tau=1.0, rng=rng).strength == 1


def test_ranking_with_zero_tau_sorts_by_gold_and_ties_neighbours():
    rng = random.Random(0)
    assert simulate_ranking([0.1, 0.9, 0.5, 0.2], tau=0.0, rng=rng) == [[1], [2], [3], [0]]
    assert simulate_ranking([0.1, 0.9, 0.5, 0.12], tau=0.0, eps=0.05, rng=rng) == [[1], [2], [0, 3]]


def test_ranking_follows_plackett_luce():
    # Utilities log 1, log 2, log 3 at tau 1: first place goes to each with probability 1/6, 2/6, 3/6, and after
    # the third item is first, the second beats the first with probability 2/3 (Luce's choice axiom).
    rng = random.Random(1)
    n = 6000
    rankings = [simulate_ranking([0.0, math.log(2), math.log(3)], tau=1.0, rng=rng) for _ in range(n)]
    firsts = [r[0][0] for r in rankings]
    for item, p in ((0, 1 / 6), (1, 2 / 6), (2, 3 / 6)):
        share = firsts.count(item) / n
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), (item, share)
    after_2 = [r for r in rankings if r[0] == [2]]
    share = sum(r[1] == [1] for r in after_2) / len(after_2)
    assert abs(share - 2 / 3) < 4 * math.sqrt(2 / 9 / len(after_2))


def test_a_rating_follows_the_threshold_model():
    """P(up) = sigmoid((g - threshold) / tau): tau 0 is the threshold exactly; with noise the share of thumbs up
    matches the sigmoid, and the Likert score is 3 at the threshold and one point per likert_step."""
    rng = random.Random(0)
    assert simulate_rating(0.6, threshold=0.5, tau=0.0, rng=rng).choice == "up"
    assert simulate_rating(0.4, threshold=0.5, tau=0.0, rng=rng).choice == "down"
    exact = [simulate_rating(g, threshold=0.0, tau=0.0, likert_step=0.25, rng=rng).likert
             for g in (-0.9, -0.3, 0.01, 0.3, 0.9)]
    assert exact == [1, 2, 3, 4, 5]
    assert simulate_rating(0.3, threshold=0.0, tau=0.1, rng=rng).likert is None  # no step, no score
    draws = [simulate_rating(0.1, threshold=0.0, tau=0.1, rng=rng) for _ in range(4000)]
    expected = 1 / (1 + math.exp(-1.0))
    assert draws[0].p_up == pytest.approx(expected)
    assert abs(sum(d.choice == "up" for d in draws) / len(draws) - expected) < 0.03
