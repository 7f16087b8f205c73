"""rlhf/losses.py against numbers worked out by hand (each expected value's arithmetic is in the comment)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import losses

X = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
M = torch.tensor([[1, 1, 0, 1]])


def close(actual, expected, tol=1e-5):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32), torch.as_tensor(expected, dtype=torch.float32),
                          atol=tol, rtol=0)


def test_masked_mean_and_var():
    assert close(losses.masked_mean(X, M), 7 / 3)  # (1 + 2 + 4) / 3
    rows = torch.tensor([[1.0, 3.0], [5.0, 9.0]])
    assert close(losses.masked_mean(rows, torch.tensor([[1, 1], [1, 0]]), dim=1), [2.0, 5.0])
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares sum 42/9; biased 14/9, unbiased 42/9 / 2 = 7/3
    assert close(losses.masked_var(X, M, unbiased=False), 14 / 9)
    assert close(losses.masked_var(X, M), 7 / 3)


def test_whiten():
    std = math.sqrt(7 / 3)
    expected = [(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0, (4 - 7 / 3) / std]  # masked entry becomes 0
    assert close(losses.whiten(X, M), [expected], tol=1e-4)
    kept = [e + 7 / 3 for e in expected[:2]] + [0.0, expected[3] + 7 / 3]
    assert close(losses.whiten(X, M, shift_mean=False), [kept], tol=1e-4)
    w = losses.whiten(torch.randn(3, 5), torch.ones(3, 5))
    assert close(w.mean(), 0.0) and close(w.std(), 1.0, tol=1e-4)


def test_logprobs_and_entropy_from_logits():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0]]]))  # softmax = 1/6, 2/6, 3/6
    assert close(losses.logprobs_from_logits(logits, torch.tensor([[2]])), [[math.log(0.5)]])
    assert close(losses.logprobs_from_logits(logits + 100, torch.tensor([[0]])), [[math.log(1 / 6)]], tol=1e-4)
    h = -(1 / 6 * math.log(1 / 6) + 2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6))  # 1.0114
    assert close(losses.entropy_from_logits(logits), [[h]])
    assert close(losses.entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]])
    logp, lse = losses.logprobs_and_logsumexp(logits + 100, torch.tensor([[2]]))  # sum of the exps: 6 e^100
    assert close(logp, [[math.log(0.5)]], tol=1e-4) and close(lse, [[100 + math.log(6)]], tol=1e-4)
    _, lse = losses.logprobs_and_logsumexp(logits + 5, torch.tensor([[2]]))
    assert close(losses.entropy_from_logits(logits + 5, lse), [[h]], tol=1e-5)  # the caller's logsumexp, reused
    assert not close(losses.entropy_from_logits(logits + 5, lse + 0.1), [[h]], tol=1e-2)  # and used


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # log r = log(0.25/0.5) = -ln 2
    assert close(losses.kl_estimate(logp, ref, "k1"), [math.log(2)])  # -log r
    assert close(losses.kl_estimate(logp, ref, "k2"), [0.5 * math.log(2) ** 2])
    assert close(losses.kl_estimate(logp, ref, "k3"), [(0.5 - 1) + math.log(2)])  # (r - 1) - log r = 0.1931
    assert close(losses.kl_estimate(ref, logp, "k3"), [(2 - 1) - math.log(2)])  # r = 2: never negative
    assert close(losses.kl_estimate(logp, logp, "k1"), [0.0])
    with pytest.raises(ValueError, match="k4"):
        losses.kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    true_kl = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[tokens], q.log()[tokens]
    for estimator in ("k1", "k3"):
        assert abs(float(losses.kl_estimate(logp, logq, estimator).mean()) - true_kl) < 0.01


def test_shaped_rewards_put_the_score_on_the_last_token():
    scores = torch.tensor([1.0, 2.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.4, 0.4, 0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    expected = [[-0.05, -0.1 + 1.0, 0.0],  # -0.5 * kl, score at index 1 (last of 2 tokens), nothing after
                [-0.25, -0.25, -0.25 + 2.0],
                [0.0, 0.0, 0.0]]  # an empty response gets nothing
    assert close(losses.shaped_rewards(scores, kl, mask, kl_coef=0.5), expected)


def test_gae_by_hand():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = losses.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # t=2: delta = 1 + 0 - .5 = .5; t=1: delta = 0 + .5 - .5 = 0, A = 0 + .5 * .5 = .25; t=0: A = .5 * .25
    assert close(adv, [[0.125, 0.25, 0.5]])
    assert close(ret, [[0.625, 0.75, 1.0]])
    # gamma discounts: values 0, lam 1 -> A_t = gamma^(2 - t)
    adv, _ = losses.gae(rewards, torch.zeros(1, 3), torch.ones(1, 3), gamma=0.5, lam=1.0)
    assert close(adv, [[0.25, 0.5, 1.0]])
    # lam 0 is one-step TD: A_t = r_t + V_{t+1} - V_t
    adv, _ = losses.gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 5.0]]), torch.ones(1, 2), 1.0, 0.0)
    assert close(adv, [[1 + 5 - 3, 2 + 0 - 5]])


def test_gae_ignores_everything_past_the_end():
    rewards, values = torch.tensor([[0.0, 1.0, 7.0]]), torch.tensor([[0.5, 0.5, 9.0]])
    adv, ret = losses.gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma=1.0, lam=0.5)
    # the padded value 9 and reward 7 never count: t=1: delta = 1 + 0 - .5 = .5; t=0: delta = 0, A = .5 * .5
    assert close(adv, [[0.25, 0.5, 0.0]])
    assert close(ret, [[0.75, 1.0, 0.0]])


def test_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = losses.policy_loss(logprobs, old, advantages, torch.ones(1, 4), cliprange=0.2)
    # per token max(-A r, -A clip(r, .8, 1.2)): max(-1.5, -1.2) = -1.2 (clipped); max(-.5, -.8) = -.5;
    # max(.5, .8) = .8 (clipped); max(1.5, 1.2) = 1.5  -> mean .15, clipfrac 2/4
    assert close(loss, 0.15)
    assert close(stats["clipfrac"], 0.5)
    assert close(stats["approxkl"], 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    assert close(stats["ratio"], 1.0)
    # a masked-out token with a huge ratio changes nothing
    loss2, _ = losses.policy_loss(torch.cat([logprobs, torch.tensor([[50.0]])], 1), torch.zeros(1, 5),
                                  torch.cat([advantages, torch.tensor([[3.0]])], 1), torch.tensor([[1, 1, 1, 1, 0]]))
    assert close(loss2, 0.15)


def test_policy_loss_gradient_pushes_up_positive_advantages():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss, _ = losses.policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[2.0, -1.0]]), torch.ones(1, 2))
    loss.backward()
    # at ratio 1: d/dlogp mean(-A r) = -A / 2 -> minimising raises log p where A > 0 and lowers it where A < 0
    assert close(logprobs.grad, [[-1.0, 0.5]])


def test_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.9]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, stats = losses.value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: (1 - 2)^2 = 1 vs (0.2 - 2)^2 = 3.24 -> 3.24 (clipped); token 1: 1 vs (1.0 - 0)^2 = 1 -> 1
    assert close(loss, 0.5 * (3.24 + 1.0) / 2)
    assert close(stats["clipfrac"], 0.5)


def test_adaptive_kl_controller_moves_beta_the_right_way():
    # KL twice the target: error clipped to +0.2 -> beta * (1 + 0.2 * 256 / 10000)
    assert close(losses.adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=10000, n_steps=256), 0.1 * 1.00512)
    # KL 10 % under target: error -0.1 -> beta * (1 - 0.1 * 0.0256)
    assert close(losses.adaptive_kl_coef(0.1, kl=5.4, target=6.0, horizon=10000, n_steps=256), 0.1 * (1 - 0.00256))
    assert losses.adaptive_kl_coef(0.1, kl=6.0, target=6.0, horizon=10000, n_steps=256) == pytest.approx(0.1)
    # over many updates beta keeps rising while KL stays above target and falls while below
    up = down = 0.1
    for _ in range(50):
        up = losses.adaptive_kl_coef(up, kl=20.0, target=6.0, horizon=1000, n_steps=64)
        down = losses.adaptive_kl_coef(down, kl=1.0, target=6.0, horizon=1000, n_steps=64)
    assert up > 0.15 and down < 0.06


# ---------------------------------------------------------------- critic-free estimators


def test_rloo_advantages_leave_each_sample_out():
    # Prompt 1's rewards 1, 2, 3: baselines (2 + 3) / 2 = 2.5, (1 + 3) / 2 = 2, (1 + 2) / 2 = 1.5; prompt 2's are
    # equal, so their advantages are 0.
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    assert close(losses.rloo_advantages(rewards, 3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # k = 2: each sample's baseline is the other one.
    assert close(losses.rloo_advantages(torch.tensor([1.0, 5.0]), 2), [-4.0, 4.0])
    with pytest.raises(ValueError, match="groups"):
        losses.rloo_advantages(rewards, 4)
    with pytest.raises(ValueError, match="2 samples"):
        losses.rloo_advantages(rewards, 1)


def test_grpo_advantages_normalise_within_each_prompt():
    # 1, 2, 3: mean 2, sample std sqrt((1 + 0 + 1) / 2) = 1 -> -1, 0, 1 (over 1 + 1e-4); 2, 6: mean 4, std
    # sqrt((4 + 4) / 1) = 2 sqrt 2 -> -/+ 2 / 2.8285.
    assert close(losses.grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3), [-1 / 1.0001, 0.0, 1 / 1.0001])
    assert close(losses.grpo_advantages(torch.tensor([2.0, 6.0]), 2), [-2 / (8**0.5 + 1e-4), 2 / (8**0.5 + 1e-4)])
    # equal rewards: 0, not 0 / 0
    assert close(losses.grpo_advantages(torch.tensor([5.0, 5.0, 1.0, 1.0]), 2), [0.0, 0.0, 0.0, 0.0])


def test_reward_to_go_stops_at_the_mask():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert close(losses.reward_to_go(rewards, mask), [[3.0, 2.0, 0.0], [3.0, 2.0, 1.0]])
    assert close(losses.reward_to_go(rewards, mask, gamma=0.5), [[2.0, 2.0, 0.0], [1.75, 1.5, 1.0]])


def test_reinforce_pp_advantages_by_hand():
    # scores 1, 3; KL 0.5 on both of row 0's tokens, beta 1; row 1 has one token. Shaped rewards: row 0
    # [-0.5, -0.5 + 1], row 1 [3]; returns row 0 [0, 0.5], row 1 [3]. Over the batch's three tokens: mean 7/6,
    # deviations -7/6, -2/3, 11/6, squares 49/36 + 16/36 + 121/36 = 186/36, unbiased var 186/72, std 1.60728.
    scores, kl = torch.tensor([1.0, 3.0]), torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    std = (186 / 72) ** 0.5
    expected = [[(0 - 7 / 6) / std, (0.5 - 7 / 6) / std], [(3 - 7 / 6) / std, 0.0]]
    assert close(losses.reinforce_pp_advantages(scores, kl, mask, 1.0), expected, tol=1e-4)
    # Both rows one prompt's samples (k = 2): the mean score 2 is subtracted first, so the scores are -1 and 1 and
    # the returns [-2, -1.5] and [1]; their deviations from their mean -5/6 are again -7/6, -2/3, 11/6, so the
    # normalised advantages are the same as above.
    assert close(losses.reinforce_pp_advantages(scores, kl, mask, 1.0, k=2), expected, tol=1e-4)
    # beta 0, k 1: the score alone on every token, normalised: 1, 1, 3 -> mean 5/3, std sqrt((4/9*2 + 16/9) / 2)
    alone = losses.reinforce_pp_advantages(scores, kl, mask, 0.0)
    std0 = ((4 / 9 * 2 + 16 / 9) / 2) ** 0.5
    assert close(alone, [[(1 - 5 / 3) / std0, (1 - 5 / 3) / std0], [(3 - 5 / 3) / std0, 0.0]], tol=1e-4)


def test_kl_loss_is_k3_of_the_current_policy():
    # log pi = -1, log pi_ref = -2: log r = -1, k3 = e^-1 - 1 + 1 = 0.36788; masked token ignored.
    logprobs, ref = torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, 0.0]])
    assert close(losses.kl_loss(logprobs, ref, torch.tensor([[1, 0]])), math.exp(-1))
    # Its gradient pulls log pi towards log pi_ref: d/d logpi (e^(ref - lp) - (ref - lp) - 1) = 1 - e^(ref - lp) > 0
    # here, so a descent step lowers log pi (from -1 towards -2).
    lp = logprobs.clone().requires_grad_(True)
    losses.kl_loss(lp, ref, torch.tensor([[1, 0]])).backward()
    assert close(lp.grad, [[1 - math.exp(-1), 0.0]])
