"""A trained reward model (or an ensemble of them) scoring (prompt, response) pairs exactly as training saw them.

Scoring formats text as TRL's RewardTrainer does: the chat template over prompt + response, no EOS added (TRL adds
one only to non-conversational data, and our data is always conversational), right padding, no truncation (TRL
drops over-long pairs instead; scoring keeps the first tokens only past the model's position limit).

An ensemble (`rlhf reward --ensemble K`) is a directory with `ensemble.json` naming K member directories, each a
reward model trained from the same backbone with its own seed. `score()` is the members' mean and
`score_members()` each member's score; their spread is the ensemble's uncertainty (Coste et al. 2023, "Reward
Model Ensembles Help Mitigate Overoptimization"; Lakshminarayanan et al. 2017 for seed ensembles).
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch

from rlhf.config import UserError

ENSEMBLE_FILE = "ensemble.json"

# Encoders ship no chat template: a turn is "role: content" between BERT's [CLS]/[SEP] markers, so the pooled
# [CLS] token sees the whole exchange. A causal LM without one gets one turn per line (no EOS at the end: its pad
# token is often the EOS, and the score is read at the last non-pad token).
ENCODER_CHAT_TEMPLATE = (
    "{{ cls_token }}{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}{{ sep_token }}"
    "{% endfor %}"
)
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
)


def _messages(prompt: str | list[dict], response: str) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages + [{"role": "assistant", "content": response}]


def right_padded(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows as (input_ids, attention_mask), each (B, width), padded on the right as TRL's collator pads
    (with left padding a causal LM would see shifted positions); width defaults to the longest row."""
    width = width or max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)], attention_mask[i, : len(r)] = torch.tensor(r, dtype=torch.long), 1
    return input_ids, attention_mask


def _load_member(path: Path, device: str, precision: str):
    """(model, tokenizer, path, means, stds) of one reward model directory: a mean and std per head."""
    from rlhf.models import load

    config_file = path / "config.json"
    if config_file.is_file():
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise UserError(f"{path} is not a reward model (architectures {architectures}); train one with "
                            "`rlhf reward`")
    loaded = load(str(path), head="score", device=device, precision=precision, padding_side="right")
    heads = loaded.model.config.num_labels
    means, stds = [0.0] * heads, [1.0] * heads
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        norm = json.loads(metrics_file.read_text()).get("normalization") or {}
        per_head = norm.get("heads") or {"mean": [norm.get("mean", 0.0)], "std": [norm.get("std", 1.0)]}
        if len(per_head["mean"]) == heads:
            means, stds = [float(m) for m in per_head["mean"]], [float(v) for v in per_head["std"]]
            return loaded.model, loaded.tokenizer, loaded.path, means, stds
    if heads > 1:
        # A classifier's outputs are labels (e.g. negative, positive), not reward members: averaging them is no
        # reward. Only `rlhf reward --ensemble K --ensemble_kind heads` records K heads as members.
        raise UserError(f"{path} has {heads} outputs and no record of them as reward heads (metrics.json's "
                        "normalization.heads, written by `rlhf reward --ensemble_kind heads`): a classifier's "
                        "labels are not an ensemble; wrap the label you want in a --reward_fn, or train a "
                        "reward model with `rlhf reward`")
    return loaded.model, loaded.tokenizer, loaded.path, means, stds


def _per_head(value: float | list[float], model) -> list[float]:
    """A member's statistic per output of `model`: a list as given, or one value repeated for every head."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)] * int(getattr(model.config, "num_labels", 1) or 1)


class RewardModel:
    """One reward model, or an ensemble of members sharing a tokenizer; `model` is the first model (a critic is
    initialised from it). Each output of a model is a member: one for a plain reward model, K for one trained with
    K heads (rlhf.reward.heads), each normalised by its own mean and std."""

    def __init__(self, model, tokenizer, path: str = "", mean: float | list[float] = 0.0,
                 std: float | list[float] = 1.0):
        self.models = [model]
        self.means, self.stds = _per_head(mean, model), _per_head(std, model)  # one entry per member
        self.tokenizer, self.path = tokenizer, path
        self.paths = [path]  # each member's own directory (an ensemble's `path` is the one holding them)
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{path or 'this reward model'}: its tokenizer has no chat template (train it with "
                            "`rlhf reward`, which gives encoders one)")
        # Past the model's position limit a sequence must be cut: keep its first tokens (the [CLS] an encoder pools).
        limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self.max_tokens = min(n for n in limits + [10**9] if isinstance(n, int) and n > 0)
        self._warned = False

    @property
    def model(self):
        return self.models[0]

    @property
    def mean(self) -> float:
        """The normalisation mean of a single reward model (an ensemble has one per member: `means`)."""
        return self.means[self._single("mean")]

    @mean.setter
    def mean(self, value: float) -> None:
        self.means[self._single("mean")] = float(value)

    @property
    def std(self) -> float:
        return self.stds[self._single("std")]

    @std.setter
    def std(self, value: float) -> None:
        self.stds[self._single("std")] = float(value)

    def _single(self, name: str) -> int:
        # Reading or setting member 0's statistic on an ensemble would silently leave the others as they were.
        if self.size != 1:
            raise ValueError(f"this reward model has {self.size} members, each with its own {name}: use "
                             f"`{name}s`")
        return 0

    @property
    def size(self) -> int:
        """Members: 1 for a single reward model with one head."""
        return len(self.means)

    def add_member(self, model, mean: float | list[float] = 0.0, std: float | list[float] = 1.0,
                   path: str = "") -> None:
        self.paths.append(path)
        self.models.append(model)
        self.means += _per_head(mean, model)
        self.stds += _per_head(std, model)

    @classmethod
    def load(cls, path: str, device: str = "auto", precision: str = "auto") -> RewardModel:
        """Load a reward model directory (any `rlhf reward` output, an ensemble too) with its normalisation
        statistics."""
        model_dir = Path(path)
        manifest = model_dir / ENSEMBLE_FILE
        if not manifest.is_file():
            model, tokenizer, resolved, mean, std = _load_member(model_dir, device, precision)
            return cls(model, tokenizer, resolved, mean, std)
        members = json.loads(manifest.read_text()).get("members") or []
        if not members:
            raise UserError(f"{manifest} names no members")
        loaded = [_load_member(model_dir / m, device, precision) for m in members]
        first = loaded[0]
        ensemble = cls(first[0], first[1], str(model_dir), first[3], first[4])
        ensemble.paths = [first[2]]
        for model, tokenizer, resolved, mean, std in loaded[1:]:
            if tokenizer.get_vocab() != first[1].get_vocab() or tokenizer.chat_template != first[1].chat_template:
                raise UserError(f"{resolved}: an ensemble's members must share one tokenizer and chat template")
            ensemble.add_member(model, mean, std, resolved)
        return ensemble

    def encode(self, prompt: str | list[dict], response: str) -> list[int]:
        """Token ids of prompt + response exactly as TRL's RewardTrainer tokenizes a conversational pair."""
        ids = self.tokenizer.apply_chat_template(_messages(prompt, response), tokenize=True, return_dict=True)
        return list(ids["input_ids"])

    @torch.no_grad()
    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw rewards (K, B) float32 on the CPU of right-padded token ids (B, T), one row per member (each head
        of each model)."""
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        rows = []
        for model in self.models:
            was_training = model.training
            model.eval()
            rows.append(model(input_ids=input_ids, attention_mask=attention_mask).logits.float().cpu().T)
            model.train(was_training)
        return torch.cat(rows)

    def normalized(self, raw: torch.Tensor) -> torch.Tensor:
        """(K, B) raw member rewards as (r - mean_k) / std_k, each member by its own statistics."""
        means = torch.tensor(self.means).unsqueeze(1)  # (K, 1)
        stds = torch.tensor(self.stds).clamp_min(1e-8).unsqueeze(1)
        return (raw - means) / stds

    def score_members(self, prompts: list[str | list[dict]], responses: list[str], batch_size: int = 16,
                      normalize: bool = False) -> torch.Tensor:
        """Rewards (K, B) of responses[i] to prompts[i] by each member; (r - mean) / std with `normalize`."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        if any(len(ids) > self.max_tokens for ids in encoded) and not self._warned:
            self._warned = True
            warnings.warn(f"reward model {self.path}: inputs longer than {self.max_tokens} tokens keep their first "
                          f"{self.max_tokens} tokens", stacklevel=2)
        encoded = [ids[: self.max_tokens] for ids in encoded]
        rewards = torch.zeros(self.size, len(encoded), dtype=torch.float32)
        # Longest first, so each batch pads to similar lengths; results go back to the callers' order.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = right_padded([encoded[i] for i in rows], self.tokenizer.pad_token_id)
            rewards[:, rows] = self.forward_ids(input_ids, attention_mask)
        return self.normalized(rewards) if normalize else rewards

    def score(self, prompts: list[str | list[dict]], responses: list[str], batch_size: int = 16,
              normalize: bool = False) -> torch.Tensor:
        """Rewards (B,) float32 on the CPU of responses[i] to prompts[i]: the members' mean for an ensemble."""
        return self.score_members(prompts, responses, batch_size, normalize).mean(0)


@functools.lru_cache(maxsize=2)
def _cached(path: str, stamp: float) -> RewardModel:
    return RewardModel.load(path)


def cached(model_dir: str) -> RewardModel:
    """The reward model in `model_dir`, kept loaded between calls and reloaded when its files change."""
    path = Path(model_dir).resolve()
    marker = path / ENSEMBLE_FILE if (path / ENSEMBLE_FILE).is_file() else path / "model.safetensors"
    return _cached(str(path), marker.stat().st_mtime if marker.is_file() else 0.0)


def score(model_dir: str, prompt: str | list[dict], responses: list[str]) -> list[float]:
    """Raw rewards of several responses to one prompt (an ensemble's mean); the probability that response A beats
    B is sigmoid(r_A - r_B)."""
    return cached(model_dir).score([prompt] * len(responses), list(responses)).tolist()
