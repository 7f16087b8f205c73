"""DPO step time: TRL's DPOTrainer with its defaults as they come, with this project's defaults, and with
precomputed reference log-probs, side by side on the same pairs, with the ratios.

  TRL defaults   trl.DPOConfig() untouched: bf16=True (autocast), gradient_checkpointing=True, the reference a
                 copy TRL loads itself, its log-probs computed every step.
  ours           rlhf.dpo.build_trainer with precompute_ref_log_probs off: device-aware precision (fp32 on a CPU
                 without native bf16), no gradient checkpointing, the reference a frozen copy.
  ours+precomp   rlhf dpo's defaults: as above, the reference run once over the data before training (its one-off
                 cost is printed apart, and amortised over one epoch).

A step is one optimizer update on `--pairs` pairs; the first `--warmup` steps of each run are not timed, the
median of the next `--steps` is. On a 2-core AVX2 CPU, TRL's emulated bf16 makes its steps many times slower, so
the default run keeps every size small (a few minutes in all).

    python benchmarks/dpo_bench.py                        # tiny random model + SmolLM2-135M
    python benchmarks/dpo_bench.py --models smollm2 --steps 5 --pairs 8 --response_words 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm bars from dataset maps and the trainer would drown the table
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOOD = "A wonderful, moving and funny film with a superb cast and a score I still hum."
BAD = "A dull, slow and confusing film with a wasted cast and a score I have already forgotten."


def tiny_model(directory: Path) -> str:
    """The test suite's tiny random Llama (2 layers, hidden 32), saved like any model directory."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_causal_lm, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    build_tiny_causal_lm(tokenizer).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return str(directory)


def write_pairs(directory: Path, n: int, words: int) -> str:
    """n film-review pairs from the shipped prompts, responses of about `words` words; no test split."""
    from rlhf.data import read_prompts

    def long(text: str) -> str:
        out = []
        while len(out) < words:
            out += text.split()
        return " ".join(out[:words])

    prompts = read_prompts("sentiment", split="train", limit=n)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "train.jsonl").open("w") as f:
        for i in range(n):
            row = {"prompt": prompts[i % len(prompts)], "chosen": long(GOOD), "rejected": long(BAD)}
            f.write(json.dumps(row) + "\n")
    (directory / "test.jsonl").write_text("")
    return str(directory)


def step_timer():
    """A TrainerCallback that records the wall time of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def time_trainer(build, steps: int, warmup: int) -> dict:
    start = time.perf_counter()
    trainer = build()
    setup = time.perf_counter() - start
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):  # the table below is the output
        trainer.remove_callback(quiet)
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    timed = timer.times[warmup:]
    return {"step": statistics.median(timed), "steps": timed, "setup": setup,
            "bf16": bool(trainer.args.bf16), "checkpointing": bool(trainer.args.gradient_checkpointing)}


def bench_model(name: str, model: str, args, work: Path) -> dict:
    import trl

    from rlhf.config import load_config
    from rlhf.data import load_preference_dataset
    from rlhf.dpo import DPOConfig, build_trainer
    from rlhf.models import pick_device, resolve

    total_steps = args.warmup + args.steps
    n_pairs = args.pairs * total_steps
    data = write_pairs(work / f"{name}-pairs", n_pairs, args.response_words)
    path = resolve(model)
    device = pick_device("auto")

    def trl_defaults():
        pairs = load_preference_dataset(data)["train"]
        # Only what a run needs: without use_cpu, transformers refuses bf16 on a machine with no GPU.
        config = trl.DPOConfig(output_dir=str(work / f"{name}-trl"), per_device_train_batch_size=args.pairs,
                               max_steps=total_steps, report_to="none", use_cpu=device.type == "cpu")
        return trl.DPOTrainer(model=path, args=config,
                              train_dataset=pairs.select_columns(["prompt", "chosen", "rejected"]))

    def ours(precompute: bool):
        config = load_config(DPOConfig, model=model, data=data, output_dir=str(work / f"{name}-ours-{precompute}"),
                             batch_size=args.pairs, max_steps=total_steps, precompute_ref_log_probs=precompute,
                             logging_steps=total_steps, max_length=1024)  # TRL's default: the same tokens
        return build_trainer(config)[0]

    rows = {}
    for label, build in (("TRL defaults", trl_defaults), ("ours", lambda: ours(False)),
                         ("ours+precomp", lambda: ours(True))):
        if args.skip_trl and label == "TRL defaults":
            continue
        print(f"  {name}: {label} ...", file=sys.stderr, flush=True)
        rows[label] = time_trainer(build, args.steps, args.warmup)
    # The precompute pass is the extra setup time over `ours` (same loading, one reference forward over the data).
    if "ours+precomp" in rows:
        rows["ours+precomp"]["precompute"] = max(0.0, rows["ours+precomp"]["setup"] - rows["ours"]["setup"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="Comma-separated: tiny, smollm2, or model specs.")
    parser.add_argument("--pairs", type=int, default=2, help="Pairs per step.")
    parser.add_argument("--steps", type=int, default=2, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed first steps per configuration.")
    parser.add_argument("--response_words", type=int, default=32, help="Words per chosen/rejected response.")
    parser.add_argument("--skip_trl", action="store_true", help="Leave out the TRL-defaults row (slow on CPUs).")
    args = parser.parse_args(argv)

    import torch

    from rlhf.models import DEFAULT_MODEL, cpu_has_native_bf16, pick_device

    device = pick_device("auto")
    print(f"device: {device}" + (f" (native bf16: {cpu_has_native_bf16()}, {torch.get_num_threads()} threads)"
                                 if device.type == "cpu" else f" ({torch.cuda.get_device_name()})"))
    print(f"{args.pairs} pairs per step, ~{args.response_words}-word responses, median of {args.steps} steps after "
          f"{args.warmup} warm-up step(s)\n")
    results = {}
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            spec = {"tiny": None, "smollm2": DEFAULT_MODEL}.get(name, name)
            spec = spec or tiny_model(work / "tiny-model")
            results[name] = bench_model(name, spec, args, work)

    header = (f"{'model':<10} {'configuration':<14} {'bf16':>5} {'ckpt':>5} {'s/step':>9} {'one-off':>9} "
              f"{'vs TRL':>8} {'vs ours':>8}")
    print(header)
    print("-" * len(header))
    for name, rows in results.items():
        trl_step = rows.get("TRL defaults", {}).get("step")
        ours_step = rows["ours"]["step"]
        for label, r in rows.items():
            vs_trl = f"{trl_step / r['step']:.1f}x" if trl_step else "-"
            one_off = f"{r['precompute']:.2f} s" if "precompute" in r else ""
            print(f"{name:<10} {label:<14} {str(r['bf16']):>5} {str(r['checkpointing']):>5} {r['step']:>8.3f}s "
                  f"{one_off:>9} {vs_trl:>8} {ours_step / r['step']:>7.2f}x")
        if "ours+precomp" in rows:
            r = rows["ours+precomp"]
            epoch_steps = args.warmup + args.steps
            amortised = r["step"] + r["precompute"] / epoch_steps
            print(f"{name:<10} {'  (precompute amortised over one epoch of ' + str(epoch_steps) + ' steps: '}"
                  f"{amortised:.3f} s/step, {ours_step / amortised:.2f}x ours)")
    print("\nvs TRL: TRL-defaults step time / this row's (higher = faster than TRL's defaults); "
          "vs ours: ours / this row's. one-off: the reference pass over the data before training.")


if __name__ == "__main__":
    main()
