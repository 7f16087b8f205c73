"""Reward-model training throughput: tokens/s and utilisation for SmolLM2-135M and MiniLM-L6, side by side.

    python benchmarks/reward_bench.py                          # both backbones, 4 pairs x 64 tokens, 3 timed steps
    python benchmarks/reward_bench.py --models minilm-l6 --pairs 8 --tokens 128 --steps 5
    python benchmarks/reward_bench.py --device cuda            # on a GPU (bf16 where supported)

Each backbone gets a fresh scalar head and runs TRL's RewardTrainer steps (forward on chosen + rejected, the
Bradley-Terry loss, backward, AdamW) on fixed-length random token pairs, configured as `rlhf reward` configures
it. The first `--warmup` steps are not timed. Utilisation = 6 x N x tokens/s over the peak matmul FLOP/s measured
in the same run on the same device (fp32, or bf16 when training in bf16), with N the non-embedding parameters
(an embedding is a lookup, not a matmul; attention-score FLOPs, small at these lengths, are not counted).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from rlhf.models import DEFAULT_MODEL, MINILM_MODEL, load, pick_device, pick_dtype, precision_flags


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of one n x n matmul (2 n^3 FLOPs) on this device in this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def non_embedding_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside embedding tables)."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return total, total - embeddings


def bench(spec: str, device: torch.device, precision: str, pairs: int, tokens: int, warmup: int, steps: int) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback, set_seed
    from transformers.utils import logging as hf_logging

    set_seed(0)
    hf_logging.set_verbosity_error()
    loaded = load(spec, head="score", device=str(device), precision="fp32", padding_side="right")
    model, tokenizer = loaded.model, loaded.tokenizer
    total, dense = non_embedding_params(model)
    # Random ids that are never special tokens, so every sequence is exactly `tokens` long (no padding).
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), model.config.vocab_size)) if i not in special]
    rng = random.Random(0)
    n_rows = pairs * (warmup + steps)
    rows = {"chosen_ids": [[rng.choice(vocab) for _ in range(tokens)] for _ in range(n_rows)],
            "rejected_ids": [[rng.choice(vocab) for _ in range(tokens)] for _ in range(n_rows)]}
    args = trl.RewardConfig(
        output_dir="/tmp/reward-bench", per_device_train_batch_size=pairs, max_steps=warmup + steps,
        learning_rate=1e-5, activation_checkpointing=False, use_cpu=device.type == "cpu",
        **precision_flags(device, precision), save_strategy="no", report_to="none", logging_steps=10**6,
        disable_tqdm=True, dataloader_num_workers=0, max_length=None, seed=0,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.begin)

    timer = StepTimer()
    model.train()
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    timed = timer.times[warmup:]
    step = statistics.median(timed)
    per_step = 2 * pairs * tokens  # chosen and rejected sequences
    return {"model": spec, "params": total, "dense_params": dense, "step_s": step, "tokens_per_s": per_step / step,
            "flops_per_s": 6 * dense * per_step / step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, MINILM_MODEL])
    ap.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2x sequences)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    device = pick_device(args.device)
    dtype = pick_dtype(device, args.precision)
    peak = matmul_peak_flops(device, dtype)
    print(f"device {device}, training precision {str(dtype).replace('torch.', '')}, torch threads "
          f"{torch.get_num_threads()}; {args.pairs} pairs x 2 x {args.tokens} tokens per step, median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(f"measured matmul peak ({str(dtype).replace('torch.', '')}, 2048^2): {peak / 1e9:.1f} GFLOP/s")
    results = [bench(m, device, args.precision, args.pairs, args.tokens, args.warmup, args.steps) for m in args.models]
    print(f"{'backbone':<24} {'params':>8} {'non-emb':>8} {'step s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'util':>6}")
    for r in results:
        print(f"{r['model']:<24} {r['params'] / 1e6:7.1f}M {r['dense_params'] / 1e6:7.1f}M {r['step_s']:8.2f} "
              f"{r['tokens_per_s']:9.1f} {r['flops_per_s'] / 1e9:8.1f} {r['flops_per_s'] / peak:6.1%}")
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(f"{r['model']} / {base['model']}: {r['tokens_per_s'] / base['tokens_per_s']:.1f}x tokens/s, "
                  f"{r['flops_per_s'] / base['flops_per_s']:.2f}x utilisation")


if __name__ == "__main__":
    main()
