"""The layer the TRL-backed stages share: options declared once, LoRA, TrainingArguments, build_trainer's shape."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from rlhf.cli import build_parser
from rlhf.config import load_config
from rlhf.dpo import DPOConfig
from rlhf.reward import RewardConfig
from rlhf.sft import SFTConfig
from rlhf.trl_stage import Trained, TRLStageConfig, lora_config, mixed_precision, pick, training_args

STAGES = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig}
# Fields every stage declares itself (their defaults differ) and the shared layer reads.
STAGE_OWN = ("data", "max_length", "learning_rate", "warmup_ratio", "logging_steps", "output_dir")
CPU = torch.device("cpu")


@pytest.mark.parametrize("stage", STAGES)
def test_shared_options_are_declared_once_with_one_default(stage):
    cls = STAGES[stage]
    assert issubclass(cls, TRLStageConfig)
    shared = {f.name: f for f in dataclasses.fields(TRLStageConfig)}
    assert not set(shared) & set(vars(cls).get("__annotations__", {})), "a shared option declared again in the stage"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert all(fields[name].default == f.default for name, f in shared.items())
    assert set(STAGE_OWN) <= set(fields) - set(shared)
    # `rlhf <stage> --help` lists every option, the shared ones included.
    parser = build_parser([stage])
    subparser = next(a for a in parser._actions if a.dest == "command").choices[stage]
    options = {s for action in subparser._actions for s in action.option_strings}
    assert {f"--{name}" for name in fields} <= options


def test_shared_checks_run_for_every_stage():
    for cls in STAGES.values():
        with pytest.raises(ValueError, match="max_steps"):
            cls(max_steps=0)
        with pytest.raises(ValueError, match="lora_r"):
            cls(lora=True, lora_alpha=0)
        cls(lora=False, lora_r=0)  # LoRA's sizes matter only with LoRA


def test_lora_config_is_what_each_stage_and_ppo_built():
    from peft import LoraConfig

    causal = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    assert lora_config(4, 8).to_dict() == causal.to_dict()
    assert lora_config(4, 8, "CAUSAL_LM").to_dict() == causal.to_dict()
    critic = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS",
                        modules_to_save=["score"])
    assert lora_config(16, 32, "SEQ_CLS", modules_to_save=["score"]).to_dict() == critic.to_dict()


def test_training_args_keep_the_stage_precision_over_the_launchers(monkeypatch):
    import trl

    # Under `accelerate launch` with configs/accelerate/ddp.yaml the launcher says bf16.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = load_config(SFTConfig, precision="fp32", output_dir="unused")
    args = training_args(trl.SFTConfig, config, CPU)
    assert (args.bf16, args.fp16, mixed_precision(args)) == (False, False, "fp32")
    bf16 = training_args(trl.SFTConfig, load_config(SFTConfig, precision="bf16", output_dir="unused"), CPU)
    assert (bf16.bf16, bf16.fp16, mixed_precision(bf16)) == (True, False, "bf16")
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"  # set only while the arguments are built


def test_training_args_map_the_shared_options():
    import trl

    config = load_config(DPOConfig, output_dir="out", precision="fp32", batch_size=3, gradient_accumulation_steps=2,
                         learning_rate=1e-4, epochs=2.0, warmup_ratio=0.25, seed=7, logging_steps=2, max_length=64)
    args = training_args(trl.DPOConfig, config, CPU, beta=0.3)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (3, 3)
    assert (args.gradient_accumulation_steps, args.learning_rate, args.num_train_epochs) == (2, 1e-4, 2.0)
    assert (args.warmup_steps, args.seed, args.logging_steps, args.max_length) == (0.25, 7, 2, 64)
    assert args.beta == 0.3 and args.use_cpu and args.dataloader_num_workers == 0 and args.report_to == []
    # TRL turns checkpointing on by default; the stages only where asked.
    assert args.gradient_checkpointing is False and args.activation_checkpointing is False
    # save_steps 0: only the final model; save_total_limit 0: keep every checkpoint; no test split: no evaluation.
    assert (args.save_strategy, args.save_steps, args.save_total_limit) == ("no", 500, None)
    assert (args.eval_strategy, args.eval_steps) == ("no", None)
    assert training_args(trl.DPOConfig, config, CPU, eval_steps=4, has_test=False).eval_strategy == "no"
    config = dataclasses.replace(config, save_steps=3, gradient_checkpointing=True)
    args = training_args(trl.DPOConfig, config, CPU, eval_steps=4, has_test=True, save_total_limit=2)
    assert (args.save_strategy, args.save_steps, args.save_total_limit) == ("steps", 3, 2)
    assert (args.eval_strategy, args.eval_steps) == ("steps", 4)
    assert args.activation_checkpointing is True


def test_pick_and_first_and_final():
    entry = {"mean_token_accuracy": 0.5, "loss": 2.0, "eval_loss": 3.0, "grad_norm": 1.0}
    assert list(pick(entry, ("loss", "mean_token_accuracy"))) == ["loss", "mean_token_accuracy"]
    assert pick(entry, ("loss", "entropy"), "eval_") == {"loss": 3.0}
    trained = Trained(result=None, eval_metrics={}, model=None, main=True, logs=[{"loss": 2.0}, {"loss": 1.0}])
    assert trained.first_and_final(("loss",)) == {"first": {"loss": 2.0}, "final": {"loss": 1.0}}
    assert Trained(None, {}, None, True, []).first_and_final(("loss",)) == {"first": {}, "final": {}}


def _preferences(path):
    rows = [{"prompt": f"Review film {i}", "chosen": f"A wonderful film {i}.", "rejected": f"A dull film {i}."}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_builds_trainer_then_data(stage, tmp_path, tiny_model_dir):
    import importlib

    import trl
    from datasets import DatasetDict

    if stage == "sft":
        rows = [{"prompt": f"Say {i}.", "completion": f"{i} it is."} for i in range(6)]
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = str(tmp_path / "d.jsonl")
    else:
        data = _preferences(tmp_path / "pairs.jsonl")
    config = load_config(STAGES[stage], model=tiny_model_dir, data=data, output_dir=str(tmp_path / "out"),
                         device="cpu", precision="fp32", batch_size=2, max_steps=1, max_length=64)
    trainer, dataset = importlib.import_module(f"rlhf.{stage}").build_trainer(config)
    assert isinstance(trainer, {"sft": trl.SFTTrainer, "reward": trl.RewardTrainer, "dpo": trl.DPOTrainer}[stage])
    assert isinstance(dataset, DatasetDict) and len(dataset["train"]) > 0
    assert trainer.args.output_dir == config.output_dir and trainer.args.max_steps == 1
