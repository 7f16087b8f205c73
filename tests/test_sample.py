"""Batched sampling: left padding must not change what a prompt generates."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf.config import load_config
from rlhf.models import load
from rlhf.sample import SampleConfig, generate_batch, render_prompt, run


def test_batched_greedy_equals_one_at_a_time(tiny_model_dir):
    loaded = load(tiny_model_dir, device="cpu")
    prompts = ["Hi", "Write a short review of the film Alien, please, in two sentences.", "What is the capital?"]
    texts = [render_prompt(loaded.tokenizer, p) for p in prompts]
    lengths = {len(loaded.tokenizer(t).input_ids) for t in texts}
    assert len(lengths) == 3, "prompts must differ in length for padding to matter"
    batched = generate_batch(loaded.model, loaded.tokenizer, texts, max_new_tokens=12, temperature=0.0)
    for text, got in zip(texts, batched):
        alone = generate_batch(loaded.model, loaded.tokenizer, [text], max_new_tokens=12, temperature=0.0)[0]
        assert got == alone


def test_render_uses_chat_template_and_system_prompt(tiny_model_dir):
    tok = load(tiny_model_dir, device="cpu").tokenizer
    text = render_prompt(tok, "Hello", system="Be kind.")
    assert text == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_run_is_seeded_and_returns_n_per_prompt(tiny_model_dir):
    config = load_config(SampleConfig, model=tiny_model_dir, prompt=["a", "b"], n=2, max_new_tokens=6, device="cpu")
    first, second = run(config), run(config)
    assert [r["prompt"] for r in first] == ["a", "a", "b", "b"]
    assert first == second
    assert all(1 <= r["new_tokens"] <= 6 for r in first)


@pytest.mark.parametrize("bad", [dict(prompt=[" "]), dict(n=0), dict(top_p=0.0), dict(temperature=-1.0)])
def test_bad_options_are_rejected(bad):
    with pytest.raises(Exception, match="SampleConfig"):
        load_config(SampleConfig, **bad)


def test_cli_sample_from_a_fresh_process(tiny_model_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "sample", "--model", tiny_model_dir, "--prompt", "Hello there",
         "--max_new_tokens", "5", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "### Hello there" in out.stdout and "tokens" in out.stdout


def test_vllm_backend_falls_back_to_the_sampler_with_one_warning(tiny_model_dir, monkeypatch):
    from rlhf import sample

    # None in sys.modules makes `import vllm` fail, as where vllm is not installed (it is imported only when asked).
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr(sample, "_warned_no_vllm", False)
    common = dict(model=tiny_model_dir, prompt=["a", "b"], n=2, max_new_tokens=6, device="cpu", temperature=0.9)
    default = run(load_config(SampleConfig, **common))
    with pytest.warns(UserWarning, match="vllm is not installed") as caught:
        first = run(load_config(SampleConfig, backend="vllm", **common))
        second = run(load_config(SampleConfig, backend="vllm", **common))
    assert len([w for w in caught if "vllm" in str(w.message)]) == 1  # warned once per process
    assert first == second == default


def test_generate_batch_takes_a_vllm_engine(tiny_model_dir, monkeypatch):
    """The vLLM path cannot run here (no vllm): a stand-in with vLLM's documented shapes checks our side of it —
    token-id prompts, one seed per prompt, the EOS counted as transformers' path counts it."""
    import types

    from rlhf.sample import generate_batch

    tok = load(tiny_model_dir, device="cpu").tokenizer
    hello, eos = tok("Hello", add_special_tokens=False)["input_ids"], tok.eos_token_id
    seen = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class Engine:  # vllm.LLM: generate(prompts, sampling_params, use_tqdm) -> [RequestOutput]
        def generate(self, prompts, params, use_tqdm=True):
            seen.update(prompts=prompts, params=params)
            done = types.SimpleNamespace(token_ids=hello, finish_reason="stop")  # vLLM may leave the EOS out
            cut = types.SimpleNamespace(token_ids=hello + hello, finish_reason="length")
            return [types.SimpleNamespace(outputs=[done]), types.SimpleNamespace(outputs=[cut])]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))
    texts = [render_prompt(tok, "a"), render_prompt(tok, "a")]
    out = generate_batch(Engine(), tok, texts, max_new_tokens=4, temperature=0.7, top_p=0.9, generator_seed=5)
    assert seen["prompts"][0] == {"prompt_token_ids": tok(texts[0], add_special_tokens=False)["input_ids"]}
    assert [p.seed for p in seen["params"]] == [5, 6]  # a repeated prompt still gets two different samples
    assert (seen["params"][0].max_tokens, seen["params"][0].temperature, seen["params"][0].top_p) == (4, 0.7, 0.9)
    assert out[0] == {"text": "Hello", "token_ids": hello + [eos], "new_tokens": len(hello) + 1, "ended_with_eos": True}
    assert out[1]["ended_with_eos"] is False and out[1]["token_ids"] == hello + hello


def test_a_generation_config_rule_the_sampler_lacks_samples_with_transformers(tiny_model_dir, monkeypatch):
    from rlhf import sample

    monkeypatch.setattr(sample, "_warned_settings", [])
    loaded = load(tiny_model_dir, device="cpu")
    tok = loaded.tokenizer
    texts = [render_prompt(tok, p) for p in ["Hi", "Hello there"]]
    # Every token but EOS suppressed: transformers' generate must stop at once; ignoring the rule would not.
    loaded.model.generation_config.suppress_tokens = [i for i in range(len(tok)) if i != tok.eos_token_id]
    with pytest.warns(UserWarning, match="suppress_tokens"):
        out = generate_batch(loaded.model, tok, texts, max_new_tokens=8, temperature=0.9, generator_seed=0)
    assert [r["new_tokens"] for r in out] == [1, 1] and all(r["ended_with_eos"] for r in out)
