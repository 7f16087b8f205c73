"""RL-for-RLHF math as pure torch functions: masked statistics, log-probs, KL estimators, the KL-shaped reward,
a reward ensemble's aggregate, GAE, the clipped policy and value losses, the adaptive KL controller, and the
critic-free advantage estimators (RLOO, GRPO, REINFORCE++) with GRPO's KL loss.

Every function takes and returns tensors (or floats), holds no state and imports only torch, so `rlhf/ppo.py`
reads as the algorithm and `tests/test_losses.py` checks each function against numbers worked out by hand.
Shapes: B rows (responses), T response tokens; `mask` is 1 on a response's tokens (through its EOS) and 0 after.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is 1; Bessel-corrected unless `unbiased` is False."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries, zero where masked out; `shift_mean=False` keeps the mean.

    Advantage whitening (Schulman et al. 2017's PPO code; "The N Implementation Details of RLHF with PPO", detail
    on whitening). Rewards are whitened with shift_mean=False, so their sign (the direction of the signal) stays.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def logprobs_and_logsumexp(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits)[token] per position and logsumexp(logits): (B, T, V), (B, T) -> (B, T), (B, T), float32.

    Gathers the chosen logit and subtracts logsumexp rather than materialising the whole (B, T, V) log-softmax.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (B, T)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse, lse


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: (B, T, V), (B, T) -> (B, T), in float32."""
    return logprobs_and_logsumexp(logits, tokens)[0]


def entropy_from_logits(logits: torch.Tensor, logsumexp: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (B, T, V) -> (B, T); H = logsumexp(z) - sum softmax(z) z.

    `logsumexp` (B, T), when the caller has it already, saves its passes over the vocabulary; softmax(z) is then
    exp(z - logsumexp(z))."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1) if logsumexp is None else logsumexp
    return lse - (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL
    Divergence"): with log r = log pi_ref - log pi, k1 = -log r (unbiased), k2 = (log r)^2 / 2,
    k3 = (r - 1) - log r (unbiased, never negative, lower variance)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -beta * KL_t on every response token, plus the score at each response's last token.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2 (R(x, y) = r(x, y) - beta KL),
    with the KL term spread over tokens as in their code. scores (B,), kl (B, T), mask (B, T) -> (B, T).
    A row with no tokens (mask all zero) gets no reward at all.
    """
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    lengths = mask.sum(1).long()  # (B,)
    has_tokens = lengths > 0
    last = (lengths - 1).clamp(min=0)  # (B,) index of the last response token
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * has_tokens.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16): A_t = sum_l (gamma lam)^l delta_{t+l},
    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 past each response's end. Returns (advantages, returns =
    advantages + values), both (B, T) and zero where masked out."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Past the end (mask 0) the running sum restarts, so nothing leaks from padding into real tokens.
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:
    mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)), rho_t = pi(a_t|s_t) / pi_old(a_t|s_t).

    Returns the loss and statistics: clipfrac (share of tokens where the clipped term is chosen), approxkl
    (0.5 * mean (log rho)^2, as TRL logs it) and the mean ratio.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(losses, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > losses).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio**2, mask), "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 baselines; "The N Implementation Details of RLHF with PPO"):
    0.5 * mean_t max((V_t - G_t)^2, (clip(V_t, V_old - eps, V_old + eps) - G_t)^2). Returns loss and clipfrac."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > losses).float(), mask)}
    return loss, stats


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """The adaptive KL controller (Ziegler et al. 2019, section 2.2): e = clip(KL / KL_target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n_steps / horizon). beta grows while the policy is further from the reference than
    the target and shrinks while it is closer. n_steps: episodes (responses) seen since the last update."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return kl_coef * (1.0 + error * n_steps / horizon)


def ensemble_reward(member_scores: torch.Tensor, how: str = "mean", std_coef: float = 1.0) -> torch.Tensor:
    """One reward (B,) from an ensemble's member scores (K, B) (Coste et al. 2023, "Reward Model Ensembles Help
    Mitigate Overoptimization", sec. 3): `mean`; `conservative`, the uncertainty-weighted mean - std_coef * std
    over members (their UWO, eq. 2, with the sample std); `worst`, the minimum over members (their WCO, eq. 1)."""
    if how == "mean":
        return member_scores.mean(0)
    if how == "conservative":
        spread = member_scores.std(0) if len(member_scores) > 1 else torch.zeros_like(member_scores[0])
        return member_scores.mean(0) - std_coef * spread
    if how == "worst":
        return member_scores.min(0).values
    raise ValueError(f"ensemble aggregate must be mean, conservative or worst, not {how!r}")


# ---------------------------------------------------------------- critic-free advantage estimators
# Rows come in groups of k consecutive samples of one prompt (rlhf.ppo samples them so): row i belongs to prompt
# i // k. Each estimator returns one advantage per row (B,), which the caller spreads over the row's tokens, or
# per-token advantages (B, T).


def _groups(values: torch.Tensor, k: int) -> torch.Tensor:
    if k < 1 or values.shape[0] % k:
        raise ValueError(f"{values.shape[0]} rows do not make groups of {k} samples per prompt")
    return values.reshape(-1, k)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): each sample's
    baseline is the mean reward of the other k - 1 samples of its prompt, A_i = r_i - 1/(k-1) sum_{j != i} r_j,
    which equals k/(k-1) (r_i - mean_j r_j). rewards (B,) are sequence-level (score - beta * KL, KL in the reward as
    the paper does). (B,) -> (B,)."""
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = _groups(rewards, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """Group Relative Policy Optimization with outcome supervision (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2):
    A_i = (r_i - mean(r)) / std(r) over the k samples of a prompt (sample std; `eps` keeps a group of equal
    rewards at 0 rather than 0/0). The KL is not in these rewards: GRPO adds it to the loss (`kl_loss`). (B,) ->
    (B,)."""
    if k < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    grouped = _groups(rewards, k)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)).reshape(-1)


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s-t) r_s per row, zero where masked out: (B, T) -> (B, T)."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, k: int = 1,
                            gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, "REINFORCE++"): the token-level return of the KL-shaped reward,
    A_t = r(x, y) - beta * sum_{s >= t} KL_s, normalised over the whole batch (global, not per prompt). With k > 1
    samples per prompt ("REINFORCE++ w/ baseline") each score first has its prompt's mean score subtracted.
    scores (B,), kl (B, T) -> (B, T), zero where masked out."""
    if k > 1:
        grouped = _groups(scores, k)
        scores = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    returns = reward_to_go(shaped_rewards(scores, kl, mask, kl_coef), mask, gamma)
    return whiten(returns, mask)


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The KL as a loss term, as GRPO adds it (Shao et al. 2024, eq. 4): the k3 estimator
    pi_ref/pi - log(pi_ref/pi) - 1 of the current policy's log-probs, a masked mean over tokens. Its gradient
    pulls the policy towards the reference; the loss is beta * this."""
    return masked_mean(kl_estimate(logprobs, ref_logprobs, "k3"), mask)
