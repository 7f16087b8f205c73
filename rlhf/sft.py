"""Instruction fine-tuning (SFT) with TRL's SFTTrainer: next-token cross-entropy on demonstrations.

The model learns to write a demonstration's response given its prompt: InstructGPT's supervised fine-tuning step
(Ouyang et al. 2022, §3.5), the optional stage before preference learning. The loss covers the response's tokens
only (`completion_only_loss`); the prompt is context. The shipped set `demos` (rlhf/data/sft_demos.jsonl, 203
conversations written for this project) mixes everyday instructions with film reviews, the demo task.

Data: chat rows {"messages": [...]} (the last turn, the assistant's, is the target; earlier turns are context),
instruction rows {"instruction", "input" (optional), "response"}, or prompt/completion rows (text or messages).

Where this departs from TRL's defaults: precision follows the device (TRL 1.x defaults to bf16=True, which is
emulated and very slow on CPUs without native bf16), gradient checkpointing is off unless asked for, and the output
is always a full model directory (a LoRA adapter is merged) that the next stage loads by path.

    rlhf sft --config configs/sft.yaml                      # SmolLM2-135M on the shipped demos
    rlhf sft --config configs/sft.yaml --lora --learning_rate 2e-4 --output_dir runs/sft-lora
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.config import UserError, field, resume_checkpoint
from rlhf.trl_stage import (
    TRLStageConfig,
    lora_config,
    loss_trend,
    mixed_precision,
    pick,
    train_and_save,
    training_args,
    write_metrics,
)

SHIPPED_DEMOS = Path(__file__).parent / "data" / "sft_demos.jsonl"
_SPLITS = ("train", "test", "validation")
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_LOGGED = ("loss", "mean_token_accuracy", "entropy", "num_tokens")  # what metrics.json keeps of a log entry


@dataclass
class SFTConfig(TRLStageConfig):
    # The options every TRL-backed stage shares (model, device, LoRA, steps, batch, seed...): TRLStageConfig
    # Data
    data: str = field("demos", "Demonstrations: 'demos' (shipped), a .jsonl/.json/.csv/.parquet file, a directory "
                               "of train/test files, or a Hub id.")
    test_size: float = field(0.05, "Share of rows held out for the eval loss when the data has no test split.")
    max_length: int = field(512, "Truncate prompt + response to this many tokens.")
    completion_only_loss: bool = field(True, "Train on the response tokens only (false: the whole conversation).")
    # Optimization
    learning_rate: float = field(5e-5, "Peak learning rate (LoRA usually wants ~2e-4).")
    warmup_ratio: float = field(0.05, "Share of steps spent warming the learning rate up (0 to 1).")
    # Output
    output_dir: str = field("runs/sft", "Where the fine-tuned model, metrics.json and checkpoints go.")
    save_total_limit: int = field(2, "Keep at most this many checkpoints (0: keep all).")
    logging_steps: int = field(5, "Log every this many steps.")

    def __post_init__(self):
        if self.learning_rate <= 0 or self.batch_size < 1 or self.max_length < 16:
            raise ValueError("learning_rate must be > 0, batch_size >= 1, max_length >= 16")
        if not 0 <= self.test_size < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("test_size and warmup_ratio must be in [0, 1)")
        if min(self.save_steps, self.save_total_limit) < 0 or self.logging_steps < 1:
            raise ValueError("save_steps and save_total_limit must be >= 0, logging_steps >= 1")
        super().__post_init__()


def _messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_prompt_completion(row: dict) -> dict:
    """A demonstration as TRL's conversational prompt/completion: the last assistant turn is the completion."""
    if row.get("messages"):
        messages = _messages(row["messages"], "user")
        if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages[:-1]):
            raise ValueError("messages must contain a user turn and end with the assistant's turn")
        prompt, completion = messages[:-1], messages[-1:]
    elif row.get("instruction") is not None and row.get("response") is not None:
        text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        prompt = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + _messages(text, "user")
        completion = _messages(row["response"], "assistant")
    elif row.get("prompt") is not None and (row.get("completion") or row.get("response")) is not None:
        prompt = _messages(row["prompt"], "user")
        completion = _messages(row.get("completion") or row["response"], "assistant")
    else:
        raise ValueError("expected messages, instruction/response, or prompt/completion columns")
    if not all(isinstance(m["content"], str) and m["content"].strip() for m in prompt + completion):
        raise ValueError("empty message text")
    return {"prompt": prompt, "completion": completion}


def _convert(rows, where: str) -> list[dict]:
    out = []
    for i, row in rows:
        try:
            out.append(to_prompt_completion(row))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where}:{i}: {e}") from None
    return out


def load_sft_dataset(spec: str = "demos", test_size: float = 0.05, seed: int = 0):
    """Demonstrations as a DatasetDict(train, test) of conversational prompt/completion rows."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    from rlhf.data import _read_rows

    path = SHIPPED_DEMOS if spec == "demos" else Path(spec).expanduser()
    splits: dict[str, list[dict]] = {}
    if path.is_file():
        splits["train"] = _convert(_read_rows(path), str(path))
    elif path.is_dir() and not (path / "dataset_dict.json").is_file():
        for f in sorted(path.iterdir()):
            name = f.stem.split(".")[0]
            if f.suffix in _FILE_SUFFIXES and name in _SPLITS and f.stat().st_size:
                splits.setdefault("test" if name == "validation" else name, []).extend(_convert(_read_rows(f), str(f)))
    elif not path.is_dir() and (path.is_absolute() or spec.startswith(".")):
        raise UserError(f"demonstrations not found: {spec}")
    else:
        try:
            data = load_from_disk(str(path)) if path.is_dir() else load_dataset(spec)
        except Exception as e:  # the hub client raises many types; the user needs one line
            raise UserError(f"cannot load dataset {spec!r}: {str(e).splitlines()[0]}") from None
        data = data if isinstance(data, DatasetDict) else DatasetDict(train=data)
        for name, split in data.items():
            key = "test" if name == "validation" else name
            splits.setdefault(key, []).extend(_convert(enumerate(split, 1), f"{spec}[{name}] row"))
    if not splits.get("train"):
        raise UserError(f"{spec}: no training demonstrations (expected a train split or a file)")
    data = DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items() if name in ("train", "test")})
    if "test" not in data and test_size > 0 and len(data["train"]) > 1:
        n_test = max(1, round(len(data["train"]) * test_size))
        data = data["train"].train_test_split(test_size=n_test, seed=seed)
    return data


def build_trainer(config: SFTConfig):
    """The configured SFTTrainer and its DatasetDict (train, and test where there is one): what `run` trains."""
    import trl

    from rlhf.models import load, pick_device

    data = load_sft_dataset(config.data, config.test_size, config.seed)
    has_test = "test" in data and len(data["test"]) > 0
    device = pick_device(config.device)
    # fp32 master weights; bf16/fp16 come from autocast (the precision flags), as mixed-precision training expects.
    loaded = load(config.model, device=str(device), precision="fp32")
    model, tokenizer = loaded.model, loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{config.model}: its tokenizer has no chat template, which conversational SFT needs")
    peft_config = lora_config(config.lora_r, config.lora_alpha, "CAUSAL_LM") if config.lora else None
    args = training_args(trl.SFTConfig, config, device, save_total_limit=config.save_total_limit,
                         completion_only_loss=config.completion_only_loss)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data["train"],
                             eval_dataset=data["test"] if has_test else None, processing_class=tokenizer,
                             peft_config=peft_config)
    return trainer, data


def run(config: SFTConfig) -> dict:
    from rlhf.models import pick_device

    start = time.perf_counter()
    trainer, data = build_trainer(config)
    has_test = "test" in data and len(data["test"]) > 0
    trained = train_and_save(trainer, config, resume_checkpoint(config.output_dir, config.resume), desc="SFT",
                             evaluate=has_test)
    eval_metrics, summary = trained.eval_metrics, trained.first_and_final(_LOGGED)
    final = summary["final"]
    metrics = {
        "train_loss": trained.result.training_loss, "eval_loss": eval_metrics.get("eval_loss"),
        "steps": trainer.state.global_step, "train_rows": len(data["train"]),
        "test_rows": len(data["test"]) if has_test else 0,
        **summary, "eval": pick(eval_metrics, _LOGGED, "eval_"),
        "log_history": trainer.state.log_history, "seconds": round(time.perf_counter() - start, 1),
        "device": str(pick_device(config.device)), "mixed_precision": mixed_precision(trainer.args),
        "output_dir": str(Path(config.output_dir)), "config": asdict(config),
    }
    if not write_metrics(trainer, config, metrics):
        return metrics

    nan = float("nan")
    line = (f"SFT: {metrics['steps']} steps on {metrics['train_rows']} demonstrations in {metrics['seconds']:.0f} s; "
            f"{loss_trend(metrics)}")
    if metrics["eval"]:
        line += (f"; held-out loss {metrics['eval'].get('loss', nan):.3f}, token accuracy "
                 f"{metrics['eval'].get('mean_token_accuracy', nan):.2f} on {metrics['test_rows']} rows")
    print(line)
    print(f"  model and metrics.json -> {Path(config.output_dir)}")
    if not math.isfinite(final.get("loss", 0.0)):
        print("  warning: non-finite loss; lower the learning rate or check the data")
    return metrics
