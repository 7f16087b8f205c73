"""Simulated annotators: a gold scoring function plus Bradley-Terry noise, voting like a person would.

A simulated annotator with gold function g prefers A over B with probability
    P(A > B) = sigmoid((g(A) - g(B)) / tau)            (Bradley & Terry 1952; the RLHF preference model)
declares a tie when |g(A) - g(B)| < eps, and may favour whichever response is shown on the left (position bias,
a logit offset). tau -> 0 gives a perfect oracle; a huge tau gives coin flips. The vote's strength (1-3) grows
with how sure the annotator is. K responses are ranked by the Plackett-Luce model with the same utilities
g / tau (Plackett 1975; for K = 2 it is Bradley-Terry), neighbours closer than eps tied.

Gold functions map (prompts, responses) -> scores, batched, so PPO can use the same one as a reward:
    sentiment  VADER compound score in [-1, 1] (the controlled-sentiment task of the DPO paper, §6.1)
    length     closeness to a target number of words, in (-inf, 0]
    keyword    how many of the given keywords the response contains
    or any `module:function` with the same signature.

`rlhf label-sim` votes on open tasks as a named simulated annotator through the same store API as people.

    rlhf label-sim --gold sentiment --tau 0.05 --annotator sim-1
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from tqdm.auto import tqdm

from rlhf.config import UserError, field

GoldFn = Callable[[list, list[str]], list[float]]


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(prompts: list, responses: list[str]) -> list[float]:
    """VADER's compound sentiment of each response, in [-1, 1]; the prompt is ignored."""
    analyzer = _vader()
    return [analyzer.polarity_scores(r)["compound"] for r in responses]


def length(prompts: list, responses: list[str], target: int = 40) -> list[float]:
    """Minus the relative distance of the word count from `target`: 0 is best."""
    return [-abs(len(r.split()) - target) / target for r in responses]


def keyword(prompts: list, responses: list[str],
            words: tuple[str, ...] = ("wonderful", "great", "love")) -> list[float]:
    """How many of `words` occur in the response, as whole words, ignoring case."""
    patterns = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in words]
    return [float(sum(bool(p.search(r)) for p in patterns)) for r in responses]


def load_gold(spec: str) -> GoldFn:
    """`sentiment`, `length`, `keyword`, `length:60` (a target), `keyword:good,fine` (words), or `module:function`."""
    name, _, arg = spec.partition(":")
    if name == "sentiment" and not arg:
        return sentiment
    if name == "length":
        try:
            target = int(arg) if arg else 40
        except ValueError:
            raise UserError(f"gold 'length:N' needs a whole number of words, not {arg!r}") from None
        return lambda prompts, responses: length(prompts, responses, target=target)
    if name == "keyword":
        words = tuple(w.strip() for w in arg.split(",") if w.strip()) if arg else ("wonderful", "great", "love")
        return lambda prompts, responses: keyword(prompts, responses, words=words)
    if not arg:
        raise UserError(f"unknown gold function {spec!r}: use sentiment, length[:N], keyword[:w1,w2] or "
                        "module:function")
    try:
        fn = getattr(importlib.import_module(name), arg)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load gold function {spec!r}: {e}") from None
    if not callable(fn):
        raise UserError(f"gold function {spec!r} is not callable")
    return fn


# ---------------------------------------------------------------- the noisy annotator


def prob_left_wins(gold_left: float, gold_right: float, tau: float, position_bias: float = 0.0) -> float:
    """Bradley-Terry probability that the response shown on the left is preferred; bias is a logit offset."""
    if tau <= 0:  # a perfect oracle: the bias only breaks exact ties
        diff = gold_left - gold_right
        if diff == 0:
            return 0.5 if position_bias == 0 else float(position_bias > 0)
        return float(diff > 0)
    z = (gold_left - gold_right) / tau + position_bias
    return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


@dataclass
class SimulatedVote:
    choice: str  # "A", "B" or "tie"
    strength: int  # 1 slight, 2 clear, 3 strong
    p_a: float  # the annotator's probability that A wins, for analysis


def simulate_vote(
    gold_a: float,
    gold_b: float,
    *,
    tau: float,
    eps: float = 0.0,
    position_bias: float = 0.0,
    a_on_left: bool = True,
    rng: random.Random,
) -> SimulatedVote:
    """One vote on a pair (A, B) shown with A on the left or right."""
    if abs(gold_a - gold_b) < eps:
        return SimulatedVote("tie", 1, 0.5)
    if a_on_left:
        p_a = prob_left_wins(gold_a, gold_b, tau, position_bias)
    else:
        p_a = 1.0 - prob_left_wins(gold_b, gold_a, tau, position_bias)
    a_wins = rng.random() < p_a
    confidence = p_a if a_wins else 1.0 - p_a
    # Sure annotators say "strong"; near coin flips say "slight".
    strength = 3 if confidence >= 0.9 else 2 if confidence >= 0.7 else 1
    return SimulatedVote("A" if a_wins else "B", strength, p_a)


def simulate_ranking(golds: list[float], *, tau: float, eps: float = 0.0, rng: random.Random) -> list[list[int]]:
    """A Plackett-Luce ranking of the positions 0..K-1 (best first, groups of ties): each next place goes to a
    remaining item with probability proportional to exp(g / tau), drawn by sorting g / tau + Gumbel noise (the
    Gumbel-max trick); tau = 0 sorts by g. Neighbours whose gold differs by less than eps share a group."""
    def key(i: int) -> float:
        if tau <= 0:
            return golds[i]
        return golds[i] / tau - math.log(-math.log(rng.random() or 1e-300))

    order = sorted(range(len(golds)), key=key, reverse=True)
    groups = [[order[0]]]
    for i in order[1:]:
        if abs(golds[i] - golds[groups[-1][-1]]) < eps:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(g) for g in groups]


@dataclass
class SimulatedRating:
    choice: str  # "up" or "down"
    likert: int | None  # 1 (worst) to 5 (best), None without a Likert step
    p_up: float  # the annotator's probability of a thumb up, for analysis


def simulate_rating(gold: float, *, threshold: float, tau: float, likert_step: float = 0.0,
                    rng: random.Random) -> SimulatedRating:
    """One rating of one response: thumb up with probability sigmoid((g - threshold) / tau), the Bradley-Terry
    model with the threshold as the opponent (tau = 0: up exactly when g > threshold). The Likert score reads the
    same noisy judgement on a scale: g plus logistic noise of scale tau (the noise behind that sigmoid), 3 at the
    threshold and one point per `likert_step` of gold, clipped to 1-5; likert_step 0 gives no score."""
    z = (gold - threshold) / tau if tau > 0 else (math.inf if gold > threshold else -math.inf)
    p_up = 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))
    u = min(max(rng.random(), 1e-12), 1 - 1e-12)
    noisy = gold + tau * math.log(u / (1 - u))  # a logistic draw: P(noisy > threshold) = p_up
    likert = None
    if likert_step > 0:
        likert = int(min(5, max(1, 3 + round((noisy - threshold) / likert_step))))
    return SimulatedRating("up" if noisy > threshold else "down", likert, p_up)


# ---------------------------------------------------------------- rlhf label-sim


@dataclass
class LabelSimConfig:
    db: str = field("", "Database URL ('' = sqlite under $RLHF_HOME).")
    annotator: str = field("sim-sentiment", "Name of the simulated annotator (created if absent).")
    gold: str = field("sentiment", "Gold function: sentiment, length[:N], keyword[:w,..] or module:function.")
    tau: float = field(0.05, "Bradley-Terry temperature: P(A > B) = sigmoid((g(A) - g(B)) / tau); 0 = perfect.")
    eps: float = field(0.0, "Vote tie when |g(A) - g(B)| < eps.")
    position_bias: float = field(0.0, "Logit added in favour of the response shown on the left.")
    rate_threshold: float = field(0.5, "Ratings: thumb up with probability sigmoid((g - rate_threshold) / tau), the "
                                       "threshold in the gold's units (sentiment: VADER's compound score, -1 to 1).")
    likert_step: float = field(0.25, "Ratings: one Likert point per this much gold, 3 at the threshold (0: no "
                                     "Likert score).")
    round: int = field(-1, "Only tasks of this round (-1: any).")
    limit: int = field(0, "Vote on at most this many tasks (0: all open ones).")
    seed: int = field(0, "Random seed of the noise and of the left/right order.")

    def __post_init__(self):
        if self.tau < 0 or self.eps < 0 or self.limit < 0 or self.likert_step < 0:
            raise ValueError("tau, eps, likert_step and limit must be >= 0")


def label_sim(config: LabelSimConfig) -> dict:
    from rlhf.store import Store, StoreError, TaskFull

    store = Store(config.db or None)
    gold = load_gold(config.gold)
    # Everything that can fail is tried before the annotator is created: a failed run leaves the store as it was.
    try:
        [float(x) for x in gold(["Probe prompt."], ["A probe response."])]
    except Exception as e:  # a user's module:function can raise anything; the user needs one line
        raise UserError(f"gold function {config.gold!r} fails on a probe: {type(e).__name__}: {e}") from None
    with contextlib.suppress(StoreError):  # absent: created below
        if not store.annotator(config.annotator).simulated:
            raise UserError(f"{config.annotator!r} is a person's account; a simulated annotator needs its own name")
    store.annotator(config.annotator, create_simulated=True)
    rng = random.Random(config.seed)
    counts = {"votes": 0, "agree_with_gold": 0, "ties": 0}
    round_ = None if config.round < 0 else config.round
    with tqdm(desc=f"{config.annotator} voting", unit="vote") as bar:
        while not config.limit or counts["votes"] < config.limit:
            task = store.next_task(config.annotator, round=round_)
            if task is None:
                break
            if len(task.responses) != 2:
                store.skip(config.annotator, task.id)
                continue
            prompt = task.prompt[-1]["content"]
            g_a, g_b = (float(x) for x in gold([prompt, prompt], task.responses))
            a_on_left = rng.random() < 0.5
            vote = simulate_vote(g_a, g_b, tau=config.tau, eps=config.eps, position_bias=config.position_bias,
                                 a_on_left=a_on_left, rng=rng)
            try:
                store.submit(config.annotator, task.id, vote.choice, strength=vote.strength,
                             left="A" if a_on_left else "B", guideline_version=f"sim:{config.gold}")
            except TaskFull:
                continue  # a person took the last slot meanwhile
            counts["votes"] += 1
            counts["ties"] += vote.choice == "tie"
            counts["agree_with_gold"] += (vote.choice == "A") == (g_a > g_b) and vote.choice != "tie"
            bar.update(1)
        # Ranking tasks (rlhf generate --rank K): the same annotator ranks them by the Plackett-Luce model.
        while not config.limit or counts["votes"] < config.limit:
            task = store.next_task(config.annotator, round=round_, kind="rank")
            if task is None:
                break
            prompt = task.prompt[-1]["content"]
            golds = [float(x) for x in gold([prompt] * len(task.responses), task.responses)]
            shown = list(range(len(golds)))
            rng.shuffle(shown)
            ranking = simulate_ranking(golds, tau=config.tau, eps=config.eps, rng=rng)
            try:
                store.submit_ranking(config.annotator, task.id, ranking, shown=shown,
                                     guideline_version=f"sim:{config.gold}")
            except TaskFull:
                continue
            counts["votes"] += 1
            counts["rankings"] = counts.get("rankings", 0) + 1
            bar.update(1)
        # Rating tasks (rlhf generate --rate): a thumb (and a Likert score) from the gold against a threshold.
        while not config.limit or counts["votes"] < config.limit:
            task = store.next_task(config.annotator, round=round_, kind="rate")
            if task is None:
                break
            [g] = (float(x) for x in gold([task.prompt[-1]["content"]], task.responses))
            rating = simulate_rating(g, threshold=config.rate_threshold, tau=config.tau,
                                     likert_step=config.likert_step, rng=rng)
            try:
                store.submit_rating(config.annotator, task.id, rating.choice, likert=rating.likert,
                                    guideline_version=f"sim:{config.gold}")
            except TaskFull:
                continue
            counts["votes"] += 1
            counts["ratings"] = counts.get("ratings", 0) + 1
            counts["thumbs_up"] = counts.get("thumbs_up", 0) + (rating.choice == "up")
            bar.update(1)
    decided = counts["votes"] - counts["ties"] - counts.get("rankings", 0) - counts.get("ratings", 0)
    share = counts["agree_with_gold"] / decided if decided else 0.0
    ranked = f", {counts['rankings']} of them rankings" if counts.get("rankings") else ""
    if counts.get("ratings"):
        ranked += f", {counts['ratings']} ratings ({counts['thumbs_up']} up)"
    agrees = f"; agrees with gold on {100 * share:.1f} % of the decided pairs" if decided else ""
    print(f"{config.annotator} cast {counts['votes']} votes ({counts['ties']} ties{ranked}){agrees} (tau {config.tau})")
    return {**counts, "agreement": share}
