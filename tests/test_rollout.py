"""The pieces of an RL step (rlhf/rollout.py) on the tiny models: masks and padding, eager attention for CPU
training, sampled log-probs equal to a forward pass, reward-model scoring from token ids, the critic's start."""

from __future__ import annotations

import pytest
import torch

from rlhf import losses, rollout


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models are all overhead: on a 2-core machine a second BLAS thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_response_mask_stops_after_the_first_eos():
    responses = torch.tensor([[5, 9, 2, 7], [5, 6, 7, 8], [9, 9, 9, 2]])
    mask, ended = rollout.response_mask(responses, eos_ids=[9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]  # through the EOS, nothing after
    assert ended.tolist() == [True, False, True]


def test_left_pad_to_a_multiple_keeps_the_positions():
    rows = [[5, 6, 7], [8]]
    ids, mask = rollout.left_pad(rows, pad_id=0, multiple=8)
    assert ids.shape == (2, 8) and ids[0, -3:].tolist() == [5, 6, 7] and ids[1, -1].item() == 8
    assert mask.sum(1).tolist() == [3, 1]
    assert rollout.positions(mask)[0, -3:].tolist() == [0, 1, 2] and rollout.positions(mask)[1, -1].item() == 0
    assert rollout.left_pad(rows, pad_id=0)[0].shape == (2, 3)  # multiple 1: as long as the longest row


def test_eager_attention_only_for_cpu_low_precision_training_and_restored(tiny_model_dir, tiny_reward_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir, attn_implementation="sdpa")
    # Fixed inputs: bf16 eager and sdpa attention differ by rounding, and unseeded random ids made that difference
    # cross the tolerance now and then.
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[0, :4] = 0  # left padding
    args = (ids, attention, rollout.positions(attention), 5)
    seen, reference = [], None
    original = policy.model.forward

    def spy(*a, **k):
        seen.append(policy.config._attn_implementation)
        return original(*a, **k)

    policy.model.forward = spy
    for eager in (False, True):
        model = rollout.PolicyAndCritic(policy, critic, eager_training=eager)
        model(*args)  # fp32: never switched
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, values = model(*args)
        assert policy.config._attn_implementation == critic.config._attn_implementation == "sdpa"  # restored
        if eager:
            assert torch.allclose(logits.float(), reference[0].float(), atol=0.1)
            assert torch.allclose(values, reference[1], atol=0.05)
        reference = (logits, values)
    assert seen == ["sdpa", "sdpa", "sdpa", "eager"]


def test_lora_inputs_are_not_cast_to_fp32_under_autocast_and_the_gradients_are_unchanged(tiny_model_dir,
                                                                                          monkeypatch):
    import contextlib

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.trl_stage import lora_config

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    base.requires_grad_(False)
    policy = get_peft_model(base, lora_config(4, 8))
    for w in policy.parameters():
        if w.requires_grad:  # RL's case: fp32 adapters on a bf16 base, nonzero so the gradients flow into both
            w.data = torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel()))
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    layer.lora_A["default"].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    args = (ids, torch.ones_like(ids), rollout.positions(torch.ones_like(ids)), 4)
    model = rollout.PolicyAndCritic(policy)
    grads = []
    for casts_off in (False, True):
        if casts_off:
            monkeypatch.undo()
        else:  # what PEFT does on its own
            monkeypatch.setattr(rollout, "adapter_casts_off", lambda models, ids: contextlib.nullcontext())
        policy.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = model(*args)
        logits.float().sum().backward()
        grads.append([w.grad.clone() for w in policy.parameters() if w.requires_grad])
    assert seen == [torch.float32, torch.bfloat16]  # PEFT's cast to the adapter's dtype, then none
    assert layer.cast_input_dtype_enabled  # restored after the forward
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # bf16 -> fp32 -> bf16 was exact: the same gradients
    with torch.no_grad():
        model(*args)  # no autocast: PEFT's cast is what makes the dtypes match, so it stays
    assert seen[-1] == torch.float32


def test_sampled_logprobs_equal_a_forward_pass_with_left_padding(tiny_model_dir):
    from transformers import LogitsProcessorList

    from rlhf.models import load
    from rlhf.sample import render_prompt

    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    model, tok = loaded.model, loaded.tokenizer
    prompts = ["Hi", "Write a short review of the film Alien, in some detail please.", "What is the capital of France?"]
    rows = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    prompt_ids, prompt_mask = rollout.left_pad(rows, tok.pad_token_id)
    assert len({len(r) for r in rows}) == 3  # really padded
    torch.manual_seed(0)
    recorder = rollout.SampledLogprobs(temperature=0.7)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=10, do_sample=True,
                         temperature=0.7, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
                         logits_processor=LogitsProcessorList([recorder]))
    responses = out[:, prompt_ids.shape[1]:]
    sampled = recorder.result(responses)
    mask, _ = rollout.response_mask(responses, [tok.eos_token_id])
    ids = torch.cat([prompt_ids, responses], 1)
    attention = torch.cat([prompt_mask, mask], 1)
    with torch.no_grad():
        logits = rollout.policy_logits(model, ids, attention, rollout.positions(attention), responses.shape[1])
    forward = losses.logprobs_from_logits(logits / 0.7, responses)
    assert torch.allclose(sampled * mask, forward * mask, atol=1e-4)
    # and each padded row equals the same row alone, unpadded (position ids follow the attention mask)
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        alone = torch.tensor([row + responses[i, :n].tolist()])
        with torch.no_grad():
            ones = torch.ones_like(alone)
            logits = rollout.policy_logits(model, alone, ones, rollout.positions(ones), n)
        assert torch.allclose(losses.logprobs_from_logits(logits / 0.7, responses[i : i + 1, :n]), forward[i, :n],
                              atol=1e-4)


def test_reward_from_token_ids_equals_reward_model_score(tiny_reward_dir, tiny_tokenizer):
    from rlhf.reward import RewardModel
    from rlhf.sample import render_prompt

    rm = RewardModel.load(tiny_reward_dir, device="cpu", precision="fp32")
    rm.mean, rm.std = 0.3, 2.0
    prompts = ["Write a short review of the film Alien.",
               [{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain photosynthesis."}]]
    texts = ["The film was wonderful, moving and funny.", "The capital of France is Paris.", "Plants use sunlight."]
    prompt_ids = [tiny_tokenizer(render_prompt(tiny_tokenizer, p), add_special_tokens=False)["input_ids"]
                  for p in prompts]
    response_ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for normalize in (False, True):
        scorer = rollout.RewardScorer(rm, None, tiny_tokenizer, normalize=normalize)
        assert scorer.suffix is not None  # same tokenizer and template: the token-id path is taken
        expected = rm.score(prompts, texts, normalize=normalize)
        assert torch.allclose(scorer(prompts, prompt_ids, response_ids, texts), expected, atol=1e-5)
    # a policy tokenizer with another chat template falls back to scoring the text
    other = tiny_tokenizer.__class__.from_pretrained(tiny_reward_dir)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    scorer = rollout.RewardScorer(rm, None, other, normalize=False)
    assert scorer.suffix is None
    assert torch.allclose(scorer(prompts, prompt_ids, response_ids, texts), rm.score(prompts, texts), atol=1e-6)
    assert scorer.spread is None  # one model: no spread
    # An ensemble (a second member with another head) on the token-id path: the conservative aggregate of the
    # members' normalised scores, and their spread kept for the step's metrics.
    import copy

    second = copy.deepcopy(rm.model)
    with torch.no_grad():
        second.score.weight.mul_(-0.5)
    rm.add_member(second, mean=-0.1, std=0.5)
    scorer = rollout.RewardScorer(rm, None, tiny_tokenizer, normalize=True, aggregate="conservative", std_coef=2.0)
    members = rm.score_members(prompts, texts, normalize=True)
    assert (members[0] - members[1]).abs().min() > 1e-3
    expected = members.mean(0) - 2.0 * members.std(0)
    assert torch.allclose(scorer(prompts, prompt_ids, response_ids, texts), expected, atol=1e-5)
    assert torch.allclose(scorer.spread, members.std(0), atol=1e-5)


def test_critic_starts_as_the_reward_model(tiny_reward_dir, tiny_tokenizer):
    from rlhf.reward import RewardModel

    rm = RewardModel.load(tiny_reward_dir, device="cpu", precision="fp32")
    critic = rollout.build_critic("", rm, tiny_reward_dir, tiny_tokenizer, "cpu")
    assert critic is not rm.model
    ids = torch.tensor([rm.encode("Write a short review of the film Alien.", "It was great.")])
    ones = torch.ones_like(ids)
    with torch.no_grad():
        values = rollout.PolicyAndCritic(None, critic).values(ids, ones, rollout.positions(ones),
                                                              width=ids.shape[1] - 1)
    # the value of the prefix before the last token equals the reward model's score of that prefix
    prefix = ids[:, :-1]
    with torch.no_grad():
        assert torch.allclose(values[0, -1], rm.model(input_ids=prefix).logits[0, 0], atol=1e-5)
