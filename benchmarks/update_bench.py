"""One micro-batch of RL's update, forward and backward, as `rlhf ppo --lora` runs it (rank-R adapters in fp32 on
the frozen base in bf16, bf16 autocast, eager attention on a CPU), with and without what rlhf adds to PEFT's
forward: its input casts switched off under autocast (`rlhf.rollout.adapter_casts_off`) and the logged entropy
reusing the loss's logsumexp. Both sides alternate in one process, so machine noise hits both; prints medians,
ranges and the ratio, and checks first that both sides give bit-identical log-probs and gradients.

    python benchmarks/update_bench.py                       # SmolLM2-135M-Instruct, 16 rows x 104, 48 response tokens
    python benchmarks/update_bench.py --rows 16 --width 104 --response 48 --repeats 10 --lora 16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from rlhf import losses, rollout
from rlhf.models import DEFAULT_MODEL, load, pick_dtype
from rlhf.trl_stage import lora_config


def build(model_spec: str, rank: int):
    from peft import get_peft_model

    dtype = pick_dtype(torch.device("cpu"), "auto")
    base = load(model_spec, device="cpu", precision="bf16" if dtype == torch.bfloat16 else "fp32").model
    base.requires_grad_(False)
    policy = get_peft_model(base, lora_config(rank, 2 * rank))
    generator = torch.Generator().manual_seed(0)
    for w in policy.parameters():
        if w.requires_grad:  # as after some training: B nonzero, so gradients reach both adapter matrices
            w.data = torch.randn(w.shape, generator=generator) * 0.02
    return policy, dtype


def micro_batch(policy, dtype, ids, tokens, temperature: float, added: bool):
    """Logits, the loss's log-probs and their backward, then the logged entropy: update()'s arithmetic."""
    policy.zero_grad(set_to_none=True)
    mask, width = torch.ones_like(ids), tokens.shape[1]
    # PolicyAndCritic's training forward, with rlhf's switch or without it (PEFT's own forward, its casts kept).
    casts = rollout.adapter_casts_off([policy], ids) if added else contextlib.nullcontext()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), \
            rollout.eager_attention([policy.get_base_model()], ids, True), casts:
        logits = rollout.policy_logits(policy, ids, mask, rollout.positions(mask), width)
    logits = logits.float() / temperature
    if added:
        logprobs, lse = losses.logprobs_and_logsumexp(logits, tokens)
    else:
        logprobs, lse = losses.logprobs_from_logits(logits, tokens), None
    logprobs.sum().backward()
    with torch.no_grad():
        entropy = losses.entropy_from_logits(logits, None if lse is None else lse.detach())
    return logprobs.detach(), entropy, [w.grad.clone() for w in policy.parameters() if w.requires_grad]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--lora", type=int, default=16, help="adapter rank")
    parser.add_argument("--rows", type=int, default=16, help="micro-batch rows (the demo's mini_batch_size)")
    parser.add_argument("--width", type=int, default=104, help="prompt + response columns")
    parser.add_argument("--response", type=int, default=48, help="response tokens (the logits' positions)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not 0 < args.response < args.width:
        parser.error("--response must be between 1 and --width - 1")

    policy, dtype = build(args.model, args.lora)
    vocab = policy.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.rows, args.width), generator=generator)
    tokens = ids[:, -args.response :]
    plain, added = (micro_batch(policy, dtype, ids, tokens, 0.8, side) for side in (False, True))
    same = torch.equal(plain[0], added[0]) and all(torch.equal(a, b) for a, b in zip(plain[2], added[2]))
    print(f"{args.model}, LoRA r{args.lora}, {dtype}, {args.rows} x {args.width} ({args.response} response tokens); "
          f"log-probs and gradients bit-identical: {same}; entropy max |diff| "
          f"{float((plain[1] - added[1]).abs().max()):.1e}")
    times = {False: [], True: []}
    for r in range(args.repeats):
        for side in ((False, True) if r % 2 == 0 else (True, False)):
            start = time.perf_counter()
            micro_batch(policy, dtype, ids, tokens, 0.8, side)
            times[side].append(time.perf_counter() - start)
    faster = sum(a > b for a, b in zip(times[False], times[True]))
    for side, name in ((False, "PEFT's forward"), (True, "with rlhf's additions")):
        t = times[side]
        print(f"  {name:24s} median {statistics.median(t):.2f} s [{min(t):.2f}, {max(t):.2f}]")
    print(f"  ratio {statistics.median(times[False]) / statistics.median(times[True]):.2f}x; "
          f"faster in {faster} of {args.repeats} pairs")


if __name__ == "__main__":
    main()
