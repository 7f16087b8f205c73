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
