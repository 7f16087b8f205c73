"""On a CUDA machine: device-aware precision picks bf16, and batched sampling works on the GPU.

These run where a GPU is present (a lent accelerator machine, a user's workstation); CI has none.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.models import load, pick_device, pick_dtype
from rlhf.sample import generate_batch, render_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_device_and_precision_on_gpu(tiny_model_dir):
    assert pick_device("auto").type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert pick_dtype("cuda") == expected
    loaded = load(tiny_model_dir)
    assert loaded.model.device.type == "cuda" and loaded.model.dtype == expected


def test_batched_greedy_equals_one_at_a_time_on_gpu_fp32(tiny_model_dir):
    loaded = load(tiny_model_dir, precision="fp32")
    texts = [render_prompt(loaded.tokenizer, p) for p in ["Hi", "Write a short review of the film Alien, please."]]
    batched = generate_batch(loaded.model, loaded.tokenizer, texts, max_new_tokens=10, temperature=0.0)
    for text, got in zip(texts, batched):
        assert got == generate_batch(loaded.model, loaded.tokenizer, [text], max_new_tokens=10, temperature=0.0)[0]
