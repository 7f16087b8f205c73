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


LM_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _two_heads(tiny_tokenizer, temperature: float):
    """The tiny model twice, one with TRL's fused LM head and one with ours."""
    import copy

    from conftest import build_tiny_causal_lm
    from trl.trainer.utils import add_fused_lm_head

    from rlhf.trl_stage import add_lm_head_log_probs

    theirs = build_tiny_causal_lm(tiny_tokenizer)
    ours = copy.deepcopy(theirs)
    add_fused_lm_head(theirs, temperature=temperature, outputs=LM_HEAD_OUTPUTS)
    add_lm_head_log_probs(ours, temperature=temperature, outputs=LM_HEAD_OUTPUTS)
    return theirs, ours


def test_our_lm_head_gives_trls_fused_head_figures_and_gradients(tiny_tokenizer):
    """On a CPU, add_lm_head_log_probs projects only the labelled positions through the lm_head; every per-token
    figure TRL's fused head returns (log-probs, entropy, mean logits, top-1, log sum p^2), its loss and the
    gradients it sends back are the same (fp32)."""
    theirs, ours = _two_heads(tiny_tokenizer, temperature=0.7)
    ids = torch.randint(0, theirs.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(10) < 4, -100)  # a prompt of 4 tokens
    labels[0, 8:] = -100
    attention = torch.ones_like(ids)
    attention[0, 8:] = 0  # right padding
    out_theirs, out_ours = (m(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
                            for m in (theirs, ours))
    for name in LM_HEAD_OUTPUTS + ("loss", "label_mask"):
        a, b = getattr(out_theirs, name), getattr(out_ours, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    assert out_ours.log_probs[0, 7:].eq(0).all() and out_ours.log_probs[:, :3].eq(0).all()  # unlabelled: 0
    for out in (out_theirs, out_ours):
        (out.loss + out.entropy.sum()).backward()
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    plain = ours(input_ids=ids, attention_mask=attention)  # without fused_lm_head: the model's own forward
    assert plain.logits.shape == (3, 10, theirs.config.vocab_size)


def test_our_lm_head_leaves_softcapped_models_to_trls(tiny_tokenizer):
    from conftest import build_tiny_causal_lm

    from rlhf.trl_stage import add_lm_head_log_probs

    model = build_tiny_causal_lm(tiny_tokenizer)
    model.config.final_logit_softcapping = 30.0
    add_lm_head_log_probs(model)
    assert "add_fused_lm_head" in model.forward.__func__.__code__.co_qualname  # TRL's own


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_dpo_and_kto_train_through_our_lm_head_on_a_cpu(stage, tmp_path, tiny_model_dir, monkeypatch):
    """The reference log-probs, a training step and the evaluation run without TRL's chunked kernel."""
    import importlib

    from trl.trainer import utils as trl_utils

    from rlhf.kto import KTOConfig

    class Refused:
        @staticmethod
        def apply(*args):
            raise AssertionError("TRL's fused LM head ran on a CPU")

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Refused)

    data = _preferences(tmp_path / "pairs.jsonl")
    extra = {"from_pairs": True} if stage == "kto" else {}
    config = load_config({"dpo": DPOConfig, "kto": KTOConfig}[stage], model=tiny_model_dir, data=data,
                         output_dir=str(tmp_path / "out"), device="cpu", precision="fp32", batch_size=2, max_steps=1,
                         max_length=64, **extra)
    trainer, _ = importlib.import_module(f"rlhf.{stage}").build_trainer(config)
    assert trainer.train().training_loss > 0 and "eval_loss" in trainer.evaluate()


@pytest.mark.parametrize("precision, eager", [("bf16", True), ("fp32", False)])
def test_training_forwards_use_eager_attention_only_on_a_cpu_under_autocast(precision, eager, tmp_path,
                                                                           tiny_model_dir):
    """train_and_save switches a CPU run under bf16 autocast to eager attention while it trains, as RL does, and
    back to sdpa for the evaluation and the saved model; fp32 keeps sdpa throughout."""
    from rlhf.dpo import build_trainer
    from rlhf.trl_stage import train_and_save

    config = load_config(DPOConfig, model=tiny_model_dir, data=_preferences(tmp_path / "pairs.jsonl"),
                         output_dir=str(tmp_path / "out"), device="cpu", precision=precision, batch_size=2,
                         max_steps=2, max_length=64)
    trainer, _ = build_trainer(config)
    inner = trainer.model.model
    seen = []
    real = inner.forward

    def spy(*a, **k):
        seen.append((trainer.model.training, trainer.model.config._attn_implementation))
        return real(*a, **k)

    inner.forward = spy
    train_and_save(trainer, config, None, desc="DPO")
    assert {impl for training, impl in seen if training} == {"eager" if eager else "sdpa"}
    assert trainer.model.config._attn_implementation == "sdpa"
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved.get("_attn_implementation", "sdpa") in ("sdpa", None)
