"""An ensemble of K score heads on one backbone (`rlhf reward --ensemble K --ensemble_kind heads`).

The backbone's scalar head becomes K outputs, r_k(x, y), trained together at one model's cost. With the same data
every head would learn the same thing, so each head k fits its own bootstrap resample of the pairs: pair i counts
w_ik ~ Poisson(1) times in head k's Bradley-Terry loss (the online bootstrap of Oza & Russell 2001, as bootstrapped
DQN trains its heads: Osband et al. 2016, sec. 3). The weights come from a hash of the pair's tokens, so a pair
keeps its weights in every epoch, on every process and after a resume, without any bookkeeping.

Held-out evaluation (the loss that picks the kept checkpoint) weighs every pair once in every head. A saved model
has `num_labels` K; `rlhf.reward.model.RewardModel` reads each output column as one member, so scoring, the spread
and PPO's ensemble aggregates are the same as for K seed-trained models.
"""

from __future__ import annotations

import hashlib
import math

import torch

# P(W <= w) for W ~ Poisson(1), w = 0, 1, ...: the inverse CDF turns one uniform number into a weight.
_POISSON1_CDF = tuple(sum(math.exp(-1) / math.factorial(j) for j in range(w + 1)) for w in range(12))


def poisson_weight(u: float) -> int:
    """The Poisson(1) variate whose CDF first reaches u in [0, 1)."""
    for w, cdf in enumerate(_POISSON1_CDF):
        if u < cdf:
            return w
    return len(_POISSON1_CDF)


def bootstrap_weights(pair_keys: list[tuple[int, ...]], heads: int, seed: int) -> torch.Tensor:
    """(B, K) float weights, w_ik ~ Poisson(1), a function of (seed, pair i's key, head k) only."""
    out = torch.empty(len(pair_keys), heads)
    for i, key in enumerate(pair_keys):
        for k in range(heads):
            digest = hashlib.blake2b(repr((seed, k, key)).encode(), digest_size=8).digest()
            out[i, k] = poisson_weight(int.from_bytes(digest, "big") / 2**64)
    return out


def weighted_bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor | None = None,
                                margin: torch.Tensor | None = None) -> torch.Tensor:
    """The K heads' Bradley-Terry loss (Ouyang et al. 2022 eq. 1; the margin: Touvron et al. 2023 eq. 2) on rewards
    (B, K), each pair weighted per head by `weights` (B, K) (None: every pair once), summed over heads and pairs
    and divided by the total weight: with one head and unit weights, TRL's mean -log sigmoid(r_c - r_r - m)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype).unsqueeze(-1)
    losses = -torch.nn.functional.logsigmoid(diff)
    if weights is None:
        return losses.mean()
    weights = weights.to(losses)
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def score_head(model) -> tuple[str, torch.nn.Linear]:
    """The name and module of a sequence-classification model's output layer (`score` for decoders, `classifier`
    for BERT-style encoders)."""
    for name in ("score", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Linear):
            return name, module
    raise ValueError(f"{type(model).__name__} has no linear `score` or `classifier` head to widen")


def widen_head(model, heads: int) -> None:
    """Give the model `heads` freshly initialised outputs in place of its head (as its architecture initialises a
    new head). The config still says one label: TRL's RewardTrainer refuses any other count when it is built (its
    own loss reads one score); `record_heads` says K once it is."""
    name, old = score_head(model)
    new = torch.nn.Linear(old.in_features, heads, bias=old.bias is not None, device=old.weight.device,
                          dtype=old.weight.dtype)
    model._init_weights(new)
    setattr(model, name, new)


def record_heads(model, heads: int) -> None:
    """The model's config says `heads` labels, so its saved config.json does and every load builds K outputs."""
    model.config.num_labels = heads


def pair_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, ...]]:
    """One key per pair of a RewardTrainer batch (chosen rows, then rejected rows): the two rows' real tokens."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    half = len(rows) // 2
    return [tuple(c) + (-1,) + tuple(r) for c, r in zip(rows[:half], rows[half:])]


def heads_trainer_class(base):
    """`base` (trl.RewardTrainer) with its loss taken over K heads, each on its bootstrap resample in training."""

    class HeadsRewardTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            inputs["use_cache"] = False
            outputs = model(**{k: v for k, v in inputs.items() if k != "margin"})
            chosen, rejected = torch.chunk(outputs.logits, chunks=2)  # (B, K) each
            weights = (bootstrap_weights(pair_keys(inputs["input_ids"], inputs["attention_mask"]),
                                         chosen.shape[1], self.args.seed) if mode == "train" else None)
            loss = weighted_bradley_terry_loss(chosen, rejected, weights, inputs.get("margin"))
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
            with torch.no_grad():  # TRL's figures, of the heads' mean (the score the ensemble gives)
                mean_c, mean_r = chosen.mean(1), rejected.mean(1)
                gather = self.accelerator.gather_for_metrics
                self._metrics[mode]["accuracy"].append(gather((mean_c > mean_r).float().mean()).mean().item())
                self._metrics[mode]["margin"].append(gather((mean_c - mean_r).mean()).mean().item())
                self._metrics[mode]["mean_reward"].append(gather(outputs.logits.mean()).mean().item())
            return (loss, outputs) if return_outputs else loss

    return HeadsRewardTrainer
