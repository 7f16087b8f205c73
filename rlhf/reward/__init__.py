"""Reward model training (TRL's RewardTrainer): the scores PPO, the app, pairing and evaluation use.

A reward model is a backbone with a scalar head, r(x, y), fitted to preference pairs with the Bradley-Terry loss
-log sigmoid(r(x, y_chosen) - r(x, y_rejected)) (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", eq. 1). Where the data has a `margin` column (the vote's strength), the loss is
-log sigmoid(r_chosen - r_rejected - margin) (Touvron et al. 2023, Llama 2, eq. 2); `center_rewards_coefficient`
adds c * (r_chosen + r_rejected)^2 to keep rewards near zero (Eisenstein et al. 2023, eq. 2).

The backbone is any causal LM (the score is read at the last non-pad token; the default is the policy's own
backbone, SmolLM2-135M-Instruct) or encoder (`minilm-l6`, 22 M parameters), whose head reads the [CLS] pooler or,
with `pooling: mean`, the mean token state (recorded in config.json, so every load scores it the same way). An
encoder has no chat template, so one is given to its tokenizer ([CLS]role: content[SEP] per turn) and saved with the
model.

Held-out evidence, on the test split (rlhf.reward.figures): accuracy with a 95 % interval (prompts resampled), the
loss, expected calibration error, length bias, and beside them the ceiling: how often the labels agree with the gold
function (`gold`, for simulated labels) or with each other (pairs several people voted on). With a test split,
training evaluates every epoch (or `eval_steps`) and keeps the checkpoint with the lowest held-out loss
(`keep_best`). `ensemble` K trains K members with seeds seed, seed + 1, ... into one directory that scores as one
model (rlhf.reward.model), or with `ensemble_kind: heads` K score heads on one backbone, each fitted to its own
bootstrap resample of the pairs (rlhf.reward.heads), at one model's cost. Normalisation statistics (mean and std
of the reward on samples from a reference policy, else on the test split's responses; per head for K heads) are
saved in metrics.json for PPO, which scores with `normalize=True`.

Departures from TRL's defaults: precision follows the device (fp32 master weights, bf16/fp16 autocast only where
the hardware has it), gradient checkpointing is off, and a LoRA adapter is merged so the output is always a full
model directory.

    rlhf reward --config configs/reward.yaml --data runs/export --max_steps 50
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from rlhf.config import UserError, field, resume_checkpoint
from rlhf.reward import figures
from rlhf.reward.figures import (  # noqa: F401  (the figures' names, re-exported)
    bradley_terry_loss,
    expected_calibration_error,
    mean_margin,
    pairwise_accuracy,
)
from rlhf.reward.heads import heads_trainer_class, record_heads, widen_head
from rlhf.reward.model import (  # noqa: F401  (re-exported: callers import the scorer from rlhf.reward)
    ENCODER_CHAT_TEMPLATE,
    ENSEMBLE_FILE,
    PLAIN_CHAT_TEMPLATE,
    RewardModel,
    score,
)
from rlhf.trl_stage import TRLStageConfig, lora_config, loss_trend, train_and_save, training_args, write_metrics

VOTE_COLUMNS = ("n_votes", "agreement")  # an export's: how many voted on a pair, and the share behind its label


@dataclass
class RewardConfig(TRLStageConfig):
    # The options every TRL-backed stage shares (model, device, LoRA, steps, batch, seed...): TRLStageConfig
    # Model
    pooling: Literal["cls", "mean"] = field("cls", "How an encoder's tokens become the score's input: cls (its [CLS] "
                                            "pooler) or mean (the mean token state, as sentence-transformers pool). "
                                            "A causal LM reads its last token: cls.")
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
    keep_best: bool = field(True, "With a test split: evaluate during training and keep the checkpoint with the "
                            "lowest held-out loss (not the last one).")
    eval_steps: int = field(0, "Evaluate the test split every this many steps (0: every epoch, with keep_best; "
                            "else only at the end).")
    ece_bins: int = field(10, "Bins for the expected calibration error, equal widths over confidence [0.5, 1].")
    gold: str = field("", "The gold function simulated labels came from (e.g. sentiment): the held-out ceiling is "
                      "how often the labels agree with it ('' : from overlapping votes, where there are any).")
    # Ensemble
    ensemble: int = field(1, "Train this many members saved as one reward model that scores their mean; their "
                          "spread is its uncertainty.")
    ensemble_kind: Literal["seeds", "heads"] = field(
        "seeds", "How an ensemble's members differ: seeds (K models trained one after another with seeds seed, "
        "seed + 1, ...: K times the time) or heads (K score heads on one backbone, each on its own bootstrap "
        "resample of the pairs: one model's time).")
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
        if self.ensemble < 1:
            raise ValueError("ensemble must be >= 1")
        if self.norm_samples < 2 or self.norm_max_new_tokens < 1 or self.norm_temperature < 0:
            raise ValueError("norm_samples must be >= 2, norm_max_new_tokens >= 1, norm_temperature >= 0")
        super().__post_init__()


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
        members = scorer.score_members(prompts, texts, batch_size=config.batch_size)
        source = {"source": "policy", "policy": config.norm_policy,
                  "prompts": config.norm_prompts or "training prompts", "max_new_tokens": config.norm_max_new_tokens,
                  "temperature": config.norm_temperature}
    else:
        split = data["test"] if len(data["test"]) else data["train"]
        prompts = list(split["prompt"]) * 2
        texts = [m[-1]["content"] for m in split["chosen"]] + [m[-1]["content"] for m in split["rejected"]]
        members = scorer.score_members(prompts, texts, batch_size=config.batch_size)
        source = {"source": ("test" if len(data["test"]) else "train") + " split chosen+rejected responses"}
    rewards = members.mean(0)
    out = {"mean": float(rewards.mean()), "std": float(rewards.std()) if len(rewards) > 1 else 1.0,
           "n": len(rewards), **source}
    if len(members) > 1:  # K heads: each normalised by its own statistics, as seed-trained members are
        out["heads"] = {"mean": members.mean(1).tolist(),
                        "std": members.std(1).tolist() if len(rewards) > 1 else [1.0] * len(members)}
    return out


def build_trainer(config: RewardConfig):
    """A ready RewardTrainer and the data (DatasetDict with train/test in TRL's conversational format)."""
    import trl
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from rlhf.data import load_preference_dataset
    from rlhf.models import POOLING_KEY, load, pick_device, use_mean_pooling

    data = load_preference_dataset(config.data, test_size=config.test_size, seed=config.seed)
    keep = ["prompt", "chosen", "rejected"] + (["margin"] if config.use_margin else [])
    # The test split keeps its vote counts and agreement for the ceiling (held_out); the trainer never sees them.
    for split, extra in (("train", ()), ("test", VOTE_COLUMNS)):
        if split in data:
            data[split] = data[split].remove_columns(
                [c for c in data[split].column_names if c not in keep and c not in extra])
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
        backbone = load(config.model, head="score", device=str(device), precision="fp32", padding_side="right",
                        num_labels=1)  # one fresh or trained head, whatever the backbone had; widened below
    finally:
        hf_logging.set_verbosity(verbosity)
    model, tokenizer = backbone.model, backbone.tokenizer
    pooled = getattr(model.config, POOLING_KEY, "cls")  # a reward model trained on reads as it was trained
    if config.pooling == "mean" and pooled != "mean":
        use_mean_pooling(model)
    elif config.pooling != pooled:
        raise UserError(f"{config.model} reads the mean token state (pooling mean); give --pooling mean")
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = ENCODER_CHAT_TEMPLATE if tokenizer.cls_token else PLAIN_CHAT_TEMPLATE
    heads = config.ensemble if config.ensemble_kind == "heads" else 1
    if heads > 1:
        widen_head(model, heads)
    # SEQ_CLS: PEFT trains the fresh head (score / classifier) in full beside the adapter.
    peft_config = lora_config(config.lora_r, config.lora_alpha, "SEQ_CLS") if config.lora else None
    has_test = len(data.get("test", [])) > 0
    if "test" not in data:
        data["test"] = data["train"].select([])
    args = training_args(trl.RewardConfig, config, device, eval_steps=config.eval_steps, has_test=has_test,
                         keep_best=config.keep_best, weight_decay=config.weight_decay,
                         center_rewards_coefficient=config.center_rewards_coefficient or None,
                         include_num_input_tokens_seen="non_padding")
    model.train()
    eval_data = data["test"].remove_columns([c for c in VOTE_COLUMNS if c in data["test"].column_names])
    trainer_class = heads_trainer_class(trl.RewardTrainer) if heads > 1 else trl.RewardTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=data["train"],
                            eval_dataset=eval_data if has_test else None, processing_class=tokenizer,
                            peft_config=peft_config)
    if heads > 1:
        record_heads(trainer.model, heads)
    return trainer, data


def _words(text: str) -> int:
    return len(text.split())


def held_out(config: RewardConfig, scorer: RewardModel, test) -> dict:
    """The held-out evidence on the test split's pairs (see rlhf.reward.figures), through the scoring path itself so
    it describes the model PPO and the app will use. Without a gold, the ceiling comes from the split's n_votes and
    agreement columns (an export's), where several people voted."""
    if not len(test):
        return {"test_pairs": 0}
    prompts = list(test["prompt"])
    chosen_text = [m[-1]["content"] for m in test["chosen"]]
    rejected_text = [m[-1]["content"] for m in test["rejected"]]
    members_c = scorer.score_members(prompts, chosen_text, config.batch_size)  # (K, B)
    members_r = scorer.score_members(prompts, rejected_text, config.batch_size)
    chosen, rejected = members_c.mean(0), members_r.mean(0)  # (B,)
    margin = torch.tensor(test["margin"]) if "margin" in test.column_names else None
    groups = [_prompt_key(p) for p in prompts]
    hits = figures.correct(chosen, rejected)
    accuracy = figures.grouped_share_ci(hits.tolist(), groups, seed=config.seed)
    out: dict = {
        "test_pairs": len(test), "test_prompts": len(set(groups)), "accuracy": accuracy[0],
        "accuracy_ci": list(accuracy[1:]), "eval_loss": figures.bradley_terry_loss(chosen, rejected, margin),
        # Without the margin term: the loss that ln 2 (a coin flip) is the yardstick for; with margins of 0.5 a
        # model that scores every pair even already costs ln(1 + e^0.5) = 0.97.
        "plain_loss": figures.bradley_terry_loss(chosen, rejected),
        "mean_margin": figures.mean_margin(chosen, rejected),
        "ece": figures.expected_calibration_error(chosen, rejected, config.ece_bins), "ece_bins": config.ece_bins,
        **figures.length_bias(chosen, rejected, [_words(t) for t in chosen_text], [_words(t) for t in rejected_text],
                              [((g, c), (g, r)) for g, c, r in zip(groups, chosen_text, rejected_text)]),
    }
    ceiling = None
    if config.gold:
        from rlhf.annotators import load_gold

        gold = load_gold(config.gold)
        plain = [_plain(p) for p in prompts]
        gold_c, gold_r = list(gold(plain, chosen_text)), list(gold(plain, rejected_text))
        agree = figures.agreement_with_gold(gold_c, gold_r)
        ceiling = figures.grouped_share_ci(agree, groups, seed=config.seed)
        out["ceiling"] = {"value": ceiling[0], "ci": list(ceiling[1:]), "pairs": len(agree),
                          "source": f"labels that agree with the gold function {config.gold}"}
        out["gold_accuracy"] = figures.gold_order_agreement(chosen, rejected, gold_c, gold_r)
    elif all(c in test.column_names for c in VOTE_COLUMNS):
        overlapped = [(a, g) for n, a, g in zip(test["n_votes"], test["agreement"], groups) if n and n >= 2]
        if overlapped:
            ceiling = figures.grouped_share_ci([a for a, _ in overlapped], [g for _, g in overlapped], seed=config.seed)
            out["ceiling"] = {"value": ceiling[0], "ci": list(ceiling[1:]), "pairs": len(overlapped),
                              "source": "inter-annotator agreement (votes that agree with the pair's label, on "
                                        "pairs with 2+ votes)"}
    if ceiling:
        out["share_of_ceiling"] = accuracy[0] / ceiling[0] if ceiling[0] else None
    if scorer.size > 1:
        pair_spread = (members_c - members_r).std(0)  # (B,) how much the members disagree on r_c - r_r
        out["ensemble"] = {
            "members": scorer.size,
            "member_accuracy": [figures.pairwise_accuracy(members_c[k], members_r[k]) for k in range(scorer.size)],
            "mean_response_spread": float(torch.cat([members_c, members_r], 1).std(0).mean()),
            "mean_pair_spread": float(pair_spread.mean()), **figures.spread_split_accuracy(hits, pair_spread)}
    out["verdict"] = figures.verdict(accuracy, ceiling[0] if ceiling else None)
    return out


def summary_line(metrics: dict) -> str:
    """The held-out evidence in one line, for the CLI and the loop."""
    if not metrics.get("test_pairs"):
        return "no test pairs: nothing says whether this reward model generalises"
    lo, hi = metrics["accuracy_ci"]
    ceiling = metrics.get("ceiling")
    beside = f", ceiling {ceiling['value']:.3f}" if ceiling else ""
    return (f"held-out accuracy {metrics['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {metrics['test_pairs']} pairs "
            f"({metrics['test_prompts']} prompts){beside}, loss {metrics.get('plain_loss', metrics['eval_loss']):.3f} "
            f"(ln 2 = 0.693: a coin flip), ECE {metrics['ece']:.3f}: "
            f"{metrics['verdict']}")


def run(config: RewardConfig) -> dict:
    """Train the reward model (or each member of an ensemble), then write metrics.json with the held-out evidence."""
    if config.ensemble > 1 and config.ensemble_kind == "seeds":
        return _run_ensemble(config)
    return _run_one(config)


def _run_one(config: RewardConfig) -> dict:
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
    trained = train_and_save(trainer, config, resume_from, desc="reward model", padding_side="right")
    out = Path(config.output_dir)
    # Under `accelerate launch` every process holds the same trained model and computes the figures below; only
    # the main one has written it.
    if trained.main:
        model = trained.model.eval()
    else:
        merge = getattr(trainer.model, "merge_and_unload", None)
        model = (merge() if merge else trainer.model).eval()
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and not config.save_steps and trained.main:
        # Checkpoints made only to find the best one: the model directory holds it now.
        for checkpoint in out.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)

    scorer = RewardModel(model, tokenizer, str(out))
    evidence = held_out(config, scorer, data["test"])
    normalization = _normalization(config, scorer, data, device)

    # Non-padding tokens of the chosen and rejected sequences that this call trained on.
    runtime = trained.result.metrics.get("train_runtime") or 0.0
    train_tokens = trainer.state.num_input_tokens_seen - counter.tokens_before
    metrics = {
        **evidence,
        "kept": ({"step": int(Path(best).name.split("-")[-1]), "eval_loss": trainer.state.best_metric,
                  "rule": "lowest held-out loss"} if best
                 else {"step": trainer.state.global_step, "rule": "last step"}),
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
    kept = (f"; kept step {metrics['kept']['step']} of {metrics['steps']} (lowest held-out loss)" if best else "")
    heads = f" with {scorer.size} heads" if scorer.size > 1 else ""
    print(f"Reward model{heads}: {metrics['steps']} steps on {n_kept} pairs in {metrics['seconds']:.0f} s "
          f"({metrics['tokens_per_second'] or 0:.0f} tokens/s); {loss_trend(metrics)}{kept}; reward mean "
          f"{normalization['mean']:.3f} std {normalization['std']:.3f} ({normalization['source']}) -> {out}\n  "
          f"{summary_line(metrics)}")
    if "ensemble" in metrics:
        e = metrics["ensemble"]
        print(f"  heads' held-out accuracy {min(e['member_accuracy']):.3f}-{max(e['member_accuracy']):.3f}, mean "
              f"spread of r_c - r_r {e['mean_pair_spread']:.3f}")
    return metrics


def _run_ensemble(config: RewardConfig) -> dict:
    """K members with seeds seed .. seed + K - 1 in output_dir/member-k, and ensemble.json naming them. With
    `resume`, a member that finished (its metrics.json written) is kept; the others resume from their checkpoints."""
    from rlhf.models import pick_device

    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"member-{k}" for k in range(config.ensemble)]
    members = []
    for k, name in enumerate(names):
        member = replace(config, ensemble=1, seed=config.seed + k, output_dir=str(out / name))
        done = out / name / "metrics.json"
        if config.resume and done.is_file():
            print(f"ensemble member {k + 1}/{config.ensemble}: done earlier, kept")
            members.append(json.loads(done.read_text()))
            continue
        print(f"ensemble member {k + 1}/{config.ensemble} (seed {member.seed}):")
        members.append(_run_one(replace(member, resume=config.resume if (out / name).is_dir() else "")))
    (out / ENSEMBLE_FILE).write_text(json.dumps({"members": names, "seeds": [m["config"]["seed"] for m in members]},
                                                indent=2) + "\n")
    from rlhf.data import load_preference_dataset

    scorer = RewardModel.load(str(out), device=config.device, precision=config.precision)
    test = load_preference_dataset(config.data, test_size=config.test_size, seed=config.seed)["test"]
    evidence = held_out(config, scorer, test)
    metrics = {**evidence, "members": [{"dir": n, **{k: m.get(k) for k in ("accuracy", "eval_loss", "seconds")}}
                                       for n, m in zip(names, members)],
               "train_pairs": members[0].get("train_pairs"),
               "normalization": {"source": "each member's own (metrics.json in its directory)"},
               "train_seconds": round(sum(m.get("train_seconds") or 0.0 for m in members), 2),
               "seconds": round(time.perf_counter() - start, 1), "config": asdict(config),
               "device": str(pick_device(config.device))}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    print(f"Reward ensemble of {config.ensemble} in {metrics['seconds']:.0f} s -> {out}\n  {summary_line(metrics)}")
    return metrics
