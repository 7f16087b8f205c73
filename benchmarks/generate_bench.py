"""transformers' batched `generate` against rlhf.sampler, same model, prompts, batch and token count, side by side;
and the sampler without its fused decoding step (every step through the model's modules), to show what that step
adds.

    python benchmarks/generate_bench.py                        # SmolLM2-135M-Instruct, batches 16 and 32, 48 tokens
    python benchmarks/generate_bench.py --model PATH --batch 8 32 64 --new-tokens 64 --repeats 5
    python benchmarks/generate_bench.py --lora 16 --top-p 1.0 # RL's rollout: LoRA on a frozen base, autocast

Both sides sample exactly `--new-tokens` tokens per row (transformers: min_new_tokens; the sampler: no EOS) at
temperature 0.8, with top_p 1.0 (as RL rollouts sample) and 0.95 (as `rlhf generate` samples candidates), from the
same left-padded batch, alternating over the repeats so that machine noise hits both; prints medians and ranges of
tokens/s and the ratio. Beside them, two ceilings measured in the same run: compute-bound (2 FLOP per parameter
per token at the machine's measured matmul rate in the model's dtype) and memory-bound (every weight read once per
decoding step at the measured read bandwidth, the tighter one for small batches).
Target on a 2-core CPU with SmolLM2-135M: sampler >= 3x transformers at batch 16 to 32.

`--lora R`: the model as `rlhf ppo --lora` samples it, rank-R adapters (fp32) on every linear layer of the frozen
base, every side under autocast to the base's dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from rlhf.models import DEFAULT_MODEL, load
from rlhf.sample import render_prompt
from rlhf.sampler import sample

PROMPTS = Path(__file__).resolve().parent.parent / "rlhf" / "data" / "sentiment_prompts.jsonl"


@torch.no_grad()
def timed(side: str, model, enc, new_tokens: int, top_p: float, pad_id: int, autocast: bool = False) -> float:
    start = time.perf_counter()
    with torch.autocast(model.device.type, model.dtype) if autocast else contextlib.nullcontext():
        width = _draw(side, model, enc, new_tokens, top_p, pad_id)
    elapsed = time.perf_counter() - start
    assert width == new_tokens
    return elapsed


def _draw(side: str, model, enc, new_tokens: int, top_p: float, pad_id: int) -> int:
    if side == "hf":
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                             temperature=0.8, top_p=top_p, top_k=None, pad_token_id=pad_id)
        width = out.shape[1] - enc["input_ids"].shape[1]
    else:
        width = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=new_tokens, temperature=0.8,
                       top_p=top_p, pad_id=pad_id, fused=side == "sampler").tokens.shape[1]
    return width


def ceilings(model) -> tuple[float, float]:
    """(matmul GFLOP/s in the model's dtype, read bandwidth GB/s), measured here."""
    dtype = model.dtype
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    big = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.float32)  # 256 MiB, past every cache
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        flops = 2 * 2048**3 / (time.perf_counter() - start)
        start = time.perf_counter()
        big.sum()
        rates.append((flops / 1e9, big.numel() * 4 / (time.perf_counter() - start) / 1e9))
    return max(r[0] for r in rates), max(r[1] for r in rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--top-p", type=float, nargs="+", default=[1.0, 0.95])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="sample as RL does with LoRA: rank-R adapters on a frozen base, under autocast")
    args = ap.parse_args()

    loaded = load(args.model, device=args.device, precision=args.precision)
    model, tok = loaded.model, loaded.tokenizer
    if args.lora:
        from peft import get_peft_model

        from rlhf.trl_stage import lora_config

        model = get_peft_model(model, lora_config(args.lora, 2 * args.lora, "CAUSAL_LM")).eval()
    autocast = bool(args.lora) and model.dtype != torch.float32  # RL autocasts only to a lower precision
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    tok.padding_side = "left"
    gflops, bandwidth = ceilings(model)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                       if isinstance(m, torch.nn.Linear))
    adapters = f", LoRA r{args.lora} under autocast" if args.lora else ""
    print(f"model {args.model} ({params / 1e6:.0f} M parameters, {model.dtype}{adapters}) on {model.device}, "
          f"{args.new_tokens} new tokens, median [range] of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"measured here: matmul {gflops:.0f} GFLOP/s, read bandwidth {bandwidth:.1f} GB/s, "
          f"{weight_bytes / 1e6:.0f} MB of linear weights read per decoding step")
    print(f"{'batch':>5} {'top_p':>5}  {'transformers tok/s':>22}  {'rlhf.sampler tok/s':>22}  {'ratio':>6}  "
          f"{'sampler unfused tok/s':>22}  {'fused/unfused':>13}  {'compute-bound':>13}  {'memory-bound':>12}")
    for batch in args.batch:
        texts = [render_prompt(tok, p) for p in (prompts * (batch // len(prompts) + 1))[:batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        for top_p in args.top_p:
            for side in ("hf", "sampler", "unfused"):  # warm-up
                timed(side, model, enc, 4, top_p, tok.pad_token_id, autocast)
            times = {"hf": [], "sampler": [], "unfused": []}
            for _ in range(args.repeats):
                for side in times:
                    times[side].append(timed(side, model, enc, args.new_tokens, top_p, tok.pad_token_id, autocast))
            tokens = batch * args.new_tokens
            rate = {side: sorted(tokens / t for t in ts) for side, ts in times.items()}
            cell = {side: f"{statistics.median(r):7.0f} [{r[0]:.0f}, {r[-1]:.0f}]" for side, r in rate.items()}
            ratio = statistics.median(times["hf"]) / statistics.median(times["sampler"])
            fused_gain = statistics.median(times["unfused"]) / statistics.median(times["sampler"])
            compute_bound = gflops * 1e9 / (2 * params)
            memory_bound = batch * bandwidth * 1e9 / weight_bytes
            print(f"{batch:>5} {top_p:>5}  {cell['hf']:>22}  {cell['sampler']:>22}  {ratio:5.2f}x  "
                  f"{cell['unfused']:>22}  {fused_gain:12.2f}x  {compute_bound:13.0f}  {memory_bound:12.0f}",
                  flush=True)
    print("target: ratio >= 3x at batch 16 to 32")


if __name__ == "__main__":
    main()
