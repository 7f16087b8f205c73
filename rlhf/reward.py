"""Reward model training (TRL's RewardTrainer) and scoring, the scores PPO, the app, pairing and evaluation use.

A reward model is a backbone with a scalar head, r(x, y), fitted to preference pairs with the Bradley-Terry loss
-log sigmoid(r(x, y_chosen) - r(x, y_rejected)) (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", eq. 1). Where the data has a `margin` column (the vote's strength), the loss is
-log sigmoid(r_chosen - r_rejected - margin) (Touvron et al. 2023, Llama 2, eq. 2); `center_rewards_coefficient`
adds c * (r_chosen + r_rejected)^2 to keep rewards near zero (Eisenstein et al. 2023, eq. 2).

The backbone is any causal LM (the score is read at the last non-pad token; the default is the policy's own
backbone, SmolLM2-135M-Instruct) or encoder (`minilm-l6`, 22 M parameters: the [CLS] pooler). An encoder has no
chat template, so one is given to its tokenizer ([CLS]role: content[SEP] per turn) and saved with the model.

Held-out figures on the test split: accuracy, mean margin, expected calibration error of sigmoid(r_A - r_B), the
loss. Normalisation statistics (mean and std of the reward on samples from a reference policy, else on the test
split's responses) are saved in metrics.json for PPO, which scores with `normalize=True`.

Departures from TRL's defaults: precision follows the device (fp32 master weights, bf16/fp16 autocast only where
the hardware has it), gradient checkpointing is off, and a LoRA adapter is merged so the output is always a full
model directory. Scoring formats text exactly as training did: the chat template over prompt + response, no EOS
added (TRL adds one only to non-conversational data, and our data is always conversational), right padding, no
truncation (TRL drops over-long pairs instead; scoring keeps the first tokens only past the model's position
limit).

    rlhf reward --config configs/reward.yaml --data runs/export --max_steps 50
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf.config import UserError, field, resume_checkpoint
from rlhf.trl_stage import TRLStageConfig, lora_config, train_and_save, training_args, write_metrics

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


@dataclass
class RewardConfig(TRLStageConfig):
    # The options every TRL-backed stage shares (model, device, LoRA, steps, batch, seed...): TRLStageConfig
    # Data
    data: str = field("runs/export", "Preference data: an export directory, a .jsonl/.parquet file, or a Hub id.")
    test_size: float = field(0.1, "Share of prompts held out as the test split when the data has none.")
    max_length: int = field(512, "Pairs whose chosen or rejected text is longer (in tokens) are left out of training.")
    use_margin: bool = field(True, "Use the data's `margin` column when present: -log sigmoid(r_c - r_r - margin).")
    # Optimization
    learning_rate: float = field(2e-5, "Peak learning rate.")
    warmup_ratio: float = field(0.0, "Share of steps spent warming the learning rate up (0 to 1).")
    weight_decay: float = field(0.0, "AdamW weight decay.")
    center_rewards_coefficient: float = field(0.0, "Weight of the mean-zero penalty on rewards (0: off; 0.01 is "
                                              "the paper's value).")
    # Evaluation
    eval_steps: int = field(0, "Also evaluate the test split every this many steps (0: only at the end).")
    ece_bins: int = field(10, "Bins for the expected calibration error, equal widths over confidence [0.5, 1].")
    # Normalisation
    norm_policy: str = field("", "Reference policy whose samples give the reward mean/std for PPO ('' = use the "
                             "test split's chosen and rejected responses).")
    norm_prompts: str = field("", "Prompts the reference policy answers: 'sentiment', a .jsonl/.txt file, or '' "
                              "for the training data's prompts.")
    norm_samples: int = field(64, "Number of reference-policy samples for the statistics.")
    norm_max_new_tokens: int = field(48, "Maximum new tokens per reference-policy sample.")
    norm_temperature: float = field(0.7, "Sampling temperature for the reference-policy samples.")
    # Output
    output_dir: str = field("runs/reward", "Where the reward model, metrics.json and checkpoints go.")
    logging_steps: int = field(10, "Log every this many steps.")

    def __post_init__(self):
        if self.learning_rate <= 0 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("learning_rate must be > 0, batch_size and gradient_accumulation_steps >= 1")
        if self.max_length < 8:
            raise ValueError("max_length must be at least 8")
        if not 0 <= self.test_size < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("test_size and warmup_ratio must be in [0, 1)")
        if self.ece_bins < 1 or self.center_rewards_coefficient < 0 or self.eval_steps < 0 or self.save_steps < 0:
            raise ValueError("ece_bins must be >= 1; center_rewards_coefficient, eval_steps, save_steps >= 0")
        if self.norm_samples < 2 or self.norm_max_new_tokens < 1 or self.norm_temperature < 0:
            raise ValueError("norm_samples must be >= 2, norm_max_new_tokens >= 1, norm_temperature >= 0")
        super().__post_init__()


# ---------------------------------------------------------------- held-out figures: pure functions of rewards


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> float:
    """Mean -log sigmoid(r_c - r_r - margin) (Ouyang et al. 2022 eq. 1; the margin: Touvron et al. 2023 eq. 2)."""
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        diff = diff - margin
    return float(-torch.nn.functional.logsigmoid(diff).mean())


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores higher; a tie counts half."""
    diff = chosen_rewards - rejected_rewards  # (B,)
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


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
    correct = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    index = ((confidence - 0.5) / 0.5 * bins).long().clamp(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            ece += float(in_bin.double().mean()) * abs(float(correct[in_bin].mean()) - float(confidence[in_bin].mean()))
    return ece


# ---------------------------------------------------------------- scoring


def _messages(prompt: str | list[dict], response: str) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages + [{"role": "assistant", "content": response}]


class RewardModel:
    """A trained reward model and its tokenizer, scoring (prompt, response) pairs as training saw them."""

    def __init__(self, model, tokenizer, path: str = "", mean: float = 0.0, std: float = 1.0):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.mean, self.std = float(mean), float(std)
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{path or 'this reward model'}: its tokenizer has no chat template (train it with "
                            "`rlhf reward`, which gives encoders one)")
        # Past the model's position limit a sequence must be cut: keep its first tokens (the [CLS] an encoder pools).
        limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self.max_tokens = min(n for n in limits + [10**9] if isinstance(n, int) and n > 0)
        self._warned = False

    @classmethod
    def load(cls, path: str, device: str = "auto", precision: str = "auto") -> RewardModel:
        """Load a reward model directory (any `rlhf reward` output) with its normalisation statistics."""
        from rlhf.models import load

        model_dir = Path(path)
        config_file = model_dir / "config.json"
        if config_file.is_file():
            architectures = json.loads(config_file.read_text()).get("architectures") or []
            if not any(a.endswith("ForSequenceClassification") for a in architectures):
                raise UserError(f"{path} is not a reward model (architectures {architectures}); train one with "
                                "`rlhf reward`")
        loaded = load(str(path), head="score", device=device, precision=precision, padding_side="right")
        mean, std = 0.0, 1.0
        metrics_file = model_dir / "metrics.json"
        if metrics_file.is_file():
            norm = json.loads(metrics_file.read_text()).get("normalization") or {}
            mean, std = float(norm.get("mean", 0.0)), float(norm.get("std", 1.0))
        return cls(loaded.model, loaded.tokenizer, loaded.path, mean, std)

    def encode(self, prompt: str | list[dict], response: str) -> list[int]:
        """Token ids of prompt + response exactly as TRL's RewardTrainer tokenizes a conversational pair."""
        ids = self.tokenizer.apply_chat_template(_messages(prompt, response), tokenize=True, return_dict=True)
        return list(ids["input_ids"])

    @torch.no_grad()
    def score(self, prompts: list[str | list[dict]], responses: list[str], batch_size: int = 16,
              normalize: bool = False) -> torch.Tensor:
        """Rewards of responses[i] to prompts[i]: (B,) float32 on the CPU; (r - mean) / std with `normalize`."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        if any(len(ids) > self.max_tokens for ids in encoded) and not self._warned:
            self._warned = True
            warnings.warn(f"reward model {self.path}: inputs longer than {self.max_tokens} tokens keep their first "
                          f"{self.max_tokens} tokens", stacklevel=2)
        encoded = [ids[: self.max_tokens] for ids in encoded]
        rewards = torch.zeros(len(encoded), dtype=torch.float32)
        # Longest first, so each batch pads to similar lengths; results go back to the callers' order.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            # Right padding, as TRL's collator does: with left padding a causal LM would see shifted positions.
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
            for j, i in enumerate(rows):
                input_ids[j, : len(encoded[i])] = torch.tensor(encoded[i])
                attention_mask[j, : len(encoded[i])] = 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            rewards[rows] = logits[:, 0].float().cpu()  # (B,)
        self.model.train(was_training)
        if normalize:
            rewards = (rewards - self.mean) / max(self.std, 1e-8)
        return rewards


@functools.lru_cache(maxsize=2)
def _cached(path: str, stamp: float) -> RewardModel:
    return RewardModel.load(path)


def score(model_dir: str, prompt: str | list[dict], responses: list[str]) -> list[float]:
    """Raw rewards of several responses to one prompt; the model stays loaded between calls (reloaded if it changes).

    The probability that response A beats B is sigmoid(r_A - r_B).
    """
    path = Path(model_dir).resolve()
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime if weights.is_file() else 0.0
    return _cached(str(path), stamp).score([prompt] * len(responses), list(responses)).tolist()


# ---------------------------------------------------------------- training



def _prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def _plain(prompt: list[dict]) -> str | list[dict]:
    """One user turn as plain text (what `render_prompt` and the gold functions take), else the messages."""
    return prompt[0]["content"] if len(prompt) == 1 and prompt[0]["role"] == "user" else prompt


def _normalization(config: RewardConfig, scorer: RewardModel, data, device) -> dict:
    """Mean and std of the reward on reference-policy samples (what PPO will score), else on the test responses."""
    if config.norm_policy:
        from rlhf.data import read_prompts
        from rlhf.models import load
        from rlhf.sample import generate_batch, render_prompt

        if config.norm_prompts:
            prompts = read_prompts(config.norm_prompts)
        else:
            seen: dict[str, object] = {}
            for p in data["train"]["prompt"]:
                seen.setdefault(_prompt_key(p), _plain(p))
            prompts = list(seen.values())
        prompts = [prompts[i % len(prompts)] for i in range(config.norm_samples)]
        policy = load(config.norm_policy, device=str(device), precision=config.precision)
        texts = []
        for start in range(0, len(prompts), config.batch_size):
            chunk = prompts[start : start + config.batch_size]
            out = generate_batch(policy.model, policy.tokenizer, [render_prompt(policy.tokenizer, p) for p in chunk],
                                 max_new_tokens=config.norm_max_new_tokens, temperature=config.norm_temperature,
                                 generator_seed=config.seed + start)
            texts += [r["text"] for r in out]
        del policy
        rewards = scorer.score(prompts, texts, batch_size=config.batch_size)
        source = {"source": "policy", "policy": config.norm_policy,
                  "prompts": config.norm_prompts or "training prompts", "max_new_tokens": config.norm_max_new_tokens,
                  "temperature": config.norm_temperature}
    else:
        split = data["test"] if len(data["test"]) else data["train"]
        prompts = list(split["prompt"]) * 2
        texts = [m[-1]["content"] for m in split["chosen"]] + [m[-1]["content"] for m in split["rejected"]]
        rewards = scorer.score(prompts, texts, batch_size=config.batch_size)
        source = {"source": ("test" if len(data["test"]) else "train") + " split chosen+rejected responses"}
    return {"mean": float(rewards.mean()), "std": float(rewards.std()) if len(rewards) > 1 else 1.0,
            "n": len(rewards), **source}


def build_trainer(config: RewardConfig):
    """A ready RewardTrainer and the data (DatasetDict with train/test in TRL's conversational format)."""
    import trl
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from rlhf.data import load_preference_dataset
    from rlhf.models import load, pick_device

    data = load_preference_dataset(config.data, test_size=config.test_size, seed=config.seed)
    keep = ["prompt", "chosen", "rejected"] + (["margin"] if config.use_margin else [])
    data = data.remove_columns([c for c in data["train"].column_names if c not in keep])
    if "margin" in data["train"].column_names:
        # A missing margin is no margin.
        data = data.map(lambda row: {"margin": float(row["margin"] or 0.0)})
    if len(data["train"]) == 0:
        raise UserError(f"{config.data}: no training pairs")
    device = pick_device(config.device)
    # fp32 master weights whatever the precision: bf16/fp16 are autocast by the trainer (fp16 needs fp32 weights
    # for its gradient scaler). The head is new: say so once rather than print the loader's missing-key report.
    set_seed(config.seed)  # the fresh head's initialisation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        backbone = load(config.model, head="score", device=str(device), precision="fp32", padding_side="right")
    finally:
        hf_logging.set_verbosity(verbosity)
    model, tokenizer = backbone.model, backbone.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = ENCODER_CHAT_TEMPLATE if tokenizer.cls_token else PLAIN_CHAT_TEMPLATE
    # SEQ_CLS: PEFT trains the fresh head (score / classifier) in full beside the adapter.
    peft_config = lora_config(config.lora_r, config.lora_alpha, "SEQ_CLS") if config.lora else None
    has_test = len(data.get("test", [])) > 0
    if "test" not in data:
        data["test"] = data["train"].select([])
    args = training_args(trl.RewardConfig, config, device, eval_steps=config.eval_steps, has_test=has_test,
                         weight_decay=config.weight_decay,
                         center_rewards_coefficient=config.center_rewards_coefficient or None,
                         include_num_input_tokens_seen="non_padding")
    model.train()
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=data["train"],
                                eval_dataset=data["test"] if has_test else None, processing_class=tokenizer,
                                peft_config=peft_config)
    return trainer, data


def run(config: RewardConfig) -> dict:
    from transformers import TrainerCallback

    from rlhf.models import pick_device

    class ThisRun(TrainerCallback):
        """Steps and tokens of this call alone: a resumed run starts at its checkpoint's step, not at 0."""

        steps = tokens_before = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens_before = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    start = time.perf_counter()
    resume_from = resume_checkpoint(config.output_dir, config.resume)
    trainer, data = build_trainer(config)
    device = pick_device(config.device)
    tokenizer = trainer.processing_class
    n_train = len(data["train"])
    n_kept = len(trainer.train_dataset)
    if n_kept == 0:
        raise UserError(f"every training pair is longer than max_length={config.max_length} tokens")
    counter = ThisRun()
    trainer.add_callback(counter)
    trained = train_and_save(trainer, config, resume_from, padding_side="right")
    out = Path(config.output_dir)
    # Under `accelerate launch` every process holds the same trained model and computes the figures below; only
    # the main one has written it.
    if trained.main:
        model = trained.model.eval()
    else:
        merge = getattr(trainer.model, "merge_and_unload", None)
        model = (merge() if merge else trainer.model).eval()

    # Held-out figures through the scoring path itself, so they describe the model that PPO and the app will use.
    scorer = RewardModel(model, tokenizer, str(out))
    test = data["test"]
    held_out: dict = {"test_pairs": len(test)}
    if len(test):
        chosen = scorer.score(test["prompt"], [m[-1]["content"] for m in test["chosen"]], config.batch_size)
        rejected = scorer.score(test["prompt"], [m[-1]["content"] for m in test["rejected"]], config.batch_size)
        margin = torch.tensor(test["margin"]) if "margin" in test.column_names else None
        held_out.update(accuracy=pairwise_accuracy(chosen, rejected), mean_margin=mean_margin(chosen, rejected),
                        ece=expected_calibration_error(chosen, rejected, config.ece_bins), ece_bins=config.ece_bins,
                        eval_loss=bradley_terry_loss(chosen, rejected, margin))
    normalization = _normalization(config, scorer, data, device)

    # Non-padding tokens of the chosen and rejected sequences that this call trained on.
    runtime = trained.result.metrics.get("train_runtime") or 0.0
    train_tokens = trainer.state.num_input_tokens_seen - counter.tokens_before
    metrics = {
        **held_out,
        "train_loss": trained.result.training_loss, "steps": trainer.state.global_step, "steps_run": counter.steps,
        "resumed_from": resume_from, "train_pairs": n_kept,
        "train_pairs_over_max_length": n_train - n_kept, "uses_margin": "margin" in data["train"].column_names,
        "train_tokens": train_tokens, "train_seconds": round(runtime, 2),
        "tokens_per_second": train_tokens / runtime if runtime > 0 else None,
        "eval_log": [h for h in trainer.state.log_history if "eval_loss" in h],
        **trained.first_and_final(("loss", "accuracy", "margin")),
        "normalization": normalization,
        "seconds": round(time.perf_counter() - start, 1), "config": asdict(config), "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    if not write_metrics(trainer, config, metrics):
        return metrics
    figures = (f"held-out accuracy {held_out['accuracy']:.3f}, margin {held_out['mean_margin']:.3f}, "
               f"ECE {held_out['ece']:.3f} on {len(test)} pairs" if len(test) else "no test pairs")
    loss = (f"loss {metrics['first']['loss']:.3f} -> {metrics['final']['loss']:.3f}" if len(trained.logs) > 1
            else f"mean loss {trained.result.training_loss:.3f}")
    print(f"Reward model: {metrics['steps']} steps on {n_kept} pairs in {metrics['seconds']:.0f} s "
          f"({metrics['tokens_per_second'] or 0:.0f} tokens/s); {loss}; {figures}; reward mean "
          f"{normalization['mean']:.3f} std {normalization['std']:.3f} ({normalization['source']}) -> {out}")
    return metrics
