"""Kahneman-Tversky Optimization with TRL's KTOTrainer (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization").

KTO learns from single rated responses, not pairs: each (prompt x, response y) is desirable or undesirable. With
r(x, y) = log(pi(y|x) / pi_ref(y|x)) and a reference point z0 = KL(pi(y'|x) || pi_ref(y'|x)), the loss is
E[w(y) * (1 - v(x, y))], v = sigmoid(beta * (r - z0)) for a desirable y and sigmoid(beta * (z0 - r)) for an
undesirable one; w(y) is desirable_weight or undesirable_weight (the KTO loss, eq. 7 as TRL cites the paper). z0 is
estimated per batch from mismatched pairs (each prompt with another example's completion), clamped at 0 and not
back-propagated, so a batch needs at least 2 examples and a fixed order. `loss_type: apo_zero_unpaired` drops z0
(APO-zero, D'Oosterlinck et al. 2024). At the first step pi = pi_ref, so every example's loss is its weight / 2.

Imbalanced data: the paper's rule (eq. 8 as TRL cites it) keeps desirable_weight * n_desirable /
(undesirable_weight * n_undesirable) within [1, 4/3]; `balance_weights` (on by default) raises the under-weighted
label's weight to make that ratio 1 when it falls outside, and says so.

Where this departs from TRL's defaults: precision follows the device, gradient checkpointing is off unless asked for,
the reference log-probs are precomputed by default (as in our dpo), the data are shuffled once with the seed before
TRL's fixed-order batches (an export lists a prompt's responses together, which would pair a prompt with its own
responses in the KL estimate), and the result is always a full model directory (a LoRA adapter is merged).

Data: the export's rated responses (ratings_train.jsonl, ratings_test.jsonl), a file of {prompt, completion, label}
rows, or with `from_pairs` the preference pairs, each pair giving a desirable and an undesirable response.

    rlhf kto --config configs/kto.yaml --data runs/export --max_steps 20
    rlhf kto --config configs/kto.yaml --data runs/export --from_pairs    # no ratings yet: the pairs, unpaired
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from rlhf.config import UserError, field, resume_checkpoint
from rlhf.console import without_library_bars
from rlhf.trl_stage import (
    TRLStageConfig,
    lm_head_log_probs,
    lora_config,
    loss_trend,
    mixed_precision,
    pick,
    train_and_save,
    training_args,
    write_metrics,
)

# TRL 1.16's KTOConfig.loss_type choices (tests/test_kto.py checks this list against the installed TRL).
LOSS_TYPES = ("kto", "apo_zero_unpaired")
LossType = Literal["kto", "apo_zero_unpaired"]
# TRL logs desirable responses as "chosen" and undesirable ones as "rejected"; "kl" is the batch's z0.
_LOGGED = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
RATING_SUFFIXES = (".jsonl", ".json", ".parquet")
WEIGHT_RANGE = (1.0, 4 / 3)  # desirable_weight * n_desirable / (undesirable_weight * n_undesirable), the paper's


@dataclass
class KTOConfig(TRLStageConfig):
    # The options every TRL-backed stage shares (model, device, LoRA, steps, batch, seed...): TRLStageConfig
    # Model
    ref_model: str = field("", "Reference model; '' = a frozen copy of `model` (with LoRA: the base, adapter off).")
    # Data
    data: str = field("runs/export", "Rated responses: an export directory (its ratings_train/ratings_test.jsonl) or "
                                     "a .jsonl/.json/.parquet file of {prompt, completion, label} rows (a tenth of "
                                     "its prompts held out); with from_pairs, preference pairs as dpo reads them.")
    from_pairs: bool = field(False, "Train on preference pairs instead of ratings: each pair's chosen response is "
                                    "desirable, its rejected one undesirable.")
    max_length: int = field(256, "Truncate prompt + response to this many tokens.")
    # Optimization
    loss_type: LossType = field("kto", "kto (the paper's, with the KL reference point) or apo_zero_unpaired (no KL "
                                       "term: pushes desirable responses up and undesirable down outright).")
    beta: float = field(0.1, "KL strength: how far the policy may move from the reference.")
    desirable_weight: float = field(1.0, "Weight of a desirable response's loss (TRL's; balance_weights may raise "
                                         "it when desirable responses are the rarer kind).")
    undesirable_weight: float = field(1.0, "Weight of an undesirable response's loss (TRL's; balance_weights may "
                                           "raise it when undesirable responses are the rarer kind).")
    balance_weights: bool = field(True, "When desirable_weight * n_desirable / (undesirable_weight * n_undesirable) "
                                        "is outside [1, 4/3] (the paper's rule), raise the under-weighted label's "
                                        "weight to make it 1; false: the weights as given, with a warning.")
    learning_rate: float = field(5e-6, "Peak learning rate (dpo's; TRL advises 5e-7 to 5e-6 for KTO, at most about "
                                       "1e-6 at beta 0.1 on larger models).")
    warmup_ratio: float = field(0.0, "Share of steps spent warming the learning rate up (0 to 1).")
    precompute_ref_log_probs: bool = field(True, "Run the reference once over the data before training (saves a "
                                                 "forward pass per step).")
    # Output
    output_dir: str = field("runs/kto", "Where the aligned model, metrics.json and checkpoints go.")
    save_total_limit: int = field(2, "Keep at most this many checkpoints (0: keep all).")
    logging_steps: int = field(1, "Log every this many steps.")
    eval_steps: int = field(0, "Evaluate on the test split every this many steps (0: once, at the end).")
    eval_examples: int = field(0, "Evaluate on at most this many test responses, a seeded draw (0: all of them).")

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0 or self.learning_rate <= 0 or self.batch_size < 1 or self.max_length < 16:
            raise ValueError("beta and learning_rate must be > 0, batch_size >= 1, max_length >= 16")
        if self.loss_type == "kto" and self.batch_size < 2:
            raise ValueError("the kto loss needs batch_size >= 2 (its KL estimate pairs each prompt with another "
                             "example's response in the batch; TRL advises at least 4)")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("desirable_weight and undesirable_weight must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if min(self.save_steps, self.save_total_limit, self.eval_steps, self.eval_examples) < 0 or \
                self.logging_steps < 1:
            raise ValueError("save_steps, save_total_limit, eval_steps and eval_examples must be >= 0, "
                             "logging_steps >= 1")
        super().__post_init__()


# ---------------------------------------------------------------- data: rated responses as {prompt, completion, label}


def to_unpaired(row: dict) -> dict:
    """One rated response as TRL's conversational unpaired row {prompt, completion, label}, or a ValueError."""
    from rlhf.data import _as_messages

    if "label" not in row:
        if "chosen" in row and "rejected" in row:
            raise ValueError("a preference pair (chosen/rejected), not a rated response: pass --from_pairs")
        raise ValueError("no label (true: a desirable response, false: an undesirable one)")
    label = row["label"]
    if not (isinstance(label, bool) or (type(label) is int and label in (0, 1))):
        raise ValueError(f"label must be true or false, not {label!r}")
    if row.get("prompt") is None or row.get("completion") is None:
        raise ValueError("needs a prompt and a completion")
    prompt, completion = _as_messages(row["prompt"], "user"), _as_messages(row["completion"], "assistant")
    if not prompt or not completion or not all(isinstance(m["content"], str) and m["content"].strip()
                                               for m in prompt + completion):
        raise ValueError("an empty prompt or completion, or an empty turn in it")
    if prompt[-1]["role"] != "user" or any(m["role"] not in ("system", "user", "assistant") for m in prompt):
        raise ValueError("the prompt's roles must be system, user or assistant, ending with the user's turn")
    if any(m["role"] != "assistant" for m in completion):
        raise ValueError("the completion must be the assistant's turn")
    return {"prompt": prompt, "completion": completion, "label": bool(label)}


def _read_unpaired(path: Path) -> list[dict]:
    from rlhf.data import _read_rows

    out = []
    for lineno, row in _read_rows(path):
        try:
            out.append(to_unpaired(row))
        except (ValueError, KeyError, TypeError) as e:  # a message without role or content: KeyError, TypeError
            raise UserError(f"{path}:{lineno}: {e}") from None
    return out


def _rating_file(directory: Path, split: str) -> Path | None:
    return next((f for f in (directory / f"ratings_{split}{s}" for s in RATING_SUFFIXES) if f.is_file()), None)


def load_unpaired_dataset(spec: str, test_size: float = 0.1, seed: int = 0):
    """Rated responses as a DatasetDict(train, test) of conversational {prompt, completion, label} rows.

    spec: an export directory (ratings_train and, if present, ratings_test) or a single file, whose test split is a
    share of its distinct prompts (as load_preference_dataset splits pairs)."""
    from datasets import Dataset, DatasetDict

    from rlhf.data import _split_by_prompt

    path = Path(spec).expanduser()
    if path.is_dir():
        train = _rating_file(path, "train")
        if train is None or not train.stat().st_size:
            raise UserError(f"{path}: no rated responses (ratings_train.jsonl is missing or empty); rate responses "
                            f"in the labeling app and export again, or pass --from_pairs to train on the pairs")
        test = _rating_file(path, "test")
        splits = {"train": _read_unpaired(train)}
        if test is not None:  # an empty test file: no held-out ratings, and none taken from train
            splits["test"] = _read_unpaired(test) if test.stat().st_size else []
    elif path.is_file():
        if path.suffix not in RATING_SUFFIXES:
            raise UserError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")
        splits = {"train": _read_unpaired(path)}
    else:
        raise UserError(f"data not found: {spec}")
    if not splits["train"]:
        raise UserError(f"{spec}: no rated responses")
    data = DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})
    return data if "test" in data else _split_by_prompt(data["train"], test_size, seed)


def load_kto_dataset(config: KTOConfig):
    """The stage's data as {prompt, completion, label} splits: the ratings, or with from_pairs the pairs unpaired."""
    if not config.from_pairs:
        return load_unpaired_dataset(config.data, seed=config.seed)
    from datasets import DatasetDict
    from trl.data_utils import unpair_preference_dataset

    from rlhf.data import load_preference_dataset

    pairs = load_preference_dataset(config.data, seed=config.seed)
    pairs = DatasetDict({name: split.select_columns(["prompt", "chosen", "rejected"]) for name, split in pairs.items()})
    return DatasetDict({name: unpair_preference_dataset(split) for name, split in pairs.items() if len(split)})


def loss_weights(n_desirable: int, n_undesirable: int, config: KTOConfig) -> tuple[float, float, str]:
    """(desirable_weight, undesirable_weight, a line to print or ''): the configured weights, or with balance_weights
    the under-weighted label's weight raised so that w_d * n_d / (w_u * n_u) = 1 where it was outside [1, 4/3]."""
    w_d, w_u = config.desirable_weight, config.undesirable_weight
    counts = f"{n_desirable} desirable, {n_undesirable} undesirable training responses"
    if not n_undesirable:
        return w_d, w_u, f"warning: {counts}: KTO trains, but pushes no response down"
    if not n_desirable:
        return w_d, w_u, f"warning: {counts}: KTO only pushes responses down (TRL: use a conservative learning rate)"
    ratio = w_d * n_desirable / (w_u * n_undesirable)
    if WEIGHT_RANGE[0] <= ratio <= WEIGHT_RANGE[1]:
        return w_d, w_u, ""
    if config.balance_weights:  # raise, never lower: the step size of the commoner label stays as configured
        w_d, w_u = (w_u * n_undesirable / n_desirable, w_u) if ratio < 1 else (w_d, w_d * n_desirable / n_undesirable)
        return w_d, w_u, (f"KTO: {counts}: desirable_weight {w_d:.3g}, undesirable_weight {w_u:.3g} "
                          f"(balance_weights; false keeps the weights as given)")
    return w_d, w_u, (f"warning: {counts}: desirable_weight * n / (undesirable_weight * n) = {ratio:.2f}, outside "
                      f"[1, 4/3]; raise the {'desirable' if ratio < 1 else 'undesirable'} weight or set "
                      f"balance_weights: true")


# ---------------------------------------------------------------- the trainer


def build_trainer(config: KTOConfig):
    """The configured KTOTrainer and its DatasetDict: what `run` trains."""
    import trl
    from trl.trainer import kto_trainer

    from rlhf.models import load, pick_device

    data = load_kto_dataset(config)
    if "train" not in data or len(data["train"]) == 0:
        raise UserError(f"{config.data}: no training responses")
    has_test = "test" in data and len(data["test"]) > 0
    if has_test:  # shuffled for the same reason as the training data (see _examples_to_train)
        data["test"] = data["test"].shuffle(seed=config.seed)
        if 0 < config.eval_examples < len(data["test"]):
            data["test"] = data["test"].select(range(config.eval_examples))

    device = pick_device(config.device)
    # fp32 master weights; bf16/fp16 come from autocast (the precision flags), as mixed-precision training expects.
    policy = load(config.model, device=str(device), precision="fp32")
    model, tokenizer = policy.model, policy.tokenizer
    # The reference is only run forward, so it may sit in the compute dtype. None lets TRL use the policy itself
    # before training (precomputed log-probs) or the LoRA base with the adapter disabled.
    ref_model = None
    if config.ref_model:
        ref_model = load(config.ref_model, device=str(device), precision=config.precision).model
    elif not config.lora and not config.precompute_ref_log_probs:
        ref_model = load(config.model, device=str(device), precision=config.precision).model
    peft_config = lora_config(config.lora_r, config.lora_alpha, "CAUSAL_LM") if config.lora else None
    args = training_args(trl.KTOConfig, config, device, eval_steps=config.eval_steps, has_test=has_test,
                         save_total_limit=config.save_total_limit, beta=config.beta, loss_type=config.loss_type,
                         precompute_ref_log_probs=config.precompute_ref_log_probs)
    train = _examples_to_train(data["train"], config, args)
    # The weights follow the responses trained on (with max_steps, a draw), which is also what TRL checks them on.
    n_desirable = sum(train["label"])
    args.desirable_weight, args.undesirable_weight, note = loss_weights(n_desirable, len(train) - n_desirable, config)
    if note:
        print(note)
    if config.precompute_ref_log_probs and args.process_index == 0:  # once, not once per process
        held_out = f" and {len(data['test'])} held-out" if has_test else ""
        print(f"KTO: reference log-probs of {len(train)} training{held_out} responses, computed once")
    # TRL's bars for tokenizing and that pass; our LM head on a CPU (trl_stage.add_lm_head_log_probs)
    with without_library_bars(), lm_head_log_probs(kto_trainer):
        trainer = trl.KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train,
                                 eval_dataset=data["test"] if has_test else None, processing_class=tokenizer,
                                 peft_config=peft_config)
    if len(trainer.train_dataset) == 0:  # TRL drops examples whose prompt alone fills max_length
        raise UserError(f"every training prompt is {config.max_length} tokens or longer: raise max_length")
    return trainer, data


def _examples_to_train(train, config: KTOConfig, args):
    """The training responses in the order TRL will batch them: a seeded shuffle (TRL's sampler is sequential, and
    its KL estimate pairs each prompt with its batch neighbour's response, which in an export's run of one prompt's
    responses is a response to that same prompt), cut with max_steps to the responses those steps see (the reference
    runs over no more)."""
    train = train.shuffle(seed=config.seed)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if config.max_steps > 0 and config.max_steps * per_step < len(train):
        train = train.select(range(config.max_steps * per_step))
    return train


def run(config: KTOConfig) -> dict:
    start = time.perf_counter()
    trainer, data = build_trainer(config)
    args = trainer.args
    has_test = "test" in data and len(data["test"]) > 0
    trained = train_and_save(trainer, config, resume_checkpoint(config.output_dir, config.resume), desc="KTO",
                             evaluate=has_test)
    eval_metrics, summary = trained.eval_metrics, trained.first_and_final(_LOGGED)
    final = summary["final"]
    n_desirable = sum(trainer.train_dataset["label"])
    metrics = {
        "train_loss": trained.result.training_loss, "eval_loss": eval_metrics.get("eval_loss"),
        # The responses max_steps reaches (all of them without it) by label, and those the data holds.
        "steps": trainer.state.global_step, "train_examples": len(trainer.train_dataset), "desirable": n_desirable,
        "undesirable": len(trainer.train_dataset) - n_desirable, "available_examples": len(data["train"]),
        "test_examples": len(data["test"]) if has_test else 0,
        "desirable_weight": args.desirable_weight, "undesirable_weight": args.undesirable_weight,
        **summary, "eval": pick(eval_metrics, _LOGGED, "eval_"),
        "log_history": trainer.state.log_history, "seconds": round(time.perf_counter() - start, 1),
        "device": str(args.device), "mixed_precision": mixed_precision(args),
        "output_dir": str(Path(config.output_dir)), "config": asdict(config),
    }
    if not write_metrics(trainer, config, metrics):
        return metrics

    nan = float("nan")
    source = "responses from preference pairs" if config.from_pairs else "rated responses"
    line = (f"KTO ({config.loss_type}, beta {config.beta}): {metrics['steps']} steps on {metrics['train_examples']} "
            + f"{source} " + (f"(of {metrics['available_examples']}) " if metrics["available_examples"] >
                              metrics["train_examples"] else "")
            + f"in {metrics['seconds']:.0f} s; {loss_trend(metrics)}")
    # A batch may hold one label only; TRL then logs no reward for the other.
    rewards = [f"{name} {final[key]:+.3f}" for name, key in (("desirable", "rewards/chosen"),
                                                              ("undesirable", "rewards/rejected")) if key in final]
    if rewards:
        line += f"; reward {', '.join(rewards)}, KL {final.get('kl', nan):.3f}"
    if metrics["eval"]:
        line += (f"; held-out margin {metrics['eval'].get('rewards/margins', nan):+.3f}, "
                 f"loss {metrics['eval'].get('loss', nan):.3f}")
    print(line)
    print(f"  model and metrics.json -> {Path(config.output_dir)}")
    if not all(math.isfinite(v) for v in final.values()):
        print("  warning: non-finite metrics; lower the learning rate or check the data")
    return metrics
