"""Pairing strategies, by hand."""

from __future__ import annotations

import random

import pytest

from rlhf.pairing import across_pairs, active_or_random_pair, closest_pair, most_uncertain_pair, random_pairs


def test_random_pairs_are_disjoint_and_from_the_set():
    rng = random.Random(0)
    pairs = random_pairs([1, 2, 3, 4, 5], rng, max_pairs=5)
    assert len(pairs) == 2
    flat = [x for p in pairs for x in p]
    assert len(set(flat)) == 4 and set(flat) <= {1, 2, 3, 4, 5}
    assert random_pairs([7], rng) == []


def test_across_pairs_take_one_from_each_model():
    pairs = across_pairs(["a1", "a2"], ["b1", "b2", "b3"], random.Random(0), max_pairs=3)
    assert len(pairs) == 2 and all(a.startswith("a") and b.startswith("b") for a, b in pairs)


def test_closest_pair_by_hand():
    assert closest_pair(["w", "x", "y", "z"], [0.0, 1.0, 0.9, 3.0]) == ("x", "y")
    with pytest.raises(ValueError):
        closest_pair(["w"], [0.0])


def test_random_share_keeps_about_that_share_random():
    rng = random.Random(0)
    kinds = [active_or_random_pair([1, 2, 3], [0.0, 0.5, 0.52], 0.3, rng) for _ in range(2000)]
    share = sum(how == "random" for _, how in kinds) / len(kinds)
    assert abs(share - 0.3) < 0.04
    assert all(pair == (2, 3) for pair, how in kinds if how == "active")


def test_the_ensembles_most_uncertain_pair_by_hand():
    # One member scores all four the same; the other 3, 1, 0.5, 0: their differences disagree most on (w, z),
    # by 3 (w - x by 2, w - y by 2.5, the rest by 1 or less).
    members = [[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.5, 0.0]]
    assert most_uncertain_pair(["w", "x", "y", "z"], members) == ("w", "z")
    # The active rule takes it over the closest pair by the mean (x, y: 0.5 and 0.25); without members, that one.
    mean = [1.5, 0.5, 0.25, 0.0]
    assert active_or_random_pair(["w", "x", "y", "z"], mean, 0.0, random.Random(0), members) == (("w", "z"), "active")
    assert active_or_random_pair(["w", "x", "y", "z"], mean, 0.0, random.Random(0)) == (("x", "y"), "active")
    with pytest.raises(ValueError):
        most_uncertain_pair(["w", "x"], members[:1])
