"""Direct Preference Optimization with TRL's DPOTrainer (Rafailov et al. 2023, "Direct Preference Optimization").

DPO fits the policy to preference pairs directly. With the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)),
the loss is -log sigmoid(r(x, y_chosen) - r(x, y_rejected)) (eq. 7). TRL also offers IPO, robust, hinge, APO and
more (`loss_type`). The reference is a frozen copy of the starting policy, or, with LoRA, the same base with the
adapter switched off (no second copy in memory). `precompute_ref_log_probs` runs the reference once over the data
before training, which saves a forward pass per step and keeps no reference model in memory.

Where this departs from TRL's defaults: precision follows the device (TRL's bf16=True is emulated, and slow, on
CPUs without native bf16), gradient checkpointing is off unless asked for, and the result is always a full model
directory (a LoRA adapter is merged) that the next stage loads by path.

The vote-strength `margin` column: TRL 1.16's DPO losses have no margin term. With `margin_scale > 0` and the
sigmoid loss, this stage adds one the way ODPO does (Amini et al. 2024, "Direct Preference Optimization with an
Offset"): the loss becomes -log sigmoid(r_chosen - r_rejected - margin_scale * margin), so a strongly preferred pair
must be won by a wider gap. Other losses ignore the column (they are not built on that sigmoid). Off by default: the
export's margins (0, 0.5, 1 by strength) are in the reward model's units, and an offset of 1 at beta 0.1 asks for
10 nats of log-ratio gap, so choose `margin_scale` for your beta.

Why "rewards/chosen" may fall while training goes well: docs/dpo.md.

    rlhf dpo --config configs/dpo.yaml --data runs/export --max_steps 20
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

# TRL 1.16's DPOConfig.loss_type values (tests/test_dpo.py checks this list against the installed TRL).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
_LOGGED = ("loss",) + REWARD_KEYS + ("rewards/offset", "logps/chosen", "logps/rejected")  # kept in metrics.json


@dataclass
class DPOConfig(TRLStageConfig):
    # The options every TRL-backed stage shares (model, device, LoRA, steps, batch, seed...): TRLStageConfig
    # Model
    ref_model: str = field("", "Reference model; '' = a frozen copy of `model` (with LoRA: the base, adapter off).")
    # Data
    data: str = field("runs/export", "Preference data: an export directory, a .jsonl/.parquet file, or a Hub id.")
    max_length: int = field(256, "Truncate prompt + response to this many tokens.")
    margin_scale: float = field(0.0, "ODPO offset per unit of the data's `margin` column (sigmoid loss only); "
                                     "0 ignores margins.")
    # Optimization
    loss_type: LossType = field("sigmoid", "DPO loss (TRL's loss_type).")
    beta: float = field(0.1, "KL strength: how far the policy may move from the reference (IPO: its tau).")
    label_smoothing: float = field(0.0, "robust: assumed share of flipped labels, in [0, 0.5); exo_pair: its "
                                        "epsilon (> 0, e.g. 0.001); ignored by the other losses.")
    learning_rate: float = field(5e-6, "Peak learning rate.")
    warmup_ratio: float = field(0.0, "Share of steps spent warming the learning rate up (0 to 1).")
    precompute_ref_log_probs: bool = field(True, "Run the reference once over the data before training (saves a "
                                                 "forward pass per step).")
    # Output
    output_dir: str = field("runs/dpo", "Where the aligned model, metrics.json and checkpoints go.")
    save_total_limit: int = field(2, "Keep at most this many checkpoints (0: keep all).")
    logging_steps: int = field(1, "Log every this many steps.")
    eval_steps: int = field(0, "Evaluate on the test split every this many steps (0: once, at the end).")
    eval_pairs: int = field(0, "Evaluate on at most this many test pairs, a seeded draw (0: all of them; each costs "
                               "a reference and a policy forward).")

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0 or self.learning_rate <= 0 or self.batch_size < 1 or self.max_length < 16:
            raise ValueError("beta and learning_rate must be > 0, batch_size >= 1, max_length >= 16")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.loss_type == "robust" and not 0 <= self.label_smoothing < 0.5:
            raise ValueError("the robust loss needs label_smoothing in [0, 0.5)")
        if self.loss_type == "exo_pair" and not 0 < self.label_smoothing < 1:
            raise ValueError("the exo_pair loss needs label_smoothing in (0, 1), e.g. 0.001")
        if self.margin_scale < 0:
            raise ValueError("margin_scale must be >= 0")
        if min(self.save_steps, self.save_total_limit, self.eval_steps, self.eval_pairs) < 0 or self.logging_steps < 1:
            raise ValueError("save_steps, save_total_limit, eval_steps and eval_pairs must be >= 0, logging_steps >= 1")
        super().__post_init__()


def odpo_shift_reference(ref_chosen_logps, offsets, beta: float):
    """Raise log pi_ref(chosen) by offset/beta: TRL's -log sigmoid(beta * delta) then equals ODPO's loss.

    ODPO (Amini et al. 2024, the DPO loss with an offset): -log sigmoid(beta * (h_chosen - h_rejected) - offset),
    h = log pi - log pi_ref. beta * (log pi - (log pi_ref + offset / beta)) = beta * h_chosen - offset, so shifting the
    reference puts the offset inside TRL's sigmoid without copying its loss code.
    """
    return ref_chosen_logps + offsets / beta  # (B,)


def _offset_trainer(trl, margin_scale: float):
    """DPOTrainer with ODPO's per-pair offset (built here so that `import rlhf.dpo` stays free of TRL)."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class MarginCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["margin"] = torch.tensor([float(e["margin"]) for e in examples])  # (B,)
            return batch

    class OffsetDPOTrainer(trl.DPOTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "margin" not in self._signature_columns:  # else the Trainer drops the column before batching
                self._signature_columns.append("margin")

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != "margin"})

        def _compute_loss(self, model, inputs, return_outputs):
            inputs = dict(inputs)
            ref_chosen = inputs["ref_chosen_logps"]  # (B,)
            offsets = margin_scale * inputs.pop("margin").to(ref_chosen.device, ref_chosen.dtype)  # (B,)
            inputs["ref_chosen_logps"] = odpo_shift_reference(ref_chosen, offsets, self.beta)
            result = super()._compute_loss(model, inputs, return_outputs)
            # TRL's reward metrics now use the shifted reference; adding the batch's mean offset back gives
            # rewards/chosen and rewards/margins their DPO meaning again. rewards/accuracies stays ODPO's: the share
            # of pairs whose margin beats their offset.
            logged = self._metrics["train" if self.model.training else "eval"]
            mean_offset = self.accelerator.gather(offsets).mean().item()
            logged["rewards/chosen"][-1] += mean_offset
            logged["rewards/margins"][-1] += mean_offset
            logged["rewards/offset"].append(mean_offset)
            return result

    return OffsetDPOTrainer, MarginCollator


def build_trainer(config: DPOConfig):
    """The configured DPOTrainer and its DatasetDict: what `run` trains (and benchmarks/dpo_bench.py times)."""
    import trl
    from trl.trainer import dpo_trainer

    from rlhf.data import load_preference_dataset
    from rlhf.models import load, pick_device

    data = load_preference_dataset(config.data, seed=config.seed)
    if len(data["train"]) == 0:
        raise UserError(f"{config.data}: no training pairs")
    has_margin = "margin" in data["train"].column_names
    use_margin = config.margin_scale > 0 and has_margin and config.loss_type == "sigmoid"
    if config.margin_scale > 0 and has_margin and not use_margin:
        print(f"note: the margin column is ignored by the {config.loss_type} loss (the offset needs sigmoid)")
    if use_margin and not config.precompute_ref_log_probs:
        raise UserError("margin_scale > 0 needs precompute_ref_log_probs: true (the offset shifts the stored "
                        "reference log-probs), or set margin_scale: 0")
    keep = ["prompt", "chosen", "rejected"] + (["margin"] if use_margin else [])
    data = data.remove_columns([c for c in data["train"].column_names if c not in keep])
    if use_margin:  # a row without a margin has no offset
        data = data.map(lambda row: {"margin": float(row["margin"] or 0.0)})
    has_test = "test" in data and len(data["test"]) > 0
    if has_test and 0 < config.eval_pairs < len(data["test"]):
        data["test"] = data["test"].shuffle(seed=config.seed).select(range(config.eval_pairs))

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
    args = training_args(trl.DPOConfig, config, device, eval_steps=config.eval_steps, has_test=has_test,
                         save_total_limit=config.save_total_limit, beta=config.beta, loss_type=[config.loss_type],
                         label_smoothing=config.label_smoothing,
                         precompute_ref_log_probs=config.precompute_ref_log_probs)
    trainer_cls, collator = trl.DPOTrainer, None
    if use_margin:
        trainer_cls, collator_cls = _offset_trainer(trl, config.margin_scale)
        collator = collator_cls(pad_token_id=tokenizer.pad_token_id, max_length=config.max_length)
    train = _pairs_to_train(data["train"], config, args)
    if config.precompute_ref_log_probs and args.process_index == 0:  # once, not once per process
        held_out = f" and {len(data['test'])} held-out" if has_test else ""
        print(f"DPO: reference log-probs of {len(train)} training{held_out} pairs, computed once")
    # TRL's bar for that pass; our LM head on a CPU (trl_stage.add_lm_head_log_probs)
    with without_library_bars(), lm_head_log_probs(dpo_trainer):
        trainer = trainer_cls(model=model, ref_model=ref_model, args=args, data_collator=collator,
                              train_dataset=train, eval_dataset=data["test"] if has_test else None,
                              processing_class=tokenizer, peft_config=peft_config)
    return trainer, data


def _pairs_to_train(train, config: DPOConfig, args):
    """With max_steps, only the pairs those steps will see: TRL precomputes the reference log-probs of every pair it
    is given, which in the demo took longer than the 15 steps themselves (690 pairs for 120 trained). The subset is a
    seeded draw, so a resumed run trains on the same pairs."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if config.max_steps <= 0 or config.max_steps * per_step >= len(train):
        return train
    return train.shuffle(seed=config.seed).select(range(config.max_steps * per_step))


def run(config: DPOConfig) -> dict:
    start = time.perf_counter()
    trainer, data = build_trainer(config)
    args = trainer.args
    has_test = "test" in data and len(data["test"]) > 0
    trained = train_and_save(trainer, config, resume_checkpoint(config.output_dir, config.resume), desc="DPO",
                             evaluate=has_test)
    eval_metrics, summary = trained.eval_metrics, trained.first_and_final(_LOGGED)
    final = summary["final"]
    metrics = {
        "train_loss": trained.result.training_loss, "eval_loss": eval_metrics.get("eval_loss"),
        # The pairs max_steps reaches (all of them without it), and those the data holds.
        "steps": trainer.state.global_step, "train_pairs": len(trainer.train_dataset),
        "available_pairs": len(data["train"]),
        "test_pairs": len(data["test"]) if has_test else 0,
        **summary, "eval": pick(eval_metrics, _LOGGED, "eval_"),
        "log_history": trainer.state.log_history, "seconds": round(time.perf_counter() - start, 1),
        "device": str(args.device), "mixed_precision": mixed_precision(args),
        "margin_offset": "margin" in data["train"].column_names, "output_dir": str(Path(config.output_dir)),
        "config": asdict(config),
    }
    if not write_metrics(trainer, config, metrics):
        return metrics

    nan = float("nan")
    line = (f"DPO ({config.loss_type}, beta {config.beta}): {metrics['steps']} steps on {metrics['train_pairs']} pairs "
            + (f"(of {metrics['available_pairs']}) " if metrics["available_pairs"] > metrics["train_pairs"] else "")
            + f"in {metrics['seconds']:.0f} s; {loss_trend(metrics)}")
    if "rewards/accuracies" in final:
        line += (f"; reward accuracy {final['rewards/accuracies']:.2f}, margin "
                 f"{final.get('rewards/margins', nan):.3f} (chosen {final.get('rewards/chosen', nan):+.3f}, "
                 f"rejected {final.get('rewards/rejected', nan):+.3f})")
    if metrics["eval"]:
        line += (f"; held-out accuracy {metrics['eval'].get('rewards/accuracies', nan):.2f}, "
                 f"loss {metrics['eval'].get('loss', nan):.3f}")
    print(line)
    if final.get("rewards/chosen", 0.0) < 0 < final.get("rewards/margins", 0.0):
        print("  (a falling chosen reward with a growing margin is expected: docs/dpo.md)")
    print(f"  model and metrics.json -> {Path(config.output_dir)}")
    if not all(math.isfinite(v) for v in final.values()):
        print("  warning: non-finite metrics; lower the learning rate or check the data")
    return metrics
