"""rlhf.sampler: the same distribution as transformers' sampling, the same tokens and log-probs as a full forward,
reproducible seeds, EOS handling, and packed bf16 weights that follow the model's updates."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from rlhf import losses, rollout, sampler
from rlhf.models import load
from rlhf.sample import render_prompt
from rlhf.sampler import FusedDecoder, draw, kv_cache, next_tokens, nucleus, packed_linears, sample, shared_prefix

PROMPTS = ["Hi", "Write a short review of the film Alien, in some detail please.", "What is the capital of France?"]


def _batch(tok):
    rows = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert len({len(r) for r in rows}) == 3  # really padded
    return rollout.left_pad(rows, tok.pad_token_id)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.7, 0.5), (1.3, 0.99), (0.8, 0.05)])
def test_nucleus_is_transformers_top_p(temperature, top_p):
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3
    scaled = logits / temperature
    ours = torch.zeros_like(logits)
    # k=4 is too few for most rows: the search must widen until every nucleus ends inside.
    kept, ids = nucleus(torch.softmax(scaled, -1), top_p, k=4)
    ours.scatter_(1, ids, kept)
    ours /= ours.sum(-1, keepdim=True)
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    assert torch.allclose(ours, torch.softmax(warped, -1), atol=1e-6)
    sizes = (ours > 0).sum(-1)
    assert (sizes > 4).any() if top_p >= 0.5 else (sizes == 1).all()  # the widening mattered; or one token left


def test_draw_follows_the_probabilities():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.0, 0.05])
    n = 200_000
    drawn = draw(probs.expand(n, -1) * 3.0, torch.Generator().manual_seed(1))  # unnormalised is fine
    freq = torch.bincount(drawn, minlength=6).double() / n
    assert freq[1] == freq[4] == 0  # zero-probability tokens never come out
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * sigma + 1e-12).all(), freq


def test_next_tokens_records_the_temperature_log_prob_before_the_nucleus():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    token, logp = next_tokens(logits, 0.7, top_p=0.8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(logp, torch.log_softmax(logits / 0.7, -1).gather(1, token[:, None]).squeeze(1))
    greedy, _ = next_tokens(logits, 0.0)
    assert torch.equal(greedy, logits.argmax(-1))


def test_greedy_equals_transformers_generate_on_padded_rows(tiny_model_dir):
    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    model, tok = loaded.model, loaded.tokenizer
    ids, mask = _batch(tok)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    ours = sample(model, ids, mask, max_new_tokens=16, temperature=0.0, eos_ids=[tok.eos_token_id],
                  pad_id=tok.pad_token_id)
    assert torch.equal(ours.tokens, hf[:, : ours.tokens.shape[1]])


def test_sampled_log_probs_equal_a_full_forward_and_seeds_reproduce(tiny_model_dir):
    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    model, tok = loaded.model, loaded.tokenizer
    ids, mask = _batch(tok)

    def draw_with(seed):
        return sample(model, ids, mask, max_new_tokens=12, temperature=0.7, eos_ids=[tok.eos_token_id],
                      pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))

    first = draw_with(0)
    assert torch.equal(first.tokens, draw_with(0).tokens)
    assert not torch.equal(first.tokens, draw_with(1).tokens)
    responses = first.tokens
    response_mask, ended = rollout.response_mask(responses, [tok.eos_token_id])
    assert torch.equal(ended, first.ended) and torch.equal(response_mask.sum(1), first.lengths)
    attention = torch.cat([mask, response_mask], 1)
    with torch.no_grad():
        logits = rollout.policy_logits(model, torch.cat([ids, responses], 1), attention,
                                       rollout.positions(attention), responses.shape[1])
    forward = losses.logprobs_from_logits(logits / 0.7, responses)
    assert torch.allclose(first.logprobs, forward * response_mask, atol=1e-4)


def test_the_fused_step_computes_the_models_forward(tiny_model_dir, monkeypatch):
    """The Llama-family decoding step (FusedDecoder) against transformers' forward through the same loop: the same
    greedy tokens, the same recorded log-probs, on left-padded rows (fp32)."""
    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    model, tok = loaded.model, loaded.tokenizer
    ids, mask = _batch(tok)
    assert FusedDecoder.build(model, kv_cache(model, 32), ids.shape[0]) is not None  # the tiny Llama takes it
    steps = []
    real_call = FusedDecoder.__call__
    monkeypatch.setattr(FusedDecoder, "__call__", lambda self, *a: steps.append(1) or real_call(self, *a))

    def run(fused: bool):
        return sample(model, ids, mask, max_new_tokens=12, temperature=0.7, eos_ids=[], pad_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(3), fused=fused)

    fused = run(True)
    assert len(steps) == 11  # every token after the first came from the fused step
    plain = run(False)
    assert len(steps) == 11
    assert torch.equal(fused.tokens, plain.tokens)
    assert torch.allclose(fused.logprobs, plain.logprobs, atol=1e-5)
    assert fused.logprobs.abs().sum() > 0


def test_the_fused_step_leaves_training_mixed_dtypes_and_other_adapters_to_the_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = load(tiny_model_dir, device="cpu", precision="fp32").model
    cache = kv_cache(model, 32)
    assert FusedDecoder.build(model, cache, 2) is not None
    model.train()
    assert FusedDecoder.build(model, cache, 2) is None  # dropout would be skipped
    model.eval()
    with torch.autocast("cpu", torch.bfloat16):
        assert FusedDecoder.build(model, cache, 2) is None  # fp32 weights computing in bf16: the model's own path
    assert FusedDecoder.build(model, kv_cache(model, 32), 2) is not None
    dora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                            task_type="CAUSAL_LM")).eval()
    assert FusedDecoder.build(dora, kv_cache(model, 32), 2) is None  # DoRA's magnitude vector: not a plain sum


def _lora_policy(tiny_model_dir, precision: str):
    """The tiny Llama with RL's LoRA adapters (every linear layer), B drawn non-zero so the adapter counts."""
    from peft import get_peft_model

    from rlhf.trl_stage import lora_config

    loaded = load(tiny_model_dir, device="cpu", precision=precision)
    torch.manual_seed(0)
    policy = get_peft_model(loaded.model, lora_config(4, 8, "CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return policy, loaded.tokenizer


def test_the_fused_step_merges_a_lora_adapter(tiny_model_dir, monkeypatch):
    """RL samples its LoRA policy through the fused step, the adapter's update merged into the fused weights: in
    fp32 the same tokens and log-probs as the adapted model's own forward, and the adapter really counts."""
    policy, tok = _lora_policy(tiny_model_dir, "fp32")
    ids, mask = _batch(tok)
    steps = []
    real_call = FusedDecoder.__call__
    monkeypatch.setattr(FusedDecoder, "__call__", lambda self, *a: steps.append(1) or real_call(self, *a))

    def run(fused: bool, adapter: bool = True):
        with contextlib.nullcontext() if adapter else policy.disable_adapter():
            return sample(policy, ids, mask, max_new_tokens=12, temperature=0.7, eos_ids=[], pad_id=tok.pad_token_id,
                          generator=torch.Generator().manual_seed(3), fused=fused)

    fused = run(True)
    assert len(steps) == 11  # the adapted model took the fused step
    plain = run(False)
    assert torch.equal(fused.tokens, plain.tokens)
    assert torch.allclose(fused.logprobs, plain.logprobs, atol=1e-5)
    base = run(True, adapter=False)
    assert len(steps) == 22  # with the adapter switched off too (the reference policy)
    assert not torch.equal(base.tokens, fused.tokens)  # the adapter's update was not dropped


def test_the_fused_lora_step_in_bf16_is_as_close_to_fp32_as_the_models_own_bf16_forward(tiny_model_dir):
    """RL's case: a bf16 base, LoRA adapters, autocast to bf16. Two bf16 paths round differently, so their sampled
    tokens part after a near-tie; what is compared is how far each one's recorded log-probs are from the fp32
    adapted model's on the tokens it drew: the fused step (the adapter merged, then rounded) no further than the
    model's own forward (each product rounded apart)."""
    exact, tok = _lora_policy(tiny_model_dir, "fp32")
    policy, _ = _lora_policy(tiny_model_dir, "bf16")
    ids, mask = _batch(tok)

    def error(fused: bool) -> float:
        errors = []
        for seed in range(3):
            with torch.autocast("cpu", torch.bfloat16):
                drawn = sample(policy, ids, mask, max_new_tokens=12, temperature=0.7, eos_ids=[],
                               pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed), fused=fused)
            attention = torch.cat([mask, torch.ones_like(drawn.tokens)], 1)
            with torch.no_grad():
                logits = rollout.policy_logits(exact, torch.cat([ids, drawn.tokens], 1), attention,
                                               rollout.positions(attention), drawn.tokens.shape[1])
            truth = losses.logprobs_from_logits(logits / 0.7, drawn.tokens)
            errors.append(float((drawn.logprobs - truth).abs().mean()))
        return sum(errors) / len(errors)

    with torch.autocast("cpu", torch.bfloat16):
        assert FusedDecoder.build(policy, kv_cache(policy, 32), ids.shape[0]) is not None
    fused, plain = error(True), error(False)
    assert 0 < fused <= 1.5 * plain and fused < 0.1, (fused, plain)


def test_shared_prefix_counts_what_every_row_starts_with():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [5, 6, 7, 1, 2, 3, 4], [0, 5, 6, 7, 8, 2, 2]])
    mask = (ids != 0).long()
    assert shared_prefix(ids, mask) == 3  # 5 6 7
    assert shared_prefix(ids[:1], mask[:1]) == 0  # one row: nothing to share
    same = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert shared_prefix(same, torch.ones_like(same)) == 2  # each row keeps its last token to prefill


@pytest.mark.parametrize("fused", [True, False])
def test_a_shared_prefix_computed_once_gives_what_the_whole_prompt_does(tiny_model_dir, monkeypatch, fused):
    """Rows sharing a system prompt, left-padded to different lengths: the prefix's keys and values from one row
    (prefill_shared_prefix) give the same tokens and log-probs as prefilling every row whole (fp32)."""
    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    model, tok = loaded.model, loaded.tokenizer
    system = "You are a careful film critic who writes short and honest reviews of films."
    rows = [tok(render_prompt(tok, p, system), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ids, mask = rollout.left_pad(rows, tok.pad_token_id)
    assert shared_prefix(ids, mask) >= sampler.MIN_SHARED_PREFIX
    prefills = []
    real_prefill = sampler.prefill_shared_prefix
    monkeypatch.setattr(sampler, "prefill_shared_prefix", lambda *a: prefills.append(a[-1]) or real_prefill(*a))

    def run():
        return sample(model, ids, mask, max_new_tokens=10, temperature=0.7, eos_ids=[], pad_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(5), fused=fused)

    shared = run()
    assert prefills == [shared_prefix(ids, mask)]
    monkeypatch.setattr(sampler, "MIN_SHARED_PREFIX", 10**6)  # every row prefilled whole
    whole = run()
    assert len(prefills) == 1
    assert torch.equal(shared.tokens, whole.tokens)
    assert torch.allclose(shared.logprobs, whole.logprobs, atol=1e-5)


def test_distinct_rows_finds_each_prompt_once():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [0, 5, 6], [7, 8, 9]])
    first, inverse = sampler.distinct_rows(ids, (ids != 0).long())
    assert len(first) == 2 and torch.equal(ids[first][inverse], ids)
    assert sorted(first.tolist()) == [0, 2]  # the first row of each
    mask = torch.ones_like(ids)
    mask[1, 0] = 0  # the same ids, another mask: another prompt
    assert len(sampler.distinct_rows(ids, mask)[0]) == 3


@pytest.mark.parametrize("fused", [True, False])
def test_a_repeated_prompt_prefilled_once_gives_what_every_row_prefilled_does(tiny_model_dir, monkeypatch, fused):
    """Four samples of each of three prompts, as generate and RL ask for them: each prompt's forward runs once, on
    one row, and the rows repeating it get its keys and values; the tokens and log-probs are those of prefilling
    every row (fp32), and the samples still differ between a prompt's rows."""
    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    model, tok = loaded.model, loaded.tokenizer
    ids, mask = _batch(tok)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # (12, Q): consecutive repeats
    rows_forwarded = []
    real_forward = model.forward

    @functools.wraps(real_forward)  # the same signature: the sampler reads the cache argument's name from it
    def spy(*a, **k):
        rows_forwarded.append(k["input_ids"].shape[0])
        return real_forward(*a, **k)

    monkeypatch.setattr(model, "forward", spy)

    def run():
        return sample(model, ids, mask, max_new_tokens=10, temperature=1.0, eos_ids=[], pad_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(3), fused=fused)

    once = run()
    assert rows_forwarded[0] == 3  # the prompt's forward: one row per distinct prompt
    rows_forwarded.clear()
    every = sampler.distinct_rows
    monkeypatch.setattr(sampler, "distinct_rows", lambda i, m: (torch.arange(len(i)), torch.arange(len(i))))
    whole = run()
    assert rows_forwarded[0] == 12
    monkeypatch.setattr(sampler, "distinct_rows", every)
    assert torch.equal(once.tokens, whole.tokens)
    assert torch.allclose(once.logprobs, whole.logprobs, atol=1e-5)
    assert len({tuple(t) for t in once.tokens[:4].tolist()}) > 1  # one prompt, different samples


def test_rows_stop_at_their_eos_and_the_loop_at_the_last(tiny_model_dir):
    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    model, tok = loaded.model, loaded.tokenizer
    ids, mask = _batch(tok)
    vocab = model.config.vocab_size
    every = sample(model, ids, mask, max_new_tokens=10, temperature=1.0, eos_ids=range(vocab), pad_id=tok.pad_token_id)
    assert every.tokens.shape == (3, 1) and every.ended.all() and every.lengths.tolist() == [1, 1, 1]
    half = list(range(0, vocab, 2))
    out = sample(model, ids.repeat(4, 1), mask.repeat(4, 1), max_new_tokens=10, temperature=1.5, eos_ids=half,
                 pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert len(set(out.lengths.tolist())) > 1  # rows ended at different steps
    for row, logp, length, ended in zip(out.tokens, out.logprobs, out.lengths, out.ended):
        is_eos = torch.isin(row, torch.tensor(half)) & (row != tok.pad_token_id)
        assert bool(ended) == bool(is_eos[:length].any())
        if ended:
            assert int(is_eos.nonzero()[0, 0]) == length - 1  # the first EOS ends the row
        assert (row[length:] == tok.pad_token_id).all() and (logp[length:] == 0).all() and (logp[:length] < 0).all()
    never = sample(model, ids, mask, max_new_tokens=7, temperature=1.0, pad_id=tok.pad_token_id)
    assert never.tokens.shape == (3, 7) and not never.ended.any()


def test_packed_bf16_linears_match_and_follow_a_fused_adamw_step(tiny_model_dir):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 kernels, so nothing is packed")
    # As RL trains: fp32 weights, bf16 autocast, the fused AdamW (which does not bump tensor version counters).
    model = load(tiny_model_dir, device="cpu", precision="fp32").model
    ids = torch.randint(0, model.config.vocab_size, (4, 9))
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]

    def logits(packed: bool):
        packing = packed_linears(model, 4) if packed else contextlib.nullcontext()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), packing:
            if packed:
                assert all("forward" in m.__dict__ for m in linears)
            return model(input_ids=ids).logits.float()

    old = logits(True)
    assert torch.allclose(old, logits(False), atol=0.05, rtol=0.02)
    assert not any("forward" in m.__dict__ for m in linears)  # restored after the block
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    updated = logits(True)
    assert not torch.allclose(updated, old, atol=0.05)  # the step changed the output, so stale packs would show
    assert torch.allclose(updated, logits(False), atol=0.05, rtol=0.02)


def test_the_prompts_last_position_reaches_the_vocabulary_projection_contiguous(tiny_model_dir):
    """A frozen model (RL's LoRA base): torch's linear on a non-contiguous view with a weight that needs no grad
    copies the whole vocabulary projection for every row; the prompt's forward hands lm_head a contiguous input."""
    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    model, tok = loaded.model.requires_grad_(False), loaded.tokenizer
    ids, mask = _batch(tok)
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    try:
        for fused in (True, False):
            sample(model, ids, mask, max_new_tokens=3, temperature=0.7, eos_ids=[], pad_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(0), fused=fused)
    finally:
        hook.remove()
    assert len(seen) >= 3 and all(seen)  # the prompt's forward of the fused run and every step of the plain one
