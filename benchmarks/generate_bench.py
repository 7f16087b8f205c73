"""Batched generation (one left-padded batch, KV cache) against one prompt at a time, same model and tokens.

    python benchmarks/generate_bench.py                      # SmolLM2-135M-Instruct, batch 16, 32 new tokens
    python benchmarks/generate_bench.py --model PATH --batch 8 --new-tokens 64 --repeats 3

Both sides generate exactly `--new-tokens` tokens per prompt (EOS suppressed by min_new_tokens), greedy, on the
same prompts, interleaved over repeats so machine noise hits both; prints tokens/s and the speed-up.
Target on a 2-core CPU with SmolLM2-135M: batched >= 4x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rlhf.models import DEFAULT_MODEL, load
from rlhf.sample import render_prompt

PROMPTS = Path(__file__).resolve().parent.parent / "rlhf" / "data" / "sentiment_prompts.jsonl"


@torch.no_grad()
def timed_generate(model, tokenizer, texts: list[str], new_tokens: int) -> float:
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    start = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    loaded = load(args.model, device=args.device)
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()][: args.batch]
    texts = [render_prompt(loaded.tokenizer, p) for p in prompts]
    timed_generate(loaded.model, loaded.tokenizer, texts[:2], 4)  # warm-up

    batched, single = [], []
    for _ in range(args.repeats):
        batched.append(timed_generate(loaded.model, loaded.tokenizer, texts, args.new_tokens))
        single.append(sum(timed_generate(loaded.model, loaded.tokenizer, [t], args.new_tokens) for t in texts))
    tokens = len(texts) * args.new_tokens
    b, s = statistics.median(batched), statistics.median(single)
    print(f"model {args.model} on {loaded.model.device}, {len(texts)} prompts x {args.new_tokens} new tokens, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'one prompt at a time':<24} {s:8.2f} s  {tokens / s:8.1f} tokens/s")
    print(f"{'batched (left-padded)':<24} {b:8.2f} s  {tokens / b:8.1f} tokens/s")
    print(f"speed-up batched / one-at-a-time: {s / b:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
