"""PPO with a reward model (Ziegler et al. 2019; Ouyang et al. 2022), the project's own since TRL 1.13 removed its
PPOTrainer. One file, top to bottom: load, then per step sample -> score -> shape rewards -> GAE -> PPO epochs.

Four models: the policy (actor, trained), the critic (value model, trained; initialised from the reward model's
weights, its score head applied to every hidden state), a frozen reference (or, with LoRA, the policy with its
adapter switched off) and a frozen reward model (or a Python `reward_fn` such as a gold oracle). Per step:
  1. sample a response per prompt at `temperature` (left padding, KV cache); log pi(y_t) is taken from the same
     logits the sampler used, divided by the temperature, and everything after the first EOS is masked out;
  2. score: the reward model's score of the chat-formatted prompt + response (normalised with the statistics the
     reward stage saved), minus `missing_eos_penalty` for responses that never ended, optionally clipped;
  3. per-token reward -beta * KL_t, plus the score at the last response token (beta fixed or adaptive);
  4. GAE (gamma 1, lambda 0.95), whitened advantages;
  5. `ppo_epochs` passes over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss, with
     gradient accumulation and clipping.
The math lives in `rlhf/losses.py` as pure functions. The implementation details of "The N Implementation
Details of RLHF with PPO" (Huang et al. 2024) all apply: dropout off, logits / temperature, left padding with
position ids from the attention mask, reward normalisation, advantage whitening, the EOS penalty, value
clipping, minibatches reshuffled every epoch.

Where this departs from the papers and from TRL 1.12's PPOTrainer: the score sits on the last response token (the
EOS when there is one), not on the token after it; logits are computed only for response positions (the prompt's
vocabulary projection is never needed); the reward model is fed token ids directly when it shares the policy's
tokenizer and chat template (same formatting as `RewardModel.score`, without a decode/re-encode round trip); the
first training micro-batch's critic forward (on the rollout's weights) gives its rows' rollout values, so the
rollout's critic pass covers only the other rows. For speed on a CPU: training forwards under bf16 autocast use
eager attention (torch's CPU flash-attention backward is slow in bf16), sequence widths are rounded up to multiples
of 8 (CPU kernels are compiled and cached per shape), AdamW is the fused one, and glibc keeps freed memory for
the next micro-batch's tensors (`rlhf.models.reuse_freed_memory`). With LoRA the frozen base is held in the compute
precision.

Runs under accelerate (`accelerate launch --config_file configs/accelerate/ddp.yaml -m rlhf.cli ppo ...`):
one CPU, one GPU, DDP; configs for DeepSpeed ZeRO-2 and FSDP are in configs/accelerate/.

    rlhf ppo --config configs/ppo.yaml --reward_model runs/reward --steps 20 --batch_size 8 --max_new_tokens 32
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from rlhf import losses
from rlhf.config import UserError, field, resume_checkpoint
from rlhf.models import DEFAULT_MODEL


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
    # Reward
    normalize_reward: bool = field(True, "Normalise reward-model scores with the mean/std the reward stage saved.")
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
    # Optimization
    steps: int = field(100, "PPO steps (each: one rollout batch, then ppo_epochs of updates).")
    batch_size: int = field(16, "Prompts (rollouts) per step per process.")
    mini_batch_size: int = field(8, "Rollouts per optimizer update per process.")
    gradient_accumulation_steps: int = field(1, "Micro-batches per minibatch (micro-batch = mini_batch_size / this).")
    ppo_epochs: int = field(4, "Passes over each rollout batch, reshuffled every pass.")
    learning_rate: float = field(3e-6, "AdamW learning rate (policy and critic).")
    lr_schedule: Literal["linear", "constant"] = field("linear", "Learning rate over the steps: linear decay to 0 "
                                                       "(as the papers do) or constant.")
    max_grad_norm: float = field(1.0, "Clip the gradient norm to this (0: off).")
    gamma: float = field(1.0, "Discount factor.")
    lam: float = field(0.95, "GAE lambda.")
    cliprange: float = field(0.2, "PPO ratio clip epsilon.")
    cliprange_value: float = field(0.2, "Value clip: new values stay within this of the rollout's values.")
    vf_coef: float = field(0.1, "Weight of the value loss.")
    whiten_advantages: bool = field(True, "Whiten advantages over each rollout batch.")
    seed: int = field(0, "Random seed (prompt order, sampling, minibatch shuffles).")
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
        if self.save_steps < 0 or self.logging_steps < 1 or (self.lora and min(self.lora_r, self.lora_alpha) < 1):
            raise ValueError("save_steps must be >= 0, logging_steps >= 1, lora_r and lora_alpha >= 1")


# ---------------------------------------------------------------- prompts


def _has_chosen_column(path: Path) -> bool:
    """Whether a data file holds preference rows (so its prompts repeat) rather than one prompt per row."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        return "chosen" in json.loads(first)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return "chosen" in next(csv.reader(f), [])
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return "chosen" in pq.read_schema(path).names
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        return bool(rows) and isinstance(rows[0], dict) and "chosen" in rows[0]
    return False


def load_prompts(spec: str, split: str = "train") -> list:
    """Prompts (plain text, or chat messages) from a prompts source or from preference data's prompt column."""
    from rlhf.data import SHIPPED_PROMPTS, load_preference_dataset, read_prompts

    path = Path(spec).expanduser()
    if spec in SHIPPED_PROMPTS or (path.is_file() and not _has_chosen_column(path)):
        return read_prompts(spec, split=split)
    data = load_preference_dataset(spec)
    rows = data[split] if split in data else data["train"]
    seen: dict[str, object] = {}
    for p in rows["prompt"]:
        seen.setdefault(json.dumps(p, sort_keys=True), p[0]["content"] if len(p) == 1 and p[0]["role"] == "user" else p)
    if not seen:
        raise UserError(f"{spec}: no prompts")
    return list(seen.values())


# ---------------------------------------------------------------- models


class PolicyAndCritic(torch.nn.Module):
    """Policy and critic as one module, so accelerate prepares one model and one optimizer under DDP, DeepSpeed
    and FSDP alike. Every use goes through forward (`mode`), so a wrapper's hooks (FSDP gathering sharded
    weights, DeepSpeed, autocast) run for sampling and the rollout's forward passes too:
      train      (logits predicting the last `width` tokens (B, width, V), values of the states before them (B, width))
      values     the values alone
      reference  the policy's logits with its LoRA adapter switched off: the reference model, for free
      generate   `policy.generate(**generate_kwargs)`"""

    def __init__(self, policy, critic, eager_training: bool = False):
        super().__init__()
        self.policy, self.critic = policy, critic
        # Off under gradient checkpointing, whose backward recomputes the forward outside the switch.
        self.eager_training = eager_training

    def values(self, input_ids, attention_mask, position_ids, width: int) -> torch.Tensor:
        # A LoRA critic's adapters sit inside the base model's layers, so calling the base model uses them.
        base = _base(self.critic)
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state  # (B, L, H)
        return base.score(hidden[:, -width - 1 : -1]).squeeze(-1).float()  # (B, width)

    def forward(self, input_ids, attention_mask, position_ids=None, width: int = 0, mode: str = "train",
                **generate_kwargs):
        if mode == "generate":
            return self.policy.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        if mode == "reference":
            with self.policy.disable_adapter():
                return policy_logits(self.policy, input_ids, attention_mask, position_ids, width)
        if mode == "values":
            return self.values(input_ids, attention_mask, position_ids, width)
        with eager_attention([_base(self.policy), _base(self.critic)], input_ids, self.eager_training):
            return (policy_logits(self.policy, input_ids, attention_mask, position_ids, width),
                    self.values(input_ids, attention_mask, position_ids, width))


# PyTorch's CPU flash attention (sdpa) is slow to train through in bf16 (torch 2.13, AVX512-BF16): per layer its
# backward took 3-8x the plain kernels' time on sequences under ~200 tokens. With transformers' eager attention,
# SmolLM2-135M's forward + backward on 4 x 72 tokens took 1.49 s instead of 1.83 s (the tiny test model's
# micro-batch 22 ms instead of 40), and eager still led at 400 tokens. Sampling stays on sdpa (6% faster there).
# Eager keeps each layer's (B, heads, L, L) probabilities for the backward, so only sequences up to this length
# switch.
EAGER_ATTENTION_MAX_TOKENS = 256


@contextlib.contextmanager
def eager_attention(models: list, input_ids: torch.Tensor, enabled: bool):
    """Switch sdpa models to eager attention for a training forward on a CPU under low-precision autocast."""
    switch = []
    if (enabled and input_ids.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and input_ids.shape[1] <= EAGER_ATTENTION_MAX_TOKENS):
        switch = [m for m in models if getattr(m.config, "_attn_implementation", None) == "sdpa"
                  and getattr(m, "_can_set_attn_implementation", lambda: False)()]
    for m in switch:
        m.set_attn_implementation("eager")
    try:
        yield
    finally:
        for m in switch:
            m.set_attn_implementation("sdpa")


def _base(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def build_critic(spec: str, rm, policy_path: str, tokenizer, device, precision: str = "fp32") -> torch.nn.Module:
    """The value model, in `precision` (fp32 when all its weights train): `spec` if given; else a copy of the reward
    model when it is a decoder on the policy's tokenizer (its score head applied at every position values each
    prefix; an encoder would see the future, so it cannot be a critic); else the policy's backbone with a zero value
    head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from rlhf.models import load, pick_dtype

    dtype = pick_dtype(device, precision)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" report is expected
    try:
        if spec:
            critic = load(spec, head="score", device=str(device), precision=precision).model
        elif rm is not None and hasattr(rm.model, "score") and rm.tokenizer.get_vocab() == tokenizer.get_vocab():
            critic = AutoModelForSequenceClassification.from_pretrained(rm.path, num_labels=1, dtype=dtype,
                                                                        use_safetensors=True).to(device)
        else:
            critic = AutoModelForSequenceClassification.from_pretrained(policy_path, num_labels=1, dtype=dtype,
                                                                        use_safetensors=True).to(device)
            torch.nn.init.zeros_(critic.score.weight)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not hasattr(critic, "score"):
        raise UserError("the critic must be a decoder sequence-classification model with a `score` head")
    critic.config.pad_token_id = tokenizer.pad_token_id
    return critic


def policy_logits(model, input_ids, attention_mask, position_ids, width: int) -> torch.Tensor:
    """Logits predicting the last `width` tokens: (B, width, V). Only those positions go through the vocabulary
    projection (logits_to_keep), which saves its cost on every prompt token."""
    # Positions as an index tensor, not a count: a count slices the hidden states into a non-contiguous view, and
    # torch's linear on such a view with a weight that does not require grad (the frozen reference) copies the
    # weight for every row: SmolLM2's 49k-token head took 0.96 s instead of 0.06 s on 8 x 25 positions.
    keep = torch.arange(input_ids.shape[1] - width - 1, input_ids.shape[1], device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep,
                use_cache=False)
    return out.logits[:, :-1]


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (PPO's ratio must compare the same function): nn.Dropout and the attention-dropout
    rates some architectures keep as plain floats."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens only, so a left-padded row sees the positions an unpadded one does."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


# Sequence widths are rounded up to a multiple of this. oneDNN and PyTorch's CPU bf16 kernels are compiled and
# cached per tensor shape, never evicted: with widths that changed every micro-batch the tiny model's resident
# memory grew ~30 MB a step (625 MB after 10 steps; 456 MB with multiples of 8), and every new shape costs a
# compile. A few extra padded (masked) columns cost less.
SHAPE_MULTIPLE = 8


def round_up(n: int, multiple: int = SHAPE_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def left_pad(rows: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = round_up(max(len(r) for r in rows), multiple)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, Q)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, Q)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def response_mask(responses: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on each response's tokens through its first EOS, 0 after; and whether each response produced an EOS.
    (A row without EOS ran to the length limit, so all its tokens are real; rows that stopped early were padded.)"""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device)).long()  # (B, R)
    # Strictly after the first EOS: an EOS was seen before this position.
    after = (is_eos.cumsum(1) - is_eos) > 0
    return (~after).long(), is_eos.bool().any(1)


class SampledLogprobs:
    """A logits processor that records log pi(y_t) at the sampling temperature while `generate` runs, so the
    rollout needs no extra policy forward pass. It must see raw logits: `generate` applies the processors given
    to it before its temperature/top-k/top-p warpers, and PPO samples with no other processor (tested)."""

    def __init__(self, temperature: float):
        self.temperature, self.pending, self.steps = temperature, None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:  # the token sampled from the previous step's distribution is now known
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B, V), one step only
        return scores

    def result(self, responses: torch.Tensor) -> torch.Tensor:
        self.steps.append(self.pending.gather(1, responses[:, -1:]).squeeze(1))
        self.pending = None
        return torch.stack(self.steps, 1)  # (B, R)


# ---------------------------------------------------------------- rewards


class RewardScorer:
    """Scores (prompt, response) pairs with a reward model or a reward function.

    When the reward model shares the policy's tokenizer and chat template, it is fed token ids: the prompt as the
    policy saw it, the response's tokens before its EOS, then the template's end-of-turn suffix; exactly what
    `RewardModel.score` builds from the text, without decoding and re-encoding (a probe checks the formatting at
    start-up; otherwise scoring goes through the text)."""

    def __init__(self, reward_model, reward_fn: Callable | None, policy_tokenizer, normalize: bool):
        self.rm, self.fn, self.tokenizer, self.normalize = reward_model, reward_fn, policy_tokenizer, normalize
        self.suffix: list[int] | None = None
        if reward_model is not None:
            self.suffix = self._id_path_suffix()

    def _id_path_suffix(self) -> list[int] | None:
        from rlhf.sample import render_prompt

        rm_tok, tok = self.rm.tokenizer, self.tokenizer
        if rm_tok.get_vocab() != tok.get_vocab() or rm_tok.chat_template != tok.chat_template:
            return None
        marker, probe = "\x00RESPONSE\x00", "Probe prompt."
        full = rm_tok.apply_chat_template([{"role": "user", "content": probe}, {"role": "assistant", "content": marker}],
                                          tokenize=False)
        prefix = render_prompt(tok, probe)
        if not full.startswith(prefix) or marker not in full[len(prefix):]:
            return None
        suffix = tok(full.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
        text = "Hello there, a short answer."
        built = (tok(prefix, add_special_tokens=False)["input_ids"] + tok(text, add_special_tokens=False)["input_ids"]
                 + suffix)
        return suffix if built == self.rm.encode(probe, text) else None

    @torch.no_grad()
    def __call__(self, prompts: list, prompt_ids: list[list[int]], response_ids: list[list[int]],
                 texts: list[str]) -> torch.Tensor:
        """Scores (B,) float32 on the CPU. response_ids: each response's tokens before its EOS."""
        if self.fn is not None:
            return torch.tensor([float(s) for s in self.fn(prompts, texts)], dtype=torch.float32)
        if self.suffix is None:
            return self.rm.score(prompts, texts, normalize=self.normalize)
        rows = [(p + r + self.suffix)[: self.rm.max_tokens] for p, r in zip(prompt_ids, response_ids)]
        width = min(round_up(max(len(r) for r in rows)), self.rm.max_tokens)
        pad = self.rm.tokenizer.pad_token_id
        # Right padding and default positions, as RewardModel.score feeds the model.
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)], attention_mask[i, : len(r)] = torch.tensor(r), 1
        device = next(self.rm.model.parameters()).device
        scores = self.rm.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[:, 0]
        scores = scores.float().cpu()
        return (scores - self.rm.mean) / max(self.rm.std, 1e-8) if self.normalize else scores


# ---------------------------------------------------------------- checkpoints



def _save_checkpoint(accelerator, out: Path, step: int, kl_coef: float) -> Path:
    """Policy + critic + optimizer + RNG states (accelerate), and our own state: step and the KL controller's beta."""
    path = out / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "trainer_state.json").write_text(json.dumps({"step": step, "kl_coef": kl_coef}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return path


# ---------------------------------------------------------------- training


def _gather_mean(accelerator, value) -> float:
    tensor = torch.as_tensor(value, dtype=torch.float32, device=accelerator.device).reshape(1)
    return float(accelerator.gather(tensor).mean())


def run(config: PPOConfig, reward_fn: Callable | None = None) -> dict:
    """Train the policy with PPO; `reward_fn(prompts, responses) -> list[float]` overrides config.reward_fn."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    from rlhf.models import load, pick_device, pick_dtype, reuse_freed_memory
    from rlhf.sample import render_prompt

    start = time.perf_counter()
    device = pick_device(config.device)
    dtype = pick_dtype(device, config.precision)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    out = Path(config.output_dir)
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # A trainer that ran earlier in this process (the loop's DPO, a test) left its precision in the shared
        # state, and accelerate refuses to change it; one process has nothing to keep in sync, so start afresh.
        AcceleratorState._reset_state()
        GradientState._reset_state()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              log_with=None if config.report_to == "none" else config.report_to, project_dir=str(out))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    resume_from = resume_checkpoint(config.output_dir, config.resume)

    # Models. Trained weights in fp32 (autocast does the low-precision math); frozen ones directly in `dtype`.
    if reward_fn is None and config.reward_fn:
        from rlhf.annotators import load_gold

        reward_fn = load_gold(config.reward_fn)
    if reward_fn is None and not config.reward_model:
        raise UserError("no reward: give reward_model or reward_fn")
    # With LoRA the base weights are frozen, so they are held in the compute dtype and only the adapters (and the
    # critic's value head) in fp32. Autocast caches its casts of trained weights only: fp32 frozen weights were cast
    # again at every decoding step (SmolLM2, 8 x 24 tokens: sampling 3.3 s instead of 1.9 s). FSDP flattens a
    # module's weights into one tensor of one dtype, so under FSDP they stay fp32.
    frozen_base = config.lora and accelerator.distributed_type != DistributedType.FSDP
    base_precision = config.precision if frozen_base else "fp32"
    policy_loaded = load(config.model, device=str(device), precision=base_precision)
    policy, tokenizer = policy_loaded.model, policy_loaded.tokenizer
    rm = None
    if config.reward_model and reward_fn is None:
        from rlhf.reward import RewardModel

        rm = RewardModel.load(config.reward_model, device=str(device), precision=config.precision)
        rm.model.eval().requires_grad_(False)
    critic = build_critic(config.critic_model, rm, policy_loaded.path, tokenizer, device, base_precision)
    ref = None
    if config.ref_model or not config.lora:
        ref = load(config.ref_model or config.model, device=str(device), precision=config.precision).model
        ref.eval().requires_grad_(False)
        disable_dropout(ref)
    for m in (policy, critic):
        disable_dropout(m)
        if config.gradient_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen_eos = policy.generation_config.eos_token_id
    eos_ids = sorted({tokenizer.eos_token_id} | set([gen_eos] if isinstance(gen_eos, int) else gen_eos or []))
    if config.lora:
        from peft import LoraConfig, get_peft_model

        policy_lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        policy = get_peft_model(policy, policy_lora)
        critic = get_peft_model(critic, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                   target_modules="all-linear", task_type="SEQ_CLS",
                                                   modules_to_save=["score"]))
        for p in [*policy.parameters(), *critic.parameters()]:
            if p.requires_grad:  # trained weights in fp32 (the optimizer's updates would vanish in bf16)
                p.data = p.data.float()
    scorer = RewardScorer(rm, reward_fn, tokenizer, config.normalize_reward)

    model = PolicyAndCritic(policy, critic, eager_training=not config.gradient_checkpointing)
    # The fused AdamW (one kernel over all parameters, as transformers' Trainer defaults to) is faster than the
    # for-each one and allocates no parameter-sized temporaries.
    fused = device.type in ("cpu", "cuda") and accelerator.state.deepspeed_plugin is None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  fused=fused or None)
    micro_batch_size = config.mini_batch_size // config.gradient_accumulation_steps
    if accelerator.state.deepspeed_plugin is not None:
        # No dataloader is prepared, so DeepSpeed must be told the batch geometry and clipping itself.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=micro_batch_size,
                  gradient_accumulation_steps=config.gradient_accumulation_steps,
                  gradient_clipping=config.max_grad_norm or 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)

    # Prompts, rendered through the policy's chat template and tokenized once.
    prompts = load_prompts(config.prompts, config.prompt_split)
    encoded = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= config.max_prompt_length]
    if not keep:
        raise UserError(f"every prompt is longer than max_prompt_length={config.max_prompt_length} tokens")
    prompts, encoded = [prompts[i] for i in keep], [encoded[i] for i in keep]
    per_step = config.batch_size * world

    @functools.lru_cache(maxsize=2)
    def prompt_order(epoch: int) -> list[int]:
        order = list(range(len(prompts)))
        random.Random(config.seed * 7919 + epoch).shuffle(order)
        return order

    def prompt_indices(step: int) -> list[int]:
        """This process's prompts for `step`: a fresh shuffle per pass over the prompts, a function of the seed
        and step alone so that a resumed run sees the same prompts."""
        first = step * per_step + rank * config.batch_size
        return [prompt_order(k // len(prompts))[k % len(prompts)] for k in range(first, first + config.batch_size)]

    kl_coef, start_step = config.kl_coef, 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        start_step, kl_coef = int(state["step"]), float(state["kl_coef"])
    history: list[dict] = []
    metrics_file = out / "metrics.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if metrics_file.is_file():  # keep what a resumed run already logged up to its checkpoint, drop the rest
            old = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            history = [m for m in old if m["step"] <= start_step] if resume_from else []
        metrics_file.write_text("".join(json.dumps(m) + "\n" for m in history))
    if config.report_to != "none":
        accelerator.init_trackers("rlhf-ppo", config={k: v for k, v in asdict(config).items()
                                                     if isinstance(v, (int, float, str, bool))})
    # With sharded weights every process must run the same number of decoding steps (each step gathers them).
    sharded = accelerator.distributed_type == DistributedType.FSDP
    T = config.temperature
    # On a CPU the step's large tensors are reused rather than mapped afresh (see reuse_freed_memory).
    with (reuse_freed_memory(device.type == "cpu"),
          tqdm(total=config.steps, initial=start_step, desc="PPO",
               disable=not accelerator.is_local_main_process) as bar):
        for step in range(start_step, config.steps):
            step_start = time.perf_counter()
            # Seeded by step (and process), so an interrupted run resumed from a checkpoint samples the same.
            torch.manual_seed(config.seed * 1_000_003 + step * 997 + rank)
            batch = prompt_indices(step)
            batch_prompts = [prompts[i] for i in batch]
            prompt_ids, prompt_mask = left_pad([encoded[i] for i in batch], tokenizer.pad_token_id, SHAPE_MULTIPLE)
            prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
            Q = prompt_ids.shape[1]

            # 1. Sample, recording log pi at the sampling temperature.
            model.eval()
            recorder = SampledLogprobs(T)
            with torch.no_grad():
                sequences = model(
                    prompt_ids, prompt_mask, mode="generate", max_new_tokens=config.max_new_tokens, do_sample=True,
                    temperature=T, top_k=0, top_p=1.0, repetition_penalty=1.0,
                    eos_token_id=eos_ids if config.stop_at_eos else None, pad_token_id=tokenizer.pad_token_id,
                    logits_processor=LogitsProcessorList([recorder]), synced_gpus=sharded)
            responses = sequences[:, Q:]  # (B, R)
            logprobs = recorder.result(responses)  # (B, R)
            mask, ended = response_mask(responses, eos_ids)  # (B, R), (B,)
            # When every response stopped early, pad the columns up to a bucketed width too (masked out).
            extra = min(config.max_new_tokens, round_up(responses.shape[1])) - responses.shape[1]
            if extra > 0:
                pad = functools.partial(torch.nn.functional.pad, pad=(0, extra))
                responses, logprobs, mask = pad(responses), pad(logprobs), pad(mask)
            responses = responses.masked_fill(mask == 0, tokenizer.pad_token_id)
            R = responses.shape[1]
            input_ids = torch.cat([prompt_ids, responses], 1)  # (B, Q + R)
            attention_mask = torch.cat([prompt_mask, mask], 1)
            position_ids = positions(attention_mask)

            # 2. Reference log-probs, values and scores. The first training micro-batch (step 5) runs the critic on
            # the rollout's weights, so its rows' values come from that forward and only the other rows' from here.
            shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            orders = [torch.randperm(len(batch), generator=shuffle) for _ in range(config.ppo_epochs)]
            valued_here = torch.ones(len(batch), dtype=torch.bool)
            valued_here[orders[0][:micro_batch_size]] = False
            chunk = config.mini_batch_size
            ref_logprobs, values = torch.empty_like(logprobs), torch.zeros_like(logprobs)
            with torch.no_grad():
                for i in range(0, len(batch), chunk):
                    s = slice(i, i + chunk)
                    args = (input_ids[s], attention_mask[s], position_ids[s], R)
                    if ref is None:
                        ref_logits = model(*args, mode="reference")
                    else:
                        with accelerator.autocast():
                            ref_logits = policy_logits(ref, *args)
                    ref_logprobs[s] = losses.logprobs_from_logits(ref_logits.float() / T, responses[s])
                    del ref_logits
                    rows = torch.arange(len(batch))[s][valued_here[s]].to(device)
                    if len(rows):  # the same rows on every process (the order is not per process)
                        values[rows] = model(input_ids[rows], attention_mask[rows], position_ids[rows], R,
                                             mode="values")
            lengths = mask.sum(1).tolist()
            response_ids = [responses[i, : lengths[i] - int(ended[i])].tolist() for i in range(len(batch))]
            # The text as the store holds generated responses (rlhf.sample.generate_batch): specials dropped, stripped.
            texts = [t.strip() for t in tokenizer.batch_decode(response_ids, skip_special_tokens=True)]
            scores = scorer(batch_prompts, [encoded[i] for i in batch], response_ids, texts).to(device)  # (B,)

            # 3. Rewards: score (+ EOS penalty, clipping) at the last token, -beta * KL on every token.
            if config.missing_eos_penalty:
                scores = scores - config.missing_eos_penalty * (~ended).float()
            if config.reward_clip:
                scores = scores.clamp(-config.reward_clip, config.reward_clip)
            kl = losses.kl_estimate(logprobs, ref_logprobs, config.kl_estimator) * mask  # (B, R)
            rewards = losses.shaped_rewards(scores, kl, mask, kl_coef)
            if config.whiten_rewards:
                rewards = losses.whiten(rewards, mask, shift_mean=False)
            # 4. GAE and whitened advantages: once every value is known, after the first micro-batch's forward.
            advantages = returns = None

            # 5. PPO epochs over reshuffled minibatches of micro-batches.
            lr = config.learning_rate * (1 - step / config.steps if config.lr_schedule == "linear" else 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clip", "vclip", "approxkl", "ratio", "ent")}
            for order in orders:
                for mb in range(0, len(batch), config.mini_batch_size):
                    for mi in range(mb, mb + config.mini_batch_size, micro_batch_size):
                        idx = order[mi : mi + micro_batch_size].to(device)
                        # Trim columns every row of this micro-batch pads (left of the prompts, right of the
                        # responses), keeping widths multiples of SHAPE_MULTIPLE.
                        width = min(R, round_up(int(mask[idx].sum(1).max().clamp(min=1))))
                        used = Q + width - int(prompt_mask[idx].any(0).long().argmax())
                        cols = slice(Q + width - min(Q + width, round_up(used)), Q + width)
                        with accelerator.accumulate(model):
                            logits, new_values = model(input_ids[idx, cols], attention_mask[idx, cols],
                                                       position_ids[idx, cols], width)
                            if advantages is None:  # step 4, with the rollout values this forward completes
                                values[idx, :width] = new_values.detach()
                                advantages, returns = losses.gae(rewards, values, mask, config.gamma, config.lam)
                                if config.whiten_advantages:
                                    advantages = losses.whiten(advantages, mask)
                            logits = logits.float() / T
                            new_logprobs = losses.logprobs_from_logits(logits, responses[idx, :width])
                            m = mask[idx, :width]
                            pg_loss, pg = losses.policy_loss(new_logprobs, logprobs[idx, :width],
                                                             advantages[idx, :width], m, config.cliprange)
                            vf_loss, vf = losses.value_loss(new_values, values[idx, :width],
                                                            returns[idx, :width], m, config.cliprange_value)
                            accelerator.backward(pg_loss + config.vf_coef * vf_loss)
                            if accelerator.sync_gradients and config.max_grad_norm:
                                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                            optimizer.step()
                            optimizer.zero_grad()
                        with torch.no_grad():
                            entropy = losses.masked_mean(losses.entropy_from_logits(logits), m)
                        for key, value in (("pg", pg_loss), ("vf", vf_loss), ("clip", pg["clipfrac"]),
                                           ("vclip", vf["clipfrac"]), ("approxkl", pg["approxkl"]),
                                           ("ratio", pg["ratio"]), ("ent", entropy)):
                            stats[key].append(float(value.detach()))
                        del logits, new_values, new_logprobs, pg_loss, vf_loss

            # 6. Metrics (means over processes), the KL controller, logging, checkpoints.
            seq_kl = float(kl.sum(1).mean())
            metrics = {"step": step + 1, "episode": (step + 1) * per_step}
            local = {
                "objective/kl": seq_kl,
                "objective/entropy": float((-logprobs * mask).sum(1).mean()),
                "objective/non_score_reward": float((-kl_coef * kl).sum(1).mean()),
                "objective/scores": float(scores.mean()),
                "objective/rlhf_reward": float(scores.mean()) - kl_coef * seq_kl,
                "policy/approxkl_avg": sum(stats["approxkl"]) / len(stats["approxkl"]),
                "policy/clipfrac_avg": sum(stats["clip"]) / len(stats["clip"]),
                "policy/entropy_avg": sum(stats["ent"]) / len(stats["ent"]),
                "loss/policy_avg": sum(stats["pg"]) / len(stats["pg"]),
                "loss/value_avg": sum(stats["vf"]) / len(stats["vf"]),
                "val/clipfrac_avg": sum(stats["vclip"]) / len(stats["vclip"]),
                "val/ratio": sum(stats["ratio"]) / len(stats["ratio"]),
                "val/response_length": float(mask.sum(1).float().mean()),
                "val/eos_fraction": float(ended.float().mean()),
            }
            metrics.update({k: _gather_mean(accelerator, v) for k, v in local.items()})
            step_seconds = time.perf_counter() - step_start
            tokens = _gather_mean(accelerator, float(mask.sum())) * world
            metrics.update({"objective/kl_coef": kl_coef, "lr": lr, "time/step_seconds": step_seconds,
                            "time/tokens_per_second": tokens / step_seconds,
                            "time/episodes_per_second": per_step / step_seconds})
            if config.adaptive_kl:
                kl_coef = losses.adaptive_kl_coef(kl_coef, metrics["objective/kl"], config.kl_target,
                                                  config.kl_horizon, per_step)
            history.append(metrics)
            if accelerator.is_main_process:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if config.report_to != "none" and (step + 1) % config.logging_steps == 0:
                accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step + 1)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < config.steps:
                _save_checkpoint(accelerator, out, step + 1, kl_coef)

    # The policy as a full model directory (a LoRA adapter merged) that the next stage loads by path.
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    final_policy = accelerator.unwrap_model(model).policy
    if accelerator.is_main_process:
        policy_state = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
        if config.lora:
            if frozen_base:
                # Merged into the base as stored (fp32), not into the compute-dtype copy trained against: the saved
                # weights are the base plus the adapter's update, the base not rounded.
                from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

                adapter = get_peft_model_state_dict(final_policy)
                final_policy = get_peft_model(load(config.model, device="cpu", precision="fp32").model, policy_lora)
                set_peft_model_state_dict(final_policy, adapter)
            final_policy = final_policy.merge_and_unload()
            policy_state = final_policy.state_dict()
        final_policy.save_pretrained(out, state_dict=policy_state, safe_serialization=True)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(out)
    summary = {
        "steps": config.steps, "steps_run": config.steps - start_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "first": history[0] if history else {}, "final": history[-1] if history else {},
        "kl_coef": kl_coef, "prompts": len(prompts), "processes": world,
        "reward": "reward_fn" if reward_fn is not None else config.reward_model,
        "reward_scoring": "token ids" if scorer.suffix is not None else "text",
        "seconds": round(time.perf_counter() - start, 1), "config": asdict(config), "device": str(device),
        "precision": mixed if mixed != "no" else "fp32",
    }
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        first, final = summary["first"], summary["final"]
        print(f"PPO: {config.steps} steps ({summary['steps_run']} run here) in {summary['seconds']:.0f} s on {device}; "
              f"score {first.get('objective/scores', math.nan):.3f} -> {final.get('objective/scores', math.nan):.3f}, "
              f"KL {final.get('objective/kl', math.nan):.3f}, beta {kl_coef:.4f} -> {out}")
    if config.report_to != "none":
        accelerator.end_training()
    if world == 1:  # let a later run in this process build its own Accelerator
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return {**summary, "history": history, "output_dir": str(out)}
