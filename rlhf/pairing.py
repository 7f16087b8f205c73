"""How responses to one prompt become labeling pairs: pure functions, no models, no database.

  random  a random pair among one model's samples (disjoint pairs when there are 4 or more)
  across  one response from each of two models (base vs aligned: what the arena and evaluation pairs use)
  active  the pair whose reward-model scores are closest (the most informative label, as in active preference
          learning), or with an ensemble the pair its members disagree on most (the spread of r_i - r_j over
          members), except that a `random_share` of prompts keep a random pair so the labeled data stays an
          unbiased sample for evaluation
"""

from __future__ import annotations

import itertools
import random


def random_pairs(ids: list, rng: random.Random, max_pairs: int = 1) -> list[tuple]:
    """Up to `max_pairs` disjoint random pairs from one prompt's responses."""
    ids = list(ids)
    rng.shuffle(ids)
    return [(ids[i], ids[i + 1]) for i in range(0, len(ids) - 1, 2)][:max_pairs]


def across_pairs(first: list, second: list, rng: random.Random, max_pairs: int = 1) -> list[tuple]:
    """Pairs (one of `first`, one of `second`), each response used at most once."""
    first, second = list(first), list(second)
    rng.shuffle(first)
    rng.shuffle(second)
    return list(zip(first, second))[:max_pairs]


def closest_pair(ids: list, rewards: list[float]) -> tuple:
    """The pair with the smallest reward margin (ties broken by order)."""
    if len(ids) < 2:
        raise ValueError("need at least two responses to pair")
    best = min(itertools.combinations(range(len(ids)), 2), key=lambda ij: abs(rewards[ij[0]] - rewards[ij[1]]))
    return ids[best[0]], ids[best[1]]


def most_uncertain_pair(ids: list, member_rewards: list[list[float]]) -> tuple:
    """The pair whose reward difference the ensemble's members disagree on most: the largest sample std over
    members of r_i - r_j (ties broken by order). `member_rewards` holds one list of rewards per member."""
    if len(ids) < 2 or len(member_rewards) < 2:
        raise ValueError("need at least two responses and two ensemble members")

    def spread(ij):
        diffs = [m[ij[0]] - m[ij[1]] for m in member_rewards]
        mean = sum(diffs) / len(diffs)
        return sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)

    best = max(itertools.combinations(range(len(ids)), 2), key=spread)
    return ids[best[0]], ids[best[1]]


def active_or_random_pair(ids: list, rewards: list[float], random_share: float, rng: random.Random,
                          member_rewards: list[list[float]] | None = None) -> tuple[tuple, str]:
    """One pair for a prompt, and how it was chosen ('active' or 'random'). With `member_rewards` (an ensemble's,
    one list per member) the active pair is the most uncertain one, else the closest-scored one."""
    if rng.random() < random_share:
        return random_pairs(ids, rng)[0], "random"
    if member_rewards is not None and len(member_rewards) > 1:
        return most_uncertain_pair(ids, member_rewards), "active"
    return closest_pair(ids, rewards), "active"
