"""Held-out figures of a reward model: pure functions of its rewards on the test split's pairs (no models here).

Each pair has a chosen and a rejected response; `r_c`, `r_r` are their rewards. Pairs that share a prompt are not
independent (a ranking gives six pairs from four responses), so intervals resample prompts, not pairs.
"""

from __future__ import annotations

import numpy as np
import torch


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> float:
    """Mean -log sigmoid(r_c - r_r - margin) (Ouyang et al. 2022 eq. 1; the margin: Touvron et al. 2023 eq. 2)."""
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        diff = diff - margin
    return float(-torch.nn.functional.logsigmoid(diff).mean())


def correct(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair (B,): 1 where the chosen response scores higher, 0.5 on a tie, else 0."""
    diff = chosen_rewards - rejected_rewards  # (B,)
    return (diff > 0).float() + 0.5 * (diff == 0).float()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores higher; a tie counts half."""
    return float(correct(chosen_rewards, rejected_rewards).mean())


def mean_margin(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Mean of r_chosen - r_rejected."""
    return float((chosen_rewards - rejected_rewards).mean())


def expected_calibration_error(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, bins: int = 10) -> float:
    """ECE of the Bradley-Terry probability p = sigmoid(r_c - r_r) that the chosen response wins.

    Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3: sum_b |B_b|/n * |acc(B_b) - conf(B_b)|,
    with the confidence of the predicted winner, max(p, 1 - p), in `bins` equal-width bins over [0.5, 1]; a
    prediction is correct when it names the chosen response (p = 0.5 counts half).
    """
    p = torch.sigmoid((chosen_rewards - rejected_rewards).double())  # (B,)
    confidence = torch.maximum(p, 1 - p)
    hits = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    index = ((confidence - 0.5) / 0.5 * bins).long().clamp(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            ece += float(in_bin.double().mean()) * abs(float(hits[in_bin].mean()) - float(confidence[in_bin].mean()))
    return ece


def grouped_share_ci(values, groups: list, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """A share (the mean of per-pair values in [0, 1]) and its percentile-bootstrap interval, resampling whole
    groups (prompts) with replacement: the cluster bootstrap, since pairs of one prompt share its responses."""
    values = np.asarray(values, dtype=float)
    keys = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    index = np.array([keys[g] for g in groups])
    sums = np.bincount(index, weights=values, minlength=len(keys))  # (G,)
    counts = np.bincount(index, minlength=len(keys)).astype(float)  # (G,)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(keys), size=(resamples, len(keys)))  # (S, G)
    shares = sums[draw].sum(1) / counts[draw].sum(1)
    lo, hi = np.quantile(shares, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(values.mean()), float(lo), float(hi)


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def length_bias(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_lengths: list[int],
                rejected_lengths: list[int], responses: list[tuple]) -> dict:
    """How much the reward follows length: Spearman's correlation of reward and length (words) over the distinct
    held-out responses (`responses` names each pair's two, e.g. (prompt, text)), and the accuracy on the pairs whose
    longer response is the rejected one (a model that prefers length fails exactly there)."""
    seen: dict = {}
    for (c_key, r_key), rc, rr, lc, lr in zip(responses, chosen_rewards.tolist(), rejected_rewards.tolist(),
                                             chosen_lengths, rejected_lengths):
        seen.setdefault(c_key, (rc, lc))
        seen.setdefault(r_key, (rr, lr))
    rewards, lengths = zip(*seen.values())
    longer_rejected = torch.tensor([lr > lc for lc, lr in zip(chosen_lengths, rejected_lengths)])
    hits = correct(chosen_rewards, rejected_rewards)
    return {"length_spearman": spearman(rewards, lengths),
            "longer_rejected_pairs": int(longer_rejected.sum()),
            "accuracy_longer_rejected": float(hits[longer_rejected].mean()) if longer_rejected.any() else None}


def agreement_with_gold(gold_chosen: list[float], gold_rejected: list[float]) -> list[float]:
    """Per pair: 1 where the gold function also prefers the chosen response, 0.5 where it ties, else 0. Its mean
    is the held-out ceiling: a reward model that knew the gold exactly would score that accuracy on these labels."""
    return correct(torch.tensor(gold_chosen, dtype=torch.float64),
                   torch.tensor(gold_rejected, dtype=torch.float64)).tolist()


def gold_order_agreement(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, gold_chosen: list[float],
                         gold_rejected: list[float]) -> float:
    """Share of pairs the reward model orders as the gold function does (ties in either count half)."""
    model = torch.sign(chosen_rewards - rejected_rewards).double()
    gold = torch.sign(torch.tensor(gold_chosen, dtype=torch.float64) - torch.tensor(gold_rejected, dtype=torch.float64))
    return float(torch.where((model == 0) | (gold == 0), 0.5, (model == gold).double()).mean())


def verdict(accuracy_ci: tuple[float, float, float], ceiling: float | None) -> str:
    """In words: is the reward model better than chance on the held-out pairs, and how near the ceiling?"""
    acc, lo, hi = accuracy_ci
    if lo <= 0.5:
        return (f"no better than chance on the held-out pairs (accuracy {acc:.3f}, 95 % interval [{lo:.3f}, "
                f"{hi:.3f}] includes 0.5): on this evidence, RL against it may optimise noise")
    near = f", {acc / ceiling:.0%} of the labels' own agreement with the gold ({ceiling:.3f})" if ceiling else ""
    return f"better than chance (accuracy {acc:.3f} [{lo:.3f}, {hi:.3f}]){near}"


def spread_split_accuracy(hits: torch.Tensor, pair_spread: torch.Tensor) -> dict:
    """Accuracy on the half of the pairs where an ensemble's members agree most (lowest spread of r_c - r_r) and on
    the half where they agree least: an uncertainty that means something has the first above the second."""
    order = torch.argsort(pair_spread, stable=True)
    half = len(order) // 2
    if half == 0:
        return {}
    return {"accuracy_low_spread": float(hits[order[:half]].mean()),
            "accuracy_high_spread": float(hits[order[-half:]].mean())}
