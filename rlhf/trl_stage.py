"""What the TRL-backed stages (sft, reward, dpo) share: their common options, LoRA, TrainingArguments, the tail.

A TRL-backed stage is a `<Stage>Config(TRLStageConfig)`, a `build_trainer(config) -> (trainer, data)` that loads the
data and the model and returns the TRL trainer configured by `training_args` (and `lora_config` with LoRA), and a
`run(config)` that calls `train_and_save`, adds its own figures and ends with `write_metrics`.

Options whose default differs from stage to stage stay in the stage's config; `training_args` and the tail also read
these, which every stage config declares: data, max_length, learning_rate, warmup_ratio, logging_steps, output_dir.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

from rlhf import losses
from rlhf.config import field
from rlhf.console import use_stage_progress
from rlhf.distributed import describe, honour_launch_on_cpu, loading_whole, weights_sharded
from rlhf.models import (
    DEFAULT_MODEL,
    EAGER_ATTENTION_MAX_TOKENS,
    eager_attention,
    precision_flags,
    reuse_freed_memory,
    save_model_dir,
)


@dataclass
class TRLStageConfig:
    """The options every TRL-backed stage has, with the same default and meaning (TRL's configs share a base too)."""

    # Model
    model: str = field(DEFAULT_MODEL, "The starting model (spec or directory): the policy for sft, dpo and kto; for "
                       "reward the backbone given a scalar head, a causal LM or an encoder such as minilm-l6.")
    device: str = field("auto", "auto (GPU if present) or cpu.")
    precision: str = field("auto", "auto (bf16 where the hardware has it, else fp32), fp32, bf16 or fp16.")
    lora: bool = field(False, "Train a LoRA adapter instead of all weights (merged into the saved model); a reward "
                       "model's fresh head trains in full beside it.")
    lora_r: int = field(16, "LoRA rank.")
    lora_alpha: int = field(32, "LoRA alpha.")
    gradient_checkpointing: bool = field(False, "Trade compute for memory (TRL turns it on by default; we don't).")
    # Optimization
    epochs: float = field(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = field(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    batch_size: int = field(8, "Training examples (sft: sequences, reward and dpo: pairs) per device per step.")
    gradient_accumulation_steps: int = field(1, "Steps accumulated per optimizer update.")
    seed: int = field(0, "Random seed (data order; for reward also the fresh head's initialisation and sampling).")
    # Output
    save_steps: int = field(0, "Save a checkpoint every this many steps (0: only the final model).")
    resume: str = field("", "Resume: '' (no), 'latest' or 'true' (newest checkpoint in output_dir), or a "
                        "checkpoint path.")
    report_to: str = field("none", "none, tensorboard, wandb, ... (as in transformers).")

    def __post_init__(self):
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise ValueError("give max_steps > 0, or max_steps = -1 with epochs > 0")
        if self.lora and (self.lora_r < 1 or self.lora_alpha < 1):
            raise ValueError("lora_r and lora_alpha must be >= 1")


def lora_config(r: int, alpha: int, task_type: str = "CAUSAL_LM", **extras):
    """PEFT's LoraConfig on every linear layer, without dropout; `extras` (e.g. modules_to_save) go to it as given.

    task_type SEQ_CLS makes PEFT train a sequence classifier's fresh head in full beside the adapter.
    """
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type=task_type,
                      **extras)


def training_args(args_cls, config: TRLStageConfig, device, *, eval_steps: int = 0, has_test: bool = False,
                  save_total_limit: int = 0, keep_best: bool = False, **extras):
    """`args_cls` (trl.SFTConfig, trl.RewardConfig, trl.DPOConfig, ...) holding the stage's own precision and the
    options every stage shares; `extras` are the stage's own TRL arguments.

    eval_steps > 0 evaluates every that many steps where there is a test split; save_total_limit 0 keeps every
    checkpoint. keep_best (with a test split) evaluates every eval_steps, else every save_steps, else every epoch,
    saves a checkpoint at each evaluation, and loads the one with the lowest eval_loss when training ends (transformers'
    load_best_model_at_end; the best checkpoint and the newest are kept).
    """
    best = keep_best and has_test
    if best and not eval_steps:
        eval_steps = config.save_steps  # checkpoints where the user asked for them, each one evaluated
    evaluation = "steps" if eval_steps and has_test else "epoch" if best else "no"
    if best:
        save = {"save_strategy": evaluation, "save_steps": eval_steps or 500, "load_best_model_at_end": True,
                "metric_for_best_model": "eval_loss", "greater_is_better": False,
                "save_total_limit": save_total_limit or 1}
    else:
        save = {"save_strategy": "steps" if config.save_steps else "no", "save_steps": config.save_steps or 500,
                "save_total_limit": save_total_limit or None}
    flags = precision_flags(device, config.precision)
    # Under `accelerate launch`, TrainingArguments read the launcher's mixed precision (ACCELERATE_MIXED_PRECISION,
    # bf16 in configs/accelerate/ddp.yaml) whenever bf16 and fp16 are both off, so `precision: fp32` became bf16.
    # The variable says the stage's precision only while the arguments are built.
    launcher = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no"
    with patch.dict(os.environ, ACCELERATE_MIXED_PRECISION=launcher):
        args = args_cls(
            output_dir=config.output_dir, per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.learning_rate, num_train_epochs=config.epochs, max_steps=config.max_steps,
            # transformers 5 takes a warmup ratio as a float in [0, 1) through warmup_steps.
            warmup_steps=config.warmup_ratio, max_length=config.max_length,
            activation_checkpointing=config.gradient_checkpointing, use_cpu=device.type == "cpu", **flags,
            seed=config.seed, logging_steps=config.logging_steps, report_to=config.report_to,
            eval_strategy=evaluation, eval_steps=eval_steps or None, dataloader_num_workers=0, **save, **extras,
        )
    # After the arguments, which reset accelerate's state.
    if device.type == "cpu" and honour_launch_on_cpu(launcher, getattr(args, "deepspeed_plugin", None)):
        args.deepspeed_plugin = None  # the state holds it: the trainer's Accelerator takes it from there
    return args


def add_lm_head_log_probs(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                          outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """TRL's `add_fused_lm_head` with the same contract (`model(..., labels=labels, fused_lm_head=True)` returns
    TRL's FusedCausalLMOutput of per-token log-probs), computed our way on a CPU.

    TRL's fused head projects the hidden states through the vocabulary in tiles so that a GPU never holds the whole
    logits. Without Triton it scores every position, prompt and padding included, and its backward multiplies in fp32,
    where a CPU's bf16 kernels are several times faster (what that cost DPO: docs/performance.md). Here only the
    labelled positions go through the model's own lm_head, as an index (a contiguous gather), in the autocast dtype,
    and the statistics come from their logits in fp32; the gradient flows through autograd. Elsewhere (a GPU,
    final-logit softcapping or scaling, mixture-of-experts routers, multimodal models) TRL's own head is installed."""
    from trl.trainer import utils as trl_utils

    text = model.config.get_text_config()
    scalings = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    scaled = any(getattr(text, name, None) is not None for name in scalings)
    if (model.device.type != "cpu" or scaled or getattr(text, "output_router_logits", False)
            or text is not model.config or cast_lm_head_to_fp32):
        trl_utils.add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)
        return
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # (B, L, D)
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100  # (B, L')
        where = mask.nonzero(as_tuple=True)
        targets = labels[where]  # (N,)
        logits = self.get_output_embeddings()(hidden[where]).float() / temperature  # (N, V)
        log_probs, log_z = losses.logprobs_and_logsumexp(logits, targets)  # (N,), (N,)
        per_token = {"log_probs": log_probs}
        if "entropy" in outputs:
            per_token["entropy"] = losses.entropy_from_logits(logits, log_z)
        with torch.no_grad():
            if "log_sum_sq_probs" in outputs:
                per_token["log_sum_sq_probs"] = (2 * (logits - log_z[:, None])).logsumexp(-1)
            if "mean_logits" in outputs:
                per_token["mean_logits"] = logits.mean(-1)
            if "is_top1" in outputs:  # the first maximum, as TRL counts it
                per_token["is_top1"] = logits.argmax(-1) == targets
        full = {name: value.new_zeros(mask.shape).masked_scatter(mask, value) for name, value in per_token.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return trl_utils.FusedCausalLMOutput(loss=-full["log_probs"].sum() / count, label_mask=mask, **full)

    model.forward = types.MethodType(forward, model)


@contextlib.contextmanager
def lm_head_log_probs(trl_module):
    """While a TRL trainer of `trl_module` (trl.trainer.dpo_trainer or kto_trainer) is built, it installs
    `add_lm_head_log_probs` where it would install its fused LM head (DPO precomputes the reference log-probs inside
    its constructor, so the head must be ours from the start)."""
    with patch.object(trl_module, "add_fused_lm_head", add_lm_head_log_probs):
        yield


def mixed_precision(args) -> str:
    """The precision TrainingArguments train in: bf16, fp16 or fp32."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def pick(entry: dict, keys: tuple[str, ...], prefix: str = "") -> dict:
    """The `keys` of a log entry (`prefix` + key, e.g. eval_loss), under their plain names, in the order of `keys`."""
    return {k: entry[prefix + k] for k in keys if prefix + k in entry}


@dataclass
class Trained:
    """What `train_and_save` leaves to the stage's own figures."""

    result: Any  # trainer.train's TrainOutput (training_loss, metrics)
    eval_metrics: dict  # trainer.evaluate()'s on the test split; {} when not asked for
    model: Any  # the saved model, a LoRA adapter merged into it, on the main process; None on the others (with
    # sharded weights every process's own copy of the saved model: save_trained)
    main: bool  # the main process: the one that writes
    logs: list[dict]  # the per-step training entries of trainer.state.log_history

    def first_and_final(self, keys: tuple[str, ...]) -> dict:
        """{"first": ..., "final": ...}: the first and last training logs cut to `keys`."""
        return {"first": pick(self.logs[0], keys) if self.logs else {},
                "final": pick(self.logs[-1], keys) if self.logs else {}}


def loss_trend(metrics: dict) -> str:
    """"loss first -> final" from the per-step logs, or the run's mean loss when it logged no step (fewer steps than
    logging_steps), so a short run's summary shows what it measured rather than nan."""
    first, final = metrics["first"], metrics["final"]
    if "loss" in final:
        return f"loss {first['loss']:.3f} -> {final['loss']:.3f}"
    return f"loss {metrics['train_loss']:.3f} (mean of the run; no step was logged)"


def train_and_save(trainer, config: TRLStageConfig, resume_from: str | None, *, desc: str, evaluate: bool = False,
                   padding_side: str = "left") -> Trained:
    """Train (on from the checkpoint `resume_from`, under one progress bar named `desc`), evaluate on the test split
    if asked, and save the model directory (with the tokenizer padding on `padding_side`) into output_dir from the
    main process only."""
    use_stage_progress(trainer, desc)
    cpu = trainer.args.device.type == "cpu"
    with (reuse_freed_memory(cpu),  # large tensors reused, not mapped afresh
          eager_attention(training_models(trainer, config))):
        result = trainer.train(resume_from_checkpoint=resume_from)
    eval_metrics = trainer.evaluate() if evaluate else {}
    main = trainer.is_world_process_zero()
    model = save_trained(trainer, Path(config.output_dir), padding_side)
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return Trained(result, eval_metrics, model, main, logs)


def training_models(trainer, config: TRLStageConfig) -> list:
    """The model whose attention `train_and_save` switches to eager while training, as RL's training forwards do
    (rlhf.models.eager_attention): on a CPU under bf16 or fp16 autocast, for sequences up to
    EAGER_ATTENTION_MAX_TOKENS, without gradient checkpointing (eager keeps each layer's attention probabilities for
    the backward); none otherwise. The evaluation after training and DPO's reference log-probs, forward passes
    only, stay on sdpa."""
    args = trainer.args
    if (args.device.type != "cpu" or not (args.bf16 or args.fp16) or config.gradient_checkpointing
            or config.max_length > EAGER_ATTENTION_MAX_TOKENS):
        return []
    model = trainer.accelerator.unwrap_model(trainer.model)
    return [model.get_base_model() if hasattr(model, "get_base_model") else model]


def save_trained(trainer, out: Path, padding_side: str = "left"):
    """Save the trainer's model as a full model directory in `out` from the main process, and return the saved
    model there (None on the others).

    Under FSDP or DeepSpeed ZeRO-3 each process holds shards, and a sharded forward pass needs every process in step;
    so every process takes part in gathering the whole model, and afterwards every process (the main one too) loads
    the saved directory onto its device, returns it and makes it the trainer's model: forward passes after training
    (the reward stage's figures) then run on each process alone."""
    from rlhf.models import load

    accelerator, tokenizer = trainer.accelerator, trainer.processing_class
    main = trainer.is_world_process_zero()
    if not weights_sharded(accelerator):
        # Only the main process writes (processes writing one file at once can corrupt it).
        return save_model_dir(trainer.model, tokenizer, out, padding_side) if main else None
    # The DeepSpeed engine (model_wrapped) gathers ZeRO-3 shards; under FSDP model_wrapped is the model itself.
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)  # every process; the whole of it on the main one
    if main:
        save_model_dir(accelerator.unwrap_model(trainer.model), tokenizer, out, padding_side, state_dict=state_dict)
    del state_dict
    accelerator.wait_for_everyone()
    score = type(accelerator.unwrap_model(trainer.model)).__name__.endswith("ForSequenceClassification")
    with loading_whole(accelerator):
        model = load(str(out), head="score" if score else "causal-lm", device=str(trainer.args.device),
                     precision="fp32", padding_side=padding_side).model
    trainer.model = trainer.model_wrapped = model
    return model


def write_metrics(trainer, config: TRLStageConfig, metrics: dict) -> bool:
    """Write output_dir/metrics.json from the main process, then wait for every process; True on the main one."""
    main = trainer.is_world_process_zero()
    if main:
        metrics = {**metrics, "distributed": describe(trainer.accelerator)}
        (Path(config.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    trainer.accelerator.wait_for_everyone()  # no process goes on to load the model before it is written
    return main
