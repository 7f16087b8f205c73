"""The pieces an RL step is made of, apart from the algorithm: prompts, the policy and critic as one module,
sampling with the sampler's own log-probs, left padding and masks, and scoring responses with a reward model or
a reward function. `rlhf.ppo` puts them together into rollout, scoring, advantages and updates.

Details from "The N Implementation Details of RLHF with PPO" (Huang et al. 2024) that live here: dropout off,
log-probs from logits / temperature, left padding with position ids counted over real tokens, everything after
the first EOS masked out.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf import losses
from rlhf.config import UserError
from rlhf.models import EAGER_ATTENTION_MAX_TOKENS
from rlhf.models import eager_attention as models_eager_attention
from rlhf.reward.model import right_padded

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

    def __init__(self, policy, critic=None, eager_training: bool = False):
        super().__init__()
        # critic None: a critic-free estimator; `train` then returns (logits, None).
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
        models = [_base(self.policy)] + ([_base(self.critic)] if self.critic is not None else [])
        adapted = [self.policy] + ([self.critic] if self.critic is not None else [])
        with eager_attention(models, input_ids, self.eager_training), adapter_casts_off(adapted, input_ids):
            return (policy_logits(self.policy, input_ids, attention_mask, position_ids, width),
                    self.values(input_ids, attention_mask, position_ids, width) if self.critic is not None else None)


@contextlib.contextmanager
def eager_attention(models: list, input_ids: torch.Tensor, enabled: bool):
    """Switch sdpa models to eager attention for a training forward on a CPU under low-precision autocast
    (`rlhf.models.eager_attention` says why)."""
    switch = (enabled and input_ids.device.type == "cpu" and torch.is_autocast_enabled("cpu")
              and input_ids.shape[1] <= EAGER_ATTENTION_MAX_TOKENS)
    with models_eager_attention(models if switch else []):
        yield


@contextlib.contextmanager
def adapter_casts_off(models: list, input_ids: torch.Tensor):
    """Under autocast, stop PEFT casting each LoRA layer's input to the adapter's fp32 (PEFT's own switch).

    Autocast runs lora_A in its low-precision dtype anyway, so PEFT's cast was undone at once: two full-size copies
    of the activations per adapted layer in the forward and two in the backward, for the same values (bf16 -> fp32 ->
    bf16 is exact). Without autocast the cast is what makes the dtypes match, so it stays."""
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # a PEFT without the switch: its casts stay
        yield
        return
    active = torch.is_autocast_enabled(input_ids.device.type)
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(disable_input_dtype_casting(model, active=active))
        yield


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
            critic = load(spec, head="score", device=str(device), precision=precision, num_labels=1).model
        elif rm is not None and hasattr(rm.model, "score") and rm.tokenizer.get_vocab() == tokenizer.get_vocab():
            heads = rm.model.score.weight
            critic = AutoModelForSequenceClassification.from_pretrained(
                rm.paths[0], num_labels=1, dtype=dtype, use_safetensors=True,
                ignore_mismatched_sizes=len(heads) > 1).to(device)
            if len(heads) > 1:  # a reward model with K heads (rlhf.reward.heads): the value starts as their mean
                with torch.no_grad():
                    critic.score.weight.copy_(heads.mean(0, keepdim=True))
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
    # torch's linear on such a view with a frozen weight (the reference) copies the weight for every row.
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


# Sequence widths are rounded up to a multiple of this: oneDNN and PyTorch's CPU bf16 kernels are compiled and
# cached per tensor shape, never evicted, so widths that change every micro-batch grow memory and cost compiles;
# a few extra padded (masked) columns cost less.
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

    def __init__(self, reward_model, reward_fn: Callable | None, policy_tokenizer, normalize: bool,
                 aggregate: str = "mean", std_coef: float = 1.0):
        self.rm, self.fn, self.tokenizer, self.normalize = reward_model, reward_fn, policy_tokenizer, normalize
        self.aggregate, self.std_coef = aggregate, std_coef
        self.spread: torch.Tensor | None = None  # (B,) the ensemble members' std on the last call; None for one model
        self.suffix: list[int] | None = None
        if reward_model is not None:
            self.suffix = self._id_path_suffix()

    def _id_path_suffix(self) -> list[int] | None:
        from rlhf.sample import render_prompt

        rm_tok, tok = self.rm.tokenizer, self.tokenizer
        if rm_tok.get_vocab() != tok.get_vocab() or rm_tok.chat_template != tok.chat_template:
            return None
        marker, probe = "\x00RESPONSE\x00", "Probe prompt."
        turns = [{"role": "user", "content": probe}, {"role": "assistant", "content": marker}]
        full = rm_tok.apply_chat_template(turns, tokenize=False)
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
        """Scores (B,) float32 on the CPU. response_ids: each response's tokens before its EOS. An ensemble's
        members are aggregated by `aggregate` (losses.ensemble_reward) and their spread kept in `self.spread`."""
        if self.fn is not None:
            return torch.tensor([float(s) for s in self.fn(prompts, texts)], dtype=torch.float32)
        if self.suffix is None:
            members = self.rm.score_members(prompts, texts, normalize=self.normalize)  # (K, B)
        else:
            rows = [(p + r + self.suffix)[: self.rm.max_tokens] for p, r in zip(prompt_ids, response_ids)]
            width = min(round_up(max(len(r) for r in rows)), self.rm.max_tokens)
            # Right padding and default positions, as RewardModel.score feeds the model.
            members = self.rm.forward_ids(*right_padded(rows, self.rm.tokenizer.pad_token_id, width))  # (K, B)
            if self.normalize:
                members = self.rm.normalized(members)
        self.spread = members.std(0) if len(members) > 1 else None
        return losses.ensemble_reward(members, self.aggregate, self.std_coef)
