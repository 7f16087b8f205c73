"""Direct Preference Optimization with TRL's DPOTrainer (Rafailov et al. 2023, "Direct Preference Optimization").

DPO fits the policy to preference pairs directly: with the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)),
the loss is -log sigmoid(r(x, y_chosen) - r(x, y_rejected)) (eq. 7); TRL also offers IPO, robust, hinge and more
(`loss_type`). The reference is a frozen copy of the starting policy, or, with LoRA, the same base with the
adapter switched off (no second copy in memory). `precompute_ref_log_probs` runs the reference once over the data
before training, which saves a forward pass per step.

Where this departs from TRL's defaults: precision follows the device (TRL's bf16=True made a step on this 2-core
CPU take minutes), gradient checkpointing is off unless asked for, and the result is always a full model
directory (a LoRA adapter is merged) that the next stage loads by path. The vote-strength `margin` column is not
used: TRL 1.16's DPO losses have no margin term (the reward model stage uses it).

Why "rewards/chosen" may fall while training goes well: docs/dpo.md.

    rlhf dpo --config configs/dpo.yaml --data runs/export --max_steps 20
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.config import UserError, field
from rlhf.models import DEFAULT_MODEL

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOConfig:
    # Model
    model: str = field(DEFAULT_MODEL, "The policy to align (spec or directory).")
    ref_model: str = field("", "Reference model; '' = a frozen copy of `model` (or the LoRA base).")
    device: str = field("auto", "auto (GPU if present) or cpu.")
    precision: str = field("auto", "auto (bf16 where the hardware has it, else fp32), fp32, bf16 or fp16.")
    lora: bool = field(False, "Train a LoRA adapter instead of all weights (merged into the saved model).")
    lora_r: int = field(16, "LoRA rank.")
    lora_alpha: int = field(32, "LoRA alpha.")
    gradient_checkpointing: bool = field(False, "Trade compute for memory (TRL turns it on by default; we don't).")
    # Data
    data: str = field("runs/export", "Preference data: an export directory, a .jsonl/.parquet file, or a Hub id.")
    max_length: int = field(256, "Truncate prompt + response to this many tokens.")
    # Optimization
    loss_type: str = field("sigmoid", "DPO loss: " + ", ".join(LOSS_TYPES) + ".")
    beta: float = field(0.1, "KL strength: how far the policy may move from the reference.")
    learning_rate: float = field(5e-6, "Peak learning rate.")
    epochs: float = field(1.0, "Passes over the training pairs (ignored when max_steps > 0).")
    max_steps: int = field(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    batch_size: int = field(8, "Pairs per device per step.")
    gradient_accumulation_steps: int = field(1, "Steps accumulated per optimizer update.")
    warmup_ratio: float = field(0.0, "Share of steps spent warming the learning rate up (0 to 1).")
    precompute_ref_log_probs: bool = field(True, "Run the reference once over the data before training.")
    seed: int = field(0, "Random seed.")
    # Output
    output_dir: str = field("runs/dpo", "Where the aligned model, metrics.json and checkpoints go.")
    save_steps: int = field(0, "Save a checkpoint every this many steps (0: only the final model).")
    resume: str = field("", "Resume: '' (no), 'latest' (newest checkpoint in output_dir) or a checkpoint path.")
    logging_steps: int = field(1, "Log every this many steps.")
    report_to: str = field("none", "none, tensorboard, wandb, ... (as in transformers).")

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0 or self.learning_rate <= 0 or self.batch_size < 1 or self.max_length < 16:
            raise ValueError("beta and learning_rate must be > 0, batch_size >= 1, max_length >= 16")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise ValueError("give max_steps > 0, or max_steps = -1 with epochs > 0")


def _resume_path(config: DPOConfig) -> str | bool | None:
    if not config.resume:
        return None
    if config.resume == "latest":
        checkpoints = sorted(Path(config.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return str(checkpoints[-1]) if checkpoints else None
    if not Path(config.resume).is_dir():
        raise UserError(f"no checkpoint at {config.resume}")
    return config.resume


def run(config: DPOConfig) -> dict:
    import trl
    from transformers import AutoModelForCausalLM

    from rlhf.data import load_preference_dataset
    from rlhf.models import load, pick_device, precision_flags

    start = time.perf_counter()
    data = load_preference_dataset(config.data, seed=config.seed)
    keep = ["prompt", "chosen", "rejected"]
    data = data.remove_columns([c for c in data["train"].column_names if c not in keep])
    if len(data["train"]) == 0:
        raise UserError(f"{config.data}: no training pairs")
    device = pick_device(config.device)
    policy = load(config.model, device=str(device), precision=config.precision, padding_side="right")
    model, tokenizer = policy.model, policy.tokenizer
    ref_model = None
    if config.ref_model:
        ref_model = AutoModelForCausalLM.from_pretrained(load(config.ref_model, device="cpu").path,
                                                         dtype=model.dtype, use_safetensors=True)
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear",
                                 task_type="CAUSAL_LM", lora_dropout=0.0)
    has_test = "test" in data and len(data["test"]) > 0
    # transformers 5 takes a warmup ratio as a float in [0, 1) through warmup_steps.
    args = trl.DPOConfig(
        output_dir=config.output_dir, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate, num_train_epochs=config.epochs, max_steps=config.max_steps,
        warmup_steps=config.warmup_ratio, beta=config.beta, loss_type=[config.loss_type], max_length=config.max_length,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        gradient_checkpointing=config.gradient_checkpointing, use_cpu=device.type == "cpu",
        **precision_flags(device, config.precision), seed=config.seed, logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or 500,
        report_to=config.report_to, eval_strategy="no", dataloader_num_workers=0,
    )
    model.train()
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data["train"],
                             eval_dataset=data["test"] if has_test else None, processing_class=tokenizer,
                             peft_config=peft_config)
    result = trainer.train(resume_from_checkpoint=_resume_path(config))
    eval_metrics = trainer.evaluate() if has_test else {}

    # Always a full model directory: merge a LoRA adapter into its base before saving.
    trained = trainer.model
    if config.lora:
        trained = trained.merge_and_unload()
    out = Path(config.output_dir)
    trained.save_pretrained(out, safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    metrics = {
        "train_loss": result.training_loss, "steps": trainer.state.global_step, "train_pairs": len(data["train"]),
        "final": {k: v for k, v in last.items() if k.startswith(("rewards/", "logps/", "loss"))},
        "first": {k: v for k, v in (logs[0] if logs else {}).items() if k.startswith(("rewards/", "loss"))},
        "eval": eval_metrics, "seconds": round(time.perf_counter() - start, 1), "config": asdict(config),
        "device": str(device), "dtype": str(next(trained.parameters()).dtype).replace("torch.", ""),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    final = metrics["final"]
    print(f"DPO: {metrics['steps']} steps on {len(data['train'])} pairs in {metrics['seconds']:.0f} s; loss "
          f"{metrics['first'].get('loss', float('nan')):.3f} -> {final.get('loss', float('nan')):.3f}, reward accuracy "
          f"{final.get('rewards/accuracies', float('nan')):.2f}, margin {final.get('rewards/margins', float('nan')):.3f} "
          f"-> {out}")
    return metrics
