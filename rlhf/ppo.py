"""RL with a reward model: PPO (Ziegler et al. 2019; Ouyang et al. 2022) and the critic-free estimators RLOO
(Ahmadian et al. 2024), GRPO (Shao et al. 2024) and REINFORCE++ (Hu et al. 2025), one trainer of the project's own
(TRL 1.13 removed its PPOTrainer; its GRPO and RLOO trainers are separate code paths). `estimator` picks how
advantages are estimated; everything else (sampling, scoring, the clipped update, checkpoints) is shared. `run`
reads top to bottom: `prepare` (models, optimizer, prompts), then per step `train_step`, whose phases are
functions of their own that a test can call:
  1. `sample_rollout`: `samples_per_prompt` responses per prompt (consecutive rows) at `temperature` (left
     padding, KV cache); log pi(y_t) is taken from the same logits the sampler used, divided by the temperature;
     everything after the first EOS is masked out;
  2. `rollout_forward`: the reference's log-probs and (gae only) the critic's values of the sampled tokens;
  3. `score`: the reward model's score of the chat-formatted prompt + response (normalised with the statistics the
     reward stage saved), or a Python reward such as a gold oracle; a `gold` function is scored beside it;
  4. `shape_rewards`: minus `missing_eos_penalty` for responses that never ended, optional clipping, then the
     per-token reward -beta * KL_t plus the score at the last response token (beta fixed or adaptive); with the KL
     as a loss term (GRPO) the score alone;
  5. `estimate_advantages`: GAE over the critic's values, or RLOO's leave-one-out, GRPO's group-normalised or
     REINFORCE++'s batch-normalised advantages (the math in rlhf/losses.py);
  6. `update`: `ppo_epochs` passes over shuffled minibatches: the clipped policy loss, + vf_coef * the clipped
     value loss with a critic, + beta * the k3 KL with the KL as a loss term; gradient accumulation and clipping;
  7. `step_metrics`, then the over-optimisation `Guard` (optional: stop when the proxy-gold gap or the ensemble's
     spread grows past a limit, keeping the best policy, or at a KL budget, keeping the last policy within it),
     the KL controller, metrics.jsonl and `_save_checkpoint`; at the end `save_policy`.
Up to four models: the policy (actor, trained), the critic (gae only: value model, trained; initialised from the
reward model's weights, its score head applied to every hidden state), a frozen reference (or, with LoRA, the policy
with its adapter switched off) and a frozen reward model (or a `reward_fn`). The math lives in `rlhf/losses.py` as
pure functions, the pieces of a rollout in `rlhf/rollout.py`. The implementation details of "The N Implementation
Details of RLHF with PPO" (Huang et al. 2024) all apply: dropout off, logits / temperature, left padding with
position ids from the attention mask, reward normalisation, advantage whitening, the EOS penalty, value clipping,
minibatches reshuffled every epoch.

Where this departs from the papers and from TRL 1.12's PPOTrainer: the score sits on the last response token (the
EOS when there is one), not on the token after it; logits are computed only for response positions (the prompt's
vocabulary projection is never needed); the reward model is fed token ids directly when it shares the policy's
tokenizer and chat template (same formatting as `RewardModel.score`, without a decode/re-encode round trip); the
first training micro-batch's critic forward (on the rollout's weights) gives its rows' rollout values, so the
rollout's critic pass covers only the other rows. The critic-free estimators keep PPO's clipped ratio (with one
minibatch and ppo_epochs 1 the ratio is 1 at the only update, and the loss is plain REINFORCE as Ahmadian et al.
train), and every loss is a mean over the batch's tokens, not GRPO's mean of per-response means. The guard's state
is not in checkpoints: a resumed run's guard starts afresh. For speed on a CPU (docs/performance.md): training
forwards under bf16 autocast use eager attention, sequence widths are rounded up to multiples of 8, AdamW is the
fused one, and glibc keeps freed memory for the next micro-batch's tensors (`rlhf.models.reuse_freed_memory`). With
LoRA the frozen base is held in the compute precision.

Runs under accelerate (`accelerate launch --config_file configs/accelerate/ddp.yaml -m rlhf.cli ppo ...`):
one CPU, one GPU, DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (configs/accelerate/; the README says what ran where).

    rlhf ppo --config configs/ppo.yaml --reward_model runs/reward --steps 20 --batch_size 8 --max_new_tokens 32
    rlhf ppo --reward_model runs/reward --estimator rloo --samples_per_prompt 4 --batch_size 16
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhf import losses, sampler
from rlhf.config import UserError, field, resume_checkpoint
from rlhf.distributed import describe, honour_launch_on_cpu, loading_whole, weights_sharded
from rlhf.models import DEFAULT_MODEL
from rlhf.rollout import (
    SHAPE_MULTIPLE,
    PolicyAndCritic,
    RewardScorer,
    SampledLogprobs,
    build_critic,
    disable_dropout,
    left_pad,
    load_prompts,
    policy_logits,
    positions,
    response_mask,
    round_up,
)

# How each estimator's run is named in progress bars, summaries and the loop's report.
METHOD_NAMES = {"gae": "PPO", "rloo": "RLOO", "grpo": "GRPO", "reinforce_pp": "REINFORCE++"}


@dataclass
class PPOConfig:
    # Model
    model: str = field(DEFAULT_MODEL, "The policy to train (spec or directory); also the reference unless "
                       "ref_model is given.")
    ref_model: str = field("", "Reference policy for the KL penalty; '' = a frozen copy of `model` (with LoRA: the "
                           "policy with its adapter switched off).")
    reward_model: str = field("runs/reward", "Reward model directory (an `rlhf reward` output).")
    reward_fn: str = field("", "A Python reward used instead of the reward model when set: module:function taking "
                           "(prompts, responses) -> list[float], or a gold function (sentiment, keyword:w1,w2, "
                           "length:N).")
    critic_model: str = field("", "Critic initialisation: '' = the reward model's weights when it is a decoder on "
                              "the policy's tokenizer, else the policy's backbone with a zero value head; or a spec.")
    device: str = field("auto", "auto (GPU if present) or cpu. Under `accelerate launch` the launcher decides.")
    precision: str = field("auto", "auto (bf16 where the hardware has it, else fp32), fp32, bf16 or fp16; trained "
                           "weights stay fp32 and the forward passes are autocast.")
    lora: bool = field(False, "Train LoRA adapters (policy and critic; the critic's value head in full) instead of "
                       "all weights, on a frozen base held in `precision` (fp32 under FSDP); merged into the fp32 "
                       "base for the saved policy.")
    lora_r: int = field(16, "LoRA rank.")
    lora_alpha: int = field(32, "LoRA alpha.")
    gradient_checkpointing: bool = field(False, "Trade compute for memory in the policy and critic.")
    # Data
    prompts: str = field("sentiment", "Prompts: 'sentiment' (shipped), a .txt (one per line) / .jsonl / .csv / "
                         ".parquet prompts file, or preference data (export directory, file with a chosen column, "
                         "Hub id) whose prompts are used.")
    prompt_split: str = field("train", "Use the prompts of this split ('' = all).")
    max_prompt_length: int = field(256, "Prompts longer than this (in tokens, chat template included) are left out.")
    # Generation
    max_new_tokens: int = field(48, "Maximum tokens per sampled response.")
    temperature: float = field(0.7, "Sampling temperature; log-probs are computed from logits / temperature.")
    stop_at_eos: bool = field(True, "Stop sampling a response at its EOS (false: always sample max_new_tokens; "
                              "tokens after the first EOS are masked out either way).")
    backend: Literal["sampler", "hf"] = field(
        "sampler", "Rollout sampling, as `rlhf generate --backend`: sampler (rlhf.sampler, our decode loop) or hf "
        "(transformers' generate). Under FSDP or DeepSpeed rollouts use hf: every process must run each forward in "
        "step.")
    # Reward
    normalize_reward: bool = field(True, "Normalise reward-model scores with the mean/std the reward stage saved.")
    reward_ensemble: Literal["mean", "conservative", "worst"] = field(
        "mean", "With an ensemble reward model (`rlhf reward --ensemble K`): optimise the members' mean, the "
        "conservative mean - ensemble_std_coef * std, or the worst member (Coste et al. 2023).")
    ensemble_std_coef: float = field(1.0, "k in mean - k * std for reward_ensemble=conservative.")
    missing_eos_penalty: float = field(0.0, "Subtracted from the score of a response that never produced EOS "
                                       "(0: off).")
    reward_clip: float = field(0.0, "Clip scores to [-reward_clip, reward_clip] (0: off).")
    whiten_rewards: bool = field(False, "Whiten the per-token rewards (keeping their mean) before GAE.")
    kl_coef: float = field(0.05, "beta: weight of the per-token KL penalty -beta * (log pi - log pi_ref).")
    kl_estimator: Literal["k1", "k3"] = field("k1", "KL estimator in the reward: k1 = log pi - log pi_ref, k3 = "
                                              "(r - 1) - log r (never negative).")
    adaptive_kl: bool = field(False, "Adapt beta towards kl_target (Ziegler et al. 2019) instead of keeping it fixed.")
    kl_target: float = field(6.0, "Adaptive controller: target KL per response (nats).")
    kl_horizon: int = field(10000, "Adaptive controller: horizon in episodes (responses).")
    # Advantage estimator
    estimator: Literal["gae", "rloo", "grpo", "reinforce_pp"] = field(
        "gae", "Advantage estimator: gae (PPO: a critic and GAE), rloo (leave-one-out baseline over a prompt's "
        "samples; Ahmadian et al. 2024), grpo (rewards normalised within a prompt's samples; Shao et al. 2024) or "
        "reinforce_pp (returns normalised over the batch; Hu et al. 2025). Only gae loads and trains a critic.")
    samples_per_prompt: int = field(0, "k responses sampled per prompt in a step; batch_size counts responses, so a "
                                    "step covers batch_size / k prompts. 0 = 4 for rloo, grpo and reinforce_pp, 1 "
                                    "for gae.")
    kl_penalty: Literal["auto", "reward", "loss"] = field(
        "auto", "Where beta * KL goes: 'reward' (subtracted from the reward, as PPO, RLOO and REINFORCE++ do) or "
        "'loss' (a k3 term added to the policy loss, as GRPO does); auto = as the estimator's paper does.")
    # Over-optimisation guard
    gold: str = field("", "A gold function (sentiment, keyword:w1,w2, length:N, module:function) scored on every "
                      "step's responses beside the reward model (objective/gold in metrics.jsonl); '' = none.")
    guard_gap: float = field(0.0, "Stop when the proxy-gold gap passes this: the reward model's gain since step 1 "
                             "minus the gold's, each in units of its step-1 spread over responses, averaged over "
                             "the last 3 steps (needs gold; 0: off). The policy kept is the one with the best gold.")
    guard_spread: float = field(0.0, "Stop when the ensemble members' spread on the responses (normalised reward "
                                "units), averaged over the last 3 steps, passes this (needs an ensemble reward "
                                "model; 0: off). The policy kept is the one with the best mean - spread.")
    guard_kl: float = field(0.0, "A KL budget: stop at the first step whose policy has spent more than this KL to "
                            "the reference (objective/kl, nats per response, on that step's rollout) and keep the "
                            "last policy within it (0: off). With guard_gap or guard_spread as well, the best of "
                            "the policies within the budget by their signal.")
    # Optimization
    steps: int = field(100, "RL steps (each: one rollout batch, then ppo_epochs of updates).")
    batch_size: int = field(16, "Responses (rollouts) per step per process: batch_size / samples_per_prompt "
                            "prompts.")
    mini_batch_size: int = field(8, "Rollouts per optimizer update per process.")
    gradient_accumulation_steps: int = field(1, "Micro-batches per minibatch (micro-batch = mini_batch_size / this).")
    ppo_epochs: int = field(4, "Passes over each rollout batch, reshuffled every pass.")
    learning_rate: float = field(3e-6, "AdamW learning rate (policy and critic).")
    lr_schedule: Literal["linear", "constant"] = field("linear", "Learning rate over the steps: linear decay to 0 "
                                                       "(as the papers do) or constant.")
    warmup_steps: int = field(0, "RL steps over which the learning rate first rises linearly to learning_rate "
                              "(then the schedule runs over the remaining steps; 0: none).")
    max_grad_norm: float = field(1.0, "Clip the gradient norm to this (0: off).")
    gamma: float = field(1.0, "Discount factor.")
    lam: float = field(0.95, "GAE lambda.")
    cliprange: float = field(0.2, "PPO ratio clip epsilon.")
    cliprange_value: float = field(0.2, "Value clip: new values stay within this of the rollout's values.")
    vf_coef: float = field(0.1, "Weight of the value loss.")
    whiten_advantages: bool = field(True, "Whiten gae's and rloo's advantages over each rollout batch (grpo and "
                                    "reinforce_pp normalise as their papers do).")
    seed: int = field(0, "Random seed (the fresh adapters and value head, prompt order, sampling, minibatch shuffles).")
    # Output
    output_dir: str = field("runs/ppo", "Where the trained policy, metrics.json, metrics.jsonl and checkpoints go.")
    save_steps: int = field(0, "Save a checkpoint (policy, critic, optimizer, KL controller, step) every this "
                            "many steps (0: only the final model).")
    resume: str = field("", "Resume: '' (no), 'latest' (newest checkpoint in output_dir) or a checkpoint path.")
    logging_steps: int = field(1, "Send metrics to the trackers every this many steps (metrics.jsonl gets every step).")
    report_to: str = field("none", "none, tensorboard, wandb, ... (accelerate trackers, as in TRL).")

    def __post_init__(self):
        if not self.reward_model and not self.reward_fn:
            raise ValueError("give a reward: reward_model or reward_fn")
        if self.reward_ensemble not in ("mean", "conservative", "worst") or self.ensemble_std_coef < 0:
            raise ValueError("reward_ensemble must be mean, conservative or worst; ensemble_std_coef >= 0")
        if self.steps < 1 or self.batch_size < 1 or self.mini_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("steps, batch_size, mini_batch_size and gradient_accumulation_steps must be >= 1")
        if self.batch_size % self.mini_batch_size or self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError("batch_size must be a multiple of mini_batch_size, and mini_batch_size of "
                             "gradient_accumulation_steps")
        if self.ppo_epochs < 1 or self.max_new_tokens < 1 or self.max_prompt_length < 1:
            raise ValueError("ppo_epochs, max_new_tokens and max_prompt_length must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (PPO needs the sampling distribution's log-probs)")
        if self.learning_rate <= 0 or self.cliprange <= 0 or self.cliprange_value <= 0:
            raise ValueError("learning_rate, cliprange and cliprange_value must be > 0")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("gamma and lam must be in [0, 1]")
        if min(self.kl_coef, self.missing_eos_penalty, self.reward_clip, self.max_grad_norm, self.vf_coef) < 0:
            raise ValueError("kl_coef, missing_eos_penalty, reward_clip, max_grad_norm and vf_coef must be >= 0")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon < 1):
            raise ValueError("kl_target must be > 0 and kl_horizon >= 1")
        if self.kl_estimator not in ("k1", "k3") or self.lr_schedule not in ("linear", "constant"):
            raise ValueError("kl_estimator must be k1 or k3, lr_schedule linear or constant")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError("warmup_steps must be >= 0 and below steps")
        if self.save_steps < 0 or self.logging_steps < 1 or (self.lora and min(self.lora_r, self.lora_alpha) < 1):
            raise ValueError("save_steps must be >= 0, logging_steps >= 1, lora_r and lora_alpha >= 1")
        if self.estimator not in METHOD_NAMES or self.kl_penalty not in ("auto", "reward", "loss"):
            raise ValueError("estimator must be gae, rloo, grpo or reinforce_pp; kl_penalty auto, reward or loss")
        if self.samples_per_prompt < 0:
            raise ValueError("samples_per_prompt must be >= 0 (0: the estimator's default)")
        if self.estimator in ("rloo", "grpo") and self.k < 2:
            raise ValueError(f"{self.estimator} compares a prompt's samples: samples_per_prompt must be >= 2")
        if self.batch_size % self.k:
            raise ValueError(f"batch_size ({self.batch_size} responses) must be a multiple of samples_per_prompt "
                             f"({self.k})")
        if self.guard_gap < 0 or self.guard_spread < 0 or self.guard_kl < 0:
            raise ValueError("guard_gap, guard_spread and guard_kl must be >= 0")
        if self.guard_gap and not self.gold:
            raise ValueError("guard_gap compares the reward model with a gold function: give gold")

    @property
    def k(self) -> int:
        """Samples per prompt, the default resolved."""
        return self.samples_per_prompt or (1 if self.estimator == "gae" else 4)

    @property
    def uses_critic(self) -> bool:
        return self.estimator == "gae"

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_penalty == "loss" or (self.kl_penalty == "auto" and self.estimator == "grpo")




# ---------------------------------------------------------------- the run's parts


@dataclass
class PPORun:
    """What every step uses, built once by `prepare`: the prepared models and optimizer, the reward, the prompts,
    and beta, the one value that changes between steps (the adaptive KL controller)."""

    config: PPOConfig
    accelerator: Any
    model: Any  # PolicyAndCritic, as accelerate prepared it
    optimizer: Any
    ref: Any  # the frozen reference, or None when it is the policy with its LoRA adapter switched off
    tokenizer: Any
    scorer: RewardScorer
    eos_ids: list[int]
    prompts: list
    encoded: list[list[int]]  # each prompt through the policy's chat template, tokenized
    device: torch.device
    mixed: str  # accelerate's mixed precision: no, bf16 or fp16
    kl_coef: float
    policy_lora: Any = None  # the policy's LoraConfig, to merge the adapter into the fp32 base on save
    frozen_base: bool = False  # LoRA on a base held in the compute precision
    gold_fn: Callable | None = None  # config.gold, scored beside the reward every step
    guard: Guard | None = None  # the over-optimisation guard, when one is on

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def per_step(self) -> int:
        return self.config.batch_size * self.world

    @property
    def micro_batch_size(self) -> int:
        return self.config.mini_batch_size // self.config.gradient_accumulation_steps

    @property
    def policy(self):
        """The trained policy module (unwrapped from DDP)."""
        return self.accelerator.unwrap_model(self.model).policy


@dataclass
class Rollout:
    """One step's batch of B prompts (Q columns, left-padded) and their sampled responses (R columns), filled in
    phase by phase: sampling, then the rollout's forward passes, then scoring and reward shaping."""

    indices: list[int]  # which prompts, in the run's order
    prompt_ids: torch.Tensor  # (B, Q)
    prompt_mask: torch.Tensor  # (B, Q)
    responses: torch.Tensor  # (B, R), padding after the first EOS
    logprobs: torch.Tensor  # (B, R), log pi at the sampling temperature
    mask: torch.Tensor  # (B, R), 1 through the first EOS
    ended: torch.Tensor  # (B,), produced an EOS
    input_ids: torch.Tensor  # (B, Q + R)
    attention_mask: torch.Tensor  # (B, Q + R)
    position_ids: torch.Tensor  # (B, Q + R)
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    values: torch.Tensor | None = None  # (B, R); the first training micro-batch's rows are filled by `update`
    scores: torch.Tensor | None = None  # (B,), after the EOS penalty and clipping
    kl: torch.Tensor | None = None  # (B, R), masked
    rewards: torch.Tensor | None = None  # (B, R), shaped (score at the last token, and -beta * KL_t when the KL is
    # in the reward)
    gold: torch.Tensor | None = None  # (B,), config.gold's scores, when set
    advantages: torch.Tensor | None = None  # (B, R), once estimated


def _gather_mean(accelerator, value) -> float:
    tensor = torch.as_tensor(value, dtype=torch.float32, device=accelerator.device).reshape(1)
    return float(accelerator.gather(tensor).mean())


@dataclass
class Guard:
    """The over-optimisation guard (Gao et al. 2022: past some KL the proxy reward keeps rising while the gold
    reward falls; Coste et al. 2023: the ensemble's members then disagree). Fed each step's metrics, it says whether
    this step's policy (the one that sampled the step, before its update) is the best so far and whether to stop.
    The gap and spread are averaged over the last `window` steps, as one step's batch is small. The KL budget
    (`kl_limit`) is a step's own KL: a policy past it is never the one kept, and ends the run; without the other
    signals the last policy within it is kept (the gold's rise per nat of KL is what RLHF buys, Gao et al. 2022)."""

    gap_limit: float = 0.0
    spread_limit: float = 0.0
    kl_limit: float = 0.0
    window: int = 3
    start: dict | None = None  # step 1's means and spreads of the proxy and gold scores
    signals: list = dataclasses.field(default_factory=list)  # (gap, spread) per step
    best: float = -math.inf
    best_step: int = 0
    best_state: dict | None = None  # the best policy's trained parameters, on the CPU
    stopped: str = ""  # why it stopped, once it has

    def observe(self, metrics: dict) -> bool:
        """Record a step; returns whether its policy is the best so far (then `best_step` is its step)."""
        proxy, gold = metrics["objective/scores"], metrics.get("objective/gold")
        spread = metrics.get("objective/reward_spread", 0.0)
        if self.start is None:
            self.start = {"proxy": proxy, "proxy_std": max(metrics["objective/scores_std"], 1e-6),
                          "gold": gold, "gold_std": max(metrics.get("objective/gold_std", 1.0), 1e-6)}
        gap = 0.0
        if gold is not None:
            gap = ((proxy - self.start["proxy"]) / self.start["proxy_std"]
                   - (gold - self.start["gold"]) / self.start["gold_std"])
        self.signals.append((gap, spread))
        recent = self.signals[-self.window:]
        mean_gap, mean_spread = (sum(x[i] for x in recent) / len(recent) for i in (0, 1))
        metrics["guard/gap"], metrics["guard/spread"] = mean_gap, mean_spread
        if self.kl_limit and metrics["objective/kl"] > self.kl_limit:
            self.stopped = f"KL {metrics['objective/kl']:.2f} > guard_kl {self.kl_limit:g}"
        elif self.gap_limit and mean_gap > self.gap_limit:
            self.stopped = f"proxy-gold gap {mean_gap:.2f} > guard_gap {self.gap_limit:g}"
        elif self.spread_limit and mean_spread > self.spread_limit:
            self.stopped = f"ensemble spread {mean_spread:.3f} > guard_spread {self.spread_limit:g}"
        value = gold if self.gap_limit else proxy - spread if self.spread_limit else metrics["step"]
        if value > self.best and not self.stopped:
            self.best, self.best_step = value, metrics["step"]
            return True
        return False


def policy_snapshot(run: PPORun) -> dict:
    """The policy's trained parameters (all of them, or the LoRA adapters), copied to the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in run.policy.named_parameters() if p.requires_grad}


def restore_policy(run: PPORun, snapshot: dict) -> None:
    params = dict(run.policy.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


# ---------------------------------------------------------------- prepare


def prepare(config: PPOConfig, reward_fn: Callable | None = None) -> PPORun:
    """The accelerator, the four models (policy and critic as one prepared module), the optimizer, the reward and
    the prompts, rendered through the policy's chat template and tokenized once."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType

    from rlhf.models import pick_device, pick_dtype
    from rlhf.sample import render_prompt

    device = pick_device(config.device)
    dtype = pick_dtype(device, config.precision)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # A trainer that ran earlier in this process (the loop's DPO, a test) left its precision in the shared
        # state, and accelerate refuses to change it; one process has nothing to keep in sync, so start afresh.
        AcceleratorState._reset_state()
        GradientState._reset_state()
    if device.type == "cpu":
        honour_launch_on_cpu(mixed)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              log_with=None if config.report_to == "none" else config.report_to,
                              project_dir=str(Path(config.output_dir)))
    device = accelerator.device
    if reward_fn is None and config.reward_fn:
        from rlhf.annotators import load_gold

        reward_fn = load_gold(config.reward_fn)
    if reward_fn is None and not config.reward_model:
        raise UserError("no reward: give reward_model or reward_fn")
    gold_fn = None
    if config.gold:
        from rlhf.annotators import load_gold

        gold_fn = load_gold(config.gold)
    guard = None
    if config.guard_gap or config.guard_spread or config.guard_kl:
        if weights_sharded(accelerator):
            raise UserError("the over-optimisation guard keeps the best policy's weights, which FSDP and ZeRO-3 "
                            "shard: run it under DDP or ZeRO-2, or set guard_gap, guard_spread and guard_kl to 0")
        guard = Guard(gap_limit=config.guard_gap, spread_limit=config.guard_spread, kl_limit=config.guard_kl)
    # Whole on every process, also under ZeRO-3: the reference and reward model run outside DeepSpeed, and the
    # critic's fresh value head is zeroed in place, which a partitioned tensor would ignore; prepare() partitions
    # the policy and critic (zero3_init_flag: false in configs/accelerate/deepspeed_zero3.yaml).
    with loading_whole(accelerator):
        parts = _load_models(config, accelerator, reward_fn)
    if config.guard_spread and (parts["rm"] is None or parts["rm"].size < 2):
        raise UserError("guard_spread watches an ensemble's members disagree: give a reward model trained with "
                        "`rlhf reward --ensemble K` (K >= 2), or set guard_spread to 0")
    model = PolicyAndCritic(parts["policy"], parts["critic"], eager_training=not config.gradient_checkpointing)
    # The fused AdamW (one kernel over all parameters, as transformers' Trainer defaults to) is faster than the
    # for-each one and allocates no parameter-sized temporaries.
    fused = device.type in ("cpu", "cuda") and accelerator.state.deepspeed_plugin is None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  fused=fused or None)
    if accelerator.state.deepspeed_plugin is not None:
        # No dataloader is prepared, so DeepSpeed must be told the batch geometry and clipping itself.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=config.mini_batch_size // config.gradient_accumulation_steps,
                  gradient_accumulation_steps=config.gradient_accumulation_steps,
                  gradient_clipping=config.max_grad_norm or 0.0)
    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    if plugin is not None and plugin.transformer_cls_names_to_wrap is None:
        # TRANSFORMER_BASED_WRAP reads the layer classes from the model's _no_split_modules, which PolicyAndCritic
        # has none of: name the policy's and the critic's, so each of their layers is its own unit.
        from accelerate.utils.dataclasses import get_module_class_from_name

        trained = [m for m in (parts["policy"], parts["critic"]) if m is not None]
        plugin.transformer_cls_names_to_wrap = sorted({
            name for m in trained for name in getattr(m, "_no_split_modules", None) or []
            if get_module_class_from_name(m, name) is not None})
    if plugin is not None and plugin.fsdp_version == 2:
        # FSDP2 warns that forward's outputs are views (sliced logits, squeezed values) because an in-place op on one
        # would skip its gradient hook; rlhf never changes them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    model, optimizer = accelerator.prepare(model, optimizer)

    tokenizer = parts["tokenizer"]
    prompts = load_prompts(config.prompts, config.prompt_split)
    encoded = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= config.max_prompt_length]
    if not keep:
        raise UserError(f"every prompt is longer than max_prompt_length={config.max_prompt_length} tokens")
    return PPORun(config=config, accelerator=accelerator, model=model, optimizer=optimizer, ref=parts["ref"],
                  tokenizer=tokenizer, scorer=RewardScorer(parts["rm"], reward_fn, tokenizer, config.normalize_reward,
                                                     config.reward_ensemble, config.ensemble_std_coef),
                  eos_ids=parts["eos_ids"], prompts=[prompts[i] for i in keep], encoded=[encoded[i] for i in keep],
                  device=device, mixed=mixed, kl_coef=config.kl_coef, policy_lora=parts["policy_lora"],
                  frozen_base=parts["frozen_base"], gold_fn=gold_fn, guard=guard)


def _load_models(config: PPOConfig, accelerator, reward_fn: Callable | None) -> dict:
    """Policy, critic, reference and reward model. Trained weights in fp32 (autocast does the low-precision
    math); frozen ones directly in the compute dtype."""
    from accelerate.utils import DistributedType
    from transformers import set_seed

    from rlhf.models import load

    # The fresh weights (LoRA's A matrices, a new value head) come from the seed: unseeded, two runs of one config
    # sampled the same first rollout (B = 0 leaves the policy as loaded) and then trained apart from the first update.
    set_seed(config.seed)
    device = accelerator.device
    # With LoRA the base weights are frozen, so they are held in the compute dtype and only the adapters (and the
    # critic's value head) in fp32: autocast caches its casts of trained weights only, so fp32 frozen weights would
    # be cast again at every decoding step. FSDP flattens a module's weights into one tensor of one dtype, so under
    # FSDP they stay fp32.
    frozen_base = config.lora and accelerator.distributed_type != DistributedType.FSDP
    base_precision = config.precision if frozen_base else "fp32"
    policy_loaded = load(config.model, device=str(device), precision=base_precision)
    policy, tokenizer = policy_loaded.model, policy_loaded.tokenizer
    rm = None
    if config.reward_model and reward_fn is None:
        from rlhf.reward import RewardModel

        rm = RewardModel.load(config.reward_model, device=str(device), precision=config.precision)
        rm.model.eval().requires_grad_(False)
    critic = None
    if config.uses_critic:
        critic = build_critic(config.critic_model, rm, policy_loaded.path, tokenizer, device, base_precision)
    ref = None
    if config.ref_model or not config.lora:
        ref = load(config.ref_model or config.model, device=str(device), precision=config.precision).model
        ref.eval().requires_grad_(False)
        disable_dropout(ref)
    for m in (policy, critic) if critic is not None else (policy,):
        disable_dropout(m)
        if config.gradient_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen_eos = policy.generation_config.eos_token_id
    eos_ids = sorted({tokenizer.eos_token_id} | set([gen_eos] if isinstance(gen_eos, int) else gen_eos or []))
    policy_lora = None
    if config.lora:
        from peft import get_peft_model

        from rlhf.trl_stage import lora_config

        policy_lora = lora_config(config.lora_r, config.lora_alpha, "CAUSAL_LM")
        policy = get_peft_model(policy, policy_lora)
        if critic is not None:
            critic = get_peft_model(critic, lora_config(config.lora_r, config.lora_alpha, "SEQ_CLS",
                                                        modules_to_save=["score"]))
        for p in [*policy.parameters(), *(critic.parameters() if critic is not None else ())]:
            if p.requires_grad:  # trained weights in fp32 (the optimizer's updates would vanish in bf16)
                p.data = p.data.float()
    return {"policy": policy, "critic": critic, "ref": ref, "rm": rm, "tokenizer": tokenizer, "eos_ids": eos_ids,
            "policy_lora": policy_lora, "frozen_base": frozen_base}


# ---------------------------------------------------------------- one step, phase by phase


@functools.lru_cache(maxsize=2)
def _prompt_order(seed: int, n: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return tuple(order)


def prompt_indices(run: PPORun, step: int) -> list[int]:
    """This process's prompts for `step`, each repeated samples_per_prompt times in consecutive rows (the groups
    the critic-free estimators compare): a fresh shuffle per pass over the prompts, a function of the seed and
    step alone so that a resumed run sees the same prompts."""
    n, k = len(run.prompts), run.config.k
    size = run.config.batch_size // k
    first = step * (run.per_step // k) + run.rank * size
    return [_prompt_order(run.config.seed, n, j // n)[j % n] for j in range(first, first + size) for _ in range(k)]


@contextlib.contextmanager
def gathered_for_sampling(run: PPORun):
    """The prepared model to sample through; under DeepSpeed ZeRO-3 the unwrapped one, its policy's weights gathered
    whole on every process for the rollout and DeepSpeed's per-forward gathering hooks off (as TRL's
    unwrap_model_for_generation does), so decoding does not gather every layer at every step."""
    plugin = run.accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield run.model
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(run.policy.parameters())):
        remove_hooks(run.model)
        try:
            yield run.accelerator.unwrap_model(run.model)
        finally:
            add_hooks(run.model)


def sample_rollout(run: PPORun, step: int) -> Rollout:
    """Phase 1: a response per prompt, recording log pi at the sampling temperature; masks through the first EOS."""
    from accelerate.utils import DistributedType
    from transformers import LogitsProcessorList

    config, tokenizer = run.config, run.tokenizer
    # Seeded by step (and process), so an interrupted run resumed from a checkpoint samples the same.
    torch.manual_seed(config.seed * 1_000_003 + step * 997 + run.rank)
    indices = prompt_indices(run, step)
    prompt_ids, prompt_mask = left_pad([run.encoded[i] for i in indices], tokenizer.pad_token_id, SHAPE_MULTIPLE)
    prompt_ids, prompt_mask = prompt_ids.to(run.device), prompt_mask.to(run.device)
    Q = prompt_ids.shape[1]
    run.model.eval()
    eos_ids = run.eos_ids if config.stop_at_eos else None
    if config.backend == "hf" or run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        recorder = SampledLogprobs(config.temperature)
        with torch.no_grad(), gathered_for_sampling(run) as model:
            sequences = model(
                prompt_ids, prompt_mask, mode="generate", max_new_tokens=config.max_new_tokens, do_sample=True,
                temperature=config.temperature, top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([recorder]),
                # Under FSDP every process runs the same number of decoding steps, however early its own responses
                # end: each step gathers every layer's weights, with all processes taking part. (Under ZeRO-3 the
                # policy is gathered whole for the rollout, so each process decodes by itself.)
                synced_gpus=run.accelerator.distributed_type == DistributedType.FSDP)
        responses = sequences[:, Q:]  # (B, R)
        logprobs = recorder.result(responses)  # (B, R)
    else:
        # The unwrapped policy (under DDP its weights are the wrapped one's), in the training forward's autocast.
        policy = run.accelerator.unwrap_model(run.model).policy
        with run.accelerator.autocast():
            drawn = sampler.sample(policy, prompt_ids, prompt_mask, max_new_tokens=config.max_new_tokens,
                                   temperature=config.temperature, eos_ids=eos_ids or (),
                                   pad_id=tokenizer.pad_token_id)
        responses, logprobs = drawn.tokens, drawn.logprobs  # (B, R), (B, R)
    mask, ended = response_mask(responses, run.eos_ids)  # (B, R), (B,)
    # When every response stopped early, pad the columns up to a bucketed width too (masked out).
    extra = min(config.max_new_tokens, round_up(responses.shape[1])) - responses.shape[1]
    if extra > 0:
        pad = functools.partial(torch.nn.functional.pad, pad=(0, extra))
        responses, logprobs, mask = pad(responses), pad(logprobs), pad(mask)
    responses = responses.masked_fill(mask == 0, tokenizer.pad_token_id)
    attention_mask = torch.cat([prompt_mask, mask], 1)
    return Rollout(indices=indices, prompt_ids=prompt_ids, prompt_mask=prompt_mask, responses=responses,
                   logprobs=logprobs, mask=mask, ended=ended, input_ids=torch.cat([prompt_ids, responses], 1),
                   attention_mask=attention_mask, position_ids=positions(attention_mask))


def minibatch_orders(config: PPOConfig, step: int, n: int) -> list[torch.Tensor]:
    """The rollout rows in a fresh random order for every PPO epoch (the same on every process)."""
    shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    return [torch.randperm(n, generator=shuffle) for _ in range(config.ppo_epochs)]


def rollout_forward(run: PPORun, rollout: Rollout, valued_later: torch.Tensor) -> None:
    """Phase 2: the reference's log-probs of the sampled tokens, and (with a critic) the critic's values of every
    row but `valued_later`: the first training micro-batch's rows, whose forward (on the same weights) values
    them."""
    T, B, R = run.config.temperature, *rollout.responses.shape
    valued_here = torch.ones(B, dtype=torch.bool)
    valued_here[valued_later] = False
    critic = run.config.uses_critic
    rollout.ref_logprobs = torch.empty_like(rollout.logprobs)
    rollout.values = torch.zeros_like(rollout.logprobs) if critic else None
    chunk = run.config.mini_batch_size
    with torch.no_grad():
        for i in range(0, B, chunk):
            s = slice(i, i + chunk)
            args = (rollout.input_ids[s], rollout.attention_mask[s], rollout.position_ids[s], R)
            if run.ref is None:
                ref_logits = run.model(*args, mode="reference")
            else:
                with run.accelerator.autocast():
                    ref_logits = policy_logits(run.ref, *args)
            rollout.ref_logprobs[s] = losses.logprobs_from_logits(ref_logits.float() / T, rollout.responses[s])
            del ref_logits
            rows = torch.arange(B)[s][valued_here[s]].to(run.device)
            if critic and len(rows):  # the same rows on every process (the order is not per process)
                rollout.values[rows] = run.model(rollout.input_ids[rows], rollout.attention_mask[rows],
                                                 rollout.position_ids[rows], R, mode="values")


def score(run: PPORun, rollout: Rollout) -> torch.Tensor:
    """Phase 3: the reward of each response (B,), from the reward model or the reward function; the gold
    function's scores (config.gold) beside it, for the guard and metrics.jsonl."""
    lengths = rollout.mask.sum(1).tolist()
    response_ids = [rollout.responses[i, : lengths[i] - int(rollout.ended[i])].tolist()
                    for i in range(len(rollout.indices))]
    # The text as the store holds generated responses (rlhf.sample.generate_batch): specials dropped, stripped.
    texts = [t.strip() for t in run.tokenizer.batch_decode(response_ids, skip_special_tokens=True)]
    prompts = [run.prompts[i] for i in rollout.indices]
    if run.gold_fn is not None:
        rollout.gold = torch.tensor([float(g) for g in run.gold_fn(prompts, texts)], dtype=torch.float32)
    return run.scorer(prompts, [run.encoded[i] for i in rollout.indices], response_ids, texts).to(run.device)


def shape_rewards(config: PPOConfig, rollout: Rollout, scores: torch.Tensor, kl_coef: float) -> None:
    """Phase 4, where the KL penalty is applied when it is in the reward: the score (+ EOS penalty, clipping) at the
    last response token and -beta * KL_t on every token (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2).
    With the KL as a loss term (GRPO) the reward is the score alone; the KL is still measured."""
    if config.missing_eos_penalty:
        scores = scores - config.missing_eos_penalty * (~rollout.ended).float()
    if config.reward_clip:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    kl = losses.kl_estimate(rollout.logprobs, rollout.ref_logprobs, config.kl_estimator) * rollout.mask  # (B, R)
    rewards = losses.shaped_rewards(scores, kl, rollout.mask, 0.0 if config.kl_in_loss else kl_coef)
    if config.whiten_rewards:
        rewards = losses.whiten(rewards, rollout.mask, shift_mean=False)
    rollout.scores, rollout.kl, rollout.rewards = scores, kl, rewards


def estimate_advantages(config: PPOConfig, rollout: Rollout, kl_coef: float) -> tuple[torch.Tensor,
                                                                                     torch.Tensor | None]:
    """Phase 5: per-token advantages (B, R) and the critic's targets (B, R), or None without a critic.
      gae           GAE (Schulman et al. 2016, eq. 16) over the shaped rewards and the critic's rollout values;
                    called once every rollout value is known (the first training micro-batch completes them);
      rloo          the leave-one-out advantage of each response's sequence reward (score - beta * KL);
      grpo          the group-normalised score (the KL is in the loss);
      reinforce_pp  the token-level return of the KL-shaped reward, normalised over the batch.
    The sequence-level ones hold one value over a response's tokens. gae's and rloo's are whitened over the
    batch when whiten_advantages is set."""
    mask, k = rollout.mask, config.k
    if config.estimator == "gae":
        advantages, returns = losses.gae(rollout.rewards, rollout.values, mask, config.gamma, config.lam)
    elif config.estimator == "reinforce_pp":
        beta = 0.0 if config.kl_in_loss else kl_coef
        return losses.reinforce_pp_advantages(rollout.scores, rollout.kl, mask, beta, k, config.gamma), None
    else:
        sequence_reward = rollout.rewards.sum(1)  # (B,): the score, minus beta * KL when the KL is in the reward
        per_row = (losses.rloo_advantages(sequence_reward, k) if config.estimator == "rloo"
                   else losses.grpo_advantages(sequence_reward, k))
        advantages, returns = per_row[:, None] * mask.to(per_row.dtype), None
        if config.estimator == "grpo":
            return advantages, None
    if config.whiten_advantages:
        advantages = losses.whiten(advantages, mask)
    return advantages, returns


def learning_rate(config: PPOConfig, step: int) -> float:
    """The rate of 0-based `step`: rising over `warmup_steps` (the first of them above 0: a step at rate 0 would
    sample and learn nothing), then constant or falling linearly towards 0 over the remaining steps. Why warm up:
    Adam's first updates move every weight by about the rate whatever its gradient's size (the moment estimates
    start from one noisy gradient), so a high rate's first step moves the policy along that gradient's noise."""
    warmup = config.warmup_steps
    if step < warmup:
        return config.learning_rate * (step + 1) / (warmup + 1)
    if config.lr_schedule == "constant":
        return config.learning_rate
    return config.learning_rate * (1 - (step - warmup) / (config.steps - warmup))


STAT_KEYS = ("pg", "vf", "clip", "vclip", "approxkl", "ratio", "ent", "klloss")


def update(run: PPORun, rollout: Rollout, orders: list[torch.Tensor], lr: float) -> dict[str, float]:
    """Phase 6: PPO epochs over reshuffled minibatches of micro-batches (the optimizer steps once per minibatch,
    through accelerate's gradient accumulation): the clipped policy loss, plus the clipped value loss with a
    critic, plus beta * the KL loss when the KL is a loss term. Returns the mean of each loss statistic over the
    micro-batches (the ones that apply)."""
    config, model, accelerator, T = run.config, run.model, run.accelerator, run.config.temperature
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    model.train()
    stats: dict[str, list[float]] = {k: [] for k in STAT_KEYS}
    advantages, returns = rollout.advantages, None  # known already unless gae waits for this step's first forward
    size = run.micro_batch_size
    for order in orders:
        for start in range(0, len(order), size):
            idx = order[start : start + size].to(run.device)
            cols, width = _micro_batch_columns(rollout, idx)
            with accelerator.accumulate(model):
                logits, new_values = model(rollout.input_ids[idx, cols], rollout.attention_mask[idx, cols],
                                           rollout.position_ids[idx, cols], width)
                if advantages is None:  # phase 5, with the rollout values this forward completes
                    rollout.values[idx, :width] = new_values.detach()
                    advantages, returns = estimate_advantages(config, rollout, run.kl_coef)
                    rollout.advantages = advantages
                logits = logits.float() / T
                new_logprobs, logsumexp = losses.logprobs_and_logsumexp(logits, rollout.responses[idx, :width])
                m = rollout.mask[idx, :width]
                pg_loss, pg = losses.policy_loss(new_logprobs, rollout.logprobs[idx, :width],
                                                 advantages[idx, :width], m, config.cliprange)
                loss, step_stats = pg_loss, {"pg": pg_loss, "clip": pg["clipfrac"], "approxkl": pg["approxkl"],
                                             "ratio": pg["ratio"]}
                if new_values is not None:
                    vf_loss, vf = losses.value_loss(new_values, rollout.values[idx, :width], returns[idx, :width], m,
                                                    config.cliprange_value)
                    loss = loss + config.vf_coef * vf_loss
                    step_stats.update(vf=vf_loss, vclip=vf["clipfrac"])
                if config.kl_in_loss:
                    kl_term = losses.kl_loss(new_logprobs, rollout.ref_logprobs[idx, :width], m)
                    loss = loss + run.kl_coef * kl_term
                    step_stats["klloss"] = kl_term
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad()
            with torch.no_grad():
                step_stats["ent"] = losses.masked_mean(losses.entropy_from_logits(logits, logsumexp.detach()), m)
            for key, value in step_stats.items():
                stats[key].append(float(value.detach()))
            del logits, logsumexp, new_values, new_logprobs, loss, pg_loss, step_stats
    return {k: sum(v) / len(v) for k, v in stats.items() if v}


def _micro_batch_columns(rollout: Rollout, idx: torch.Tensor) -> tuple[slice, int]:
    """The columns a micro-batch needs: those every one of its rows pads (left of the prompts, right of the
    responses) are trimmed, keeping widths multiples of SHAPE_MULTIPLE. Returns them and the response width."""
    Q, R = rollout.prompt_ids.shape[1], rollout.responses.shape[1]
    width = min(R, round_up(int(rollout.mask[idx].sum(1).max().clamp(min=1))))
    used = Q + width - int(rollout.prompt_mask[idx].any(0).long().argmax())
    return slice(Q + width - min(Q + width, round_up(used)), Q + width), width


def step_metrics(run: PPORun, rollout: Rollout, stats: dict[str, float], step: int, lr: float,
                 step_start: float) -> dict:
    """Phase 7: the step's figures, means over processes, named as TRL's PPO trainer named them (loss/value_avg
    and val/clipfrac_avg with a critic only; objective/gold with a gold function)."""
    accelerator, kl_coef, mask = run.accelerator, run.kl_coef, rollout.mask
    seq_kl = float(rollout.kl.sum(1).mean())
    metrics = {"step": step + 1, "episode": (step + 1) * run.per_step}
    local = {
        "objective/kl": seq_kl,
        "objective/entropy": float((-rollout.logprobs * mask).sum(1).mean()),
        "objective/non_score_reward": float((-kl_coef * rollout.kl).sum(1).mean()),
        "objective/scores": float(rollout.scores.mean()),
        "objective/rlhf_reward": float(rollout.scores.mean()) - kl_coef * seq_kl,
        "policy/approxkl_avg": stats["approxkl"],
        "policy/clipfrac_avg": stats["clip"],
        "policy/entropy_avg": stats["ent"],
        "loss/policy_avg": stats["pg"],
        "val/ratio": stats["ratio"],
        "val/response_length": float(mask.sum(1).float().mean()),
        "val/eos_fraction": float(rollout.ended.float().mean()),
    }
    local["objective/scores_std"] = float(rollout.scores.std()) if len(rollout.scores) > 1 else 0.0
    if "vf" in stats:
        local.update({"loss/value_avg": stats["vf"], "val/clipfrac_avg": stats["vclip"]})
    if "klloss" in stats:
        local["loss/kl_avg"] = stats["klloss"]
    if rollout.gold is not None:  # the gold function beside the proxy: their gap is over-optimisation
        local["objective/gold"] = float(rollout.gold.mean())
        local["objective/gold_std"] = float(rollout.gold.std()) if len(rollout.gold) > 1 else 0.0
    if run.scorer.spread is not None:  # an ensemble's disagreement on this step's responses (Coste et al. 2023)
        local["objective/reward_spread"] = float(run.scorer.spread.mean())
    metrics.update({k: _gather_mean(accelerator, v) for k, v in local.items()})
    step_seconds = time.perf_counter() - step_start
    tokens = _gather_mean(accelerator, float(mask.sum())) * run.world
    metrics.update({"objective/kl_coef": kl_coef, "lr": lr, "time/step_seconds": step_seconds,
                    "time/tokens_per_second": tokens / step_seconds,
                    "time/episodes_per_second": run.per_step / step_seconds})
    return metrics


def train_step(run: PPORun, step: int) -> dict:
    """One RL step, phase by phase; returns its metrics (beta is adapted afterwards, by `run`). With the guard on,
    the policy that sampled the step is kept when the guard finds it the best so far."""
    step_start = time.perf_counter()
    config = run.config
    rollout = sample_rollout(run, step)
    orders = minibatch_orders(config, step, len(rollout.indices))
    rollout_forward(run, rollout, valued_later=orders[0][: run.micro_batch_size])
    shape_rewards(config, rollout, score(run, rollout), run.kl_coef)
    if not config.uses_critic:  # gae's advantages wait for the first training forward's values
        rollout.advantages, _ = estimate_advantages(config, rollout, run.kl_coef)
    before = policy_snapshot(run) if run.guard is not None else None
    lr = learning_rate(config, step)
    stats = update(run, rollout, orders, lr)
    metrics = step_metrics(run, rollout, stats, step, lr, step_start)
    if run.guard is not None and run.guard.observe(metrics):
        run.guard.best_state = before
    return metrics


# ---------------------------------------------------------------- checkpoints and the saved policy


def _save_checkpoint(accelerator, out: Path, step: int, kl_coef: float) -> Path:
    """Policy + critic + optimizer + RNG states (accelerate), and our own state: step and the KL controller's beta."""
    path = out / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "trainer_state.json").write_text(json.dumps({"step": step, "kl_coef": kl_coef}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return path


def _resume(run: PPORun, resume_from: Path | None, metrics_file: Path) -> tuple[int, list[dict]]:
    """The step to start from (beta restored into `run`) and the history a resumed run keeps; metrics.jsonl is
    rewritten to hold exactly that history (a fresh run's file starts empty)."""
    start_step, history = 0, []
    if resume_from is not None:
        run.accelerator.load_state(str(resume_from))
        state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        start_step, run.kl_coef = int(state["step"]), float(state["kl_coef"])
    if run.accelerator.is_main_process:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        if metrics_file.is_file():  # keep what a resumed run already logged up to its checkpoint, drop the rest
            old = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            history = [m for m in old if m["step"] <= start_step] if resume_from else []
        metrics_file.write_text("".join(json.dumps(m) + "\n" for m in history))
    return start_step, history


def save_policy(run: PPORun, out: Path) -> None:
    """The policy as a full model directory (a LoRA adapter merged) that the next stage loads by path."""
    from rlhf.models import load, save_model_dir

    accelerator, config = run.accelerator, run.config
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(run.model)  # every process; the whole model on the main one
    final_policy = accelerator.unwrap_model(run.model).policy
    if not accelerator.is_main_process:
        return
    policy_state = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
    if weights_sharded(accelerator):
        # The module holds shards: save the gathered weights, a LoRA adapter merged into them.
        save_model_dir(final_policy, run.tokenizer, out, "left", state_dict=policy_state)
        return
    if config.lora:
        if run.frozen_base:
            # Merged into the base as stored (fp32), not into the compute-dtype copy trained against: the saved
            # weights are the base plus the adapter's update, the base not rounded.
            from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

            adapter = get_peft_model_state_dict(final_policy)
            final_policy = get_peft_model(load(config.model, device="cpu", precision="fp32").model, run.policy_lora)
            set_peft_model_state_dict(final_policy, adapter)
        final_policy = final_policy.merge_and_unload()
        policy_state = final_policy.state_dict()
    final_policy.save_pretrained(out, state_dict=policy_state, safe_serialization=True)
    run.tokenizer.padding_side = "left"
    run.tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- the run


def run(config: PPOConfig, reward_fn: Callable | None = None) -> dict:
    """Train the policy with PPO; `reward_fn(prompts, responses) -> list[float]` overrides config.reward_fn."""
    from accelerate.state import AcceleratorState, GradientState
    from tqdm.auto import tqdm

    from rlhf.models import reuse_freed_memory

    start = time.perf_counter()
    out = Path(config.output_dir)
    resume_from = resume_checkpoint(config.output_dir, config.resume)
    r = prepare(config, reward_fn)
    accelerator = r.accelerator
    metrics_file = out / "metrics.jsonl"
    start_step, history = _resume(r, resume_from, metrics_file)
    kept_history = list(history)
    if config.report_to != "none":
        accelerator.init_trackers("rlhf-ppo", config={k: v for k, v in asdict(config).items()
                                                     if isinstance(v, (int, float, str, bool))})
    # On a CPU the step's large tensors are reused rather than mapped afresh (see reuse_freed_memory).
    with (reuse_freed_memory(r.device.type == "cpu"),
          tqdm(total=config.steps, initial=start_step, desc=METHOD_NAMES[config.estimator],
               disable=not accelerator.is_local_main_process) as bar):
        for step in range(start_step, config.steps):
            metrics = train_step(r, step)
            if config.adaptive_kl:
                r.kl_coef = losses.adaptive_kl_coef(r.kl_coef, metrics["objective/kl"], config.kl_target,
                                                    config.kl_horizon, r.per_step)
            history.append(metrics)
            if accelerator.is_main_process:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if config.report_to != "none" and (step + 1) % config.logging_steps == 0:
                accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step + 1)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}",
                            **({"gold": f"{metrics['objective/gold']:.3f}"} if "objective/gold" in metrics else {}))
            if r.guard is not None and r.guard.stopped:
                break
            if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < config.steps:
                _save_checkpoint(accelerator, out, step + 1, r.kl_coef)

    guard = None
    if r.guard is not None:
        guard = {"stopped": r.guard.stopped or None, "best_step": r.guard.best_step,
                 "kept": "final policy"}
        if r.guard.stopped and r.guard.best_state is not None:
            # The policy that sampled the best step: the parameters it had before that step's update.
            restore_policy(r, r.guard.best_state)
            guard["kept"] = f"the policy that sampled step {r.guard.best_step}"
    save_policy(r, out)
    summary = {
        "method": METHOD_NAMES[config.estimator], "estimator": config.estimator,
        "samples_per_prompt": config.k, "steps": config.steps, "steps_run": len(history) - len(kept_history),
        "resumed_from": str(resume_from) if resume_from else None,
        "first": history[0] if history else {}, "final": history[-1] if history else {},
        "kl_coef": r.kl_coef, "prompts": len(r.prompts), "processes": r.world, "distributed": describe(accelerator),
        "reward": "reward_fn" if r.scorer.fn is not None else config.reward_model,
        "reward_scoring": "token ids" if r.scorer.suffix is not None else "text",
        "seconds": round(time.perf_counter() - start, 1), "config": asdict(config), "device": str(r.device),
        "precision": r.mixed if r.mixed != "no" else "fp32", "critic": config.uses_critic, "guard": guard,
    }
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        first, final = summary["first"], summary["final"]
        gold = (f", gold {first['objective/gold']:.3f} -> {final['objective/gold']:.3f}"
                if "objective/gold" in final else "")
        print(f"{summary['method']}: {len(history)} of {config.steps} steps ({summary['steps_run']} run here) in "
              f"{summary['seconds']:.0f} s on {r.device}; score {first.get('objective/scores', math.nan):.3f} -> "
              f"{final.get('objective/scores', math.nan):.3f}{gold}, KL {final.get('objective/kl', math.nan):.3f}, "
              f"beta {r.kl_coef:.4f} -> {out}")
        if guard and guard["stopped"]:
            print(f"  stopped early: {guard['stopped']}; kept {guard['kept']}")
    if config.report_to != "none":
        accelerator.end_training()
    if r.world == 1:  # let a later run in this process build its own Accelerator
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return {**summary, "history": history, "output_dir": str(out)}
