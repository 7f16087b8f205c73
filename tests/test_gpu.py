"""On a CUDA machine: device-aware precision picks bf16, batched sampling works on the GPU, and so does our PPO
(full weights and LoRA) on one GPU at bf16.

These run where a GPU is present (a lent accelerator machine, a user's workstation); CI has none.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlhf import ppo
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


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo_with_a_reward_model_on_gpu(tmp_path, tiny_model_dir, tiny_reward_dir, lora):
    """Our PPO (rlhf/ppo.py) on one GPU at `auto` precision: sampling, the frozen bf16 reference and reward model,
    the fp32 policy and critic (for LoRA: fp32 adapters on a bf16 base) under autocast, the update and the
    saved (for LoRA: merged into the fp32 base) policy."""
    from safetensors.torch import load_file

    config = ppo.PPOConfig(model=tiny_model_dir, reward_model=tiny_reward_dir, reward_fn="", device="cuda",
                           precision="auto", steps=3, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=8,
                           learning_rate=1e-2 if lora else 1e-3, lora=lora, lora_r=4, lora_alpha=8,
                           missing_eos_penalty=1.0, output_dir=str(tmp_path / "ppo"))
    result = ppo.run(config)
    history = result["history"]
    print("step seconds:", [round(h["time/step_seconds"], 3) for h in history],
          "first-step KL:", history[0]["objective/kl"])
    assert torch.device(result["device"]).type == "cuda"
    assert result["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert result["reward_scoring"] == "token ids"
    assert [h["step"] for h in history] == [1, 2, 3]
    for h in history:
        for key, value in h.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (h["step"], key, value)
    # The reference is the starting policy; only low-precision rounding (cached sampling vs a full forward) is left.
    assert abs(history[0]["objective/kl"]) < 0.1

    out = Path(config.output_dir)
    trained = load_file(str(out / "model.safetensors"))
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert set(trained) == set(start)  # a plain model directory (a LoRA adapter merged in)
    assert not (out / "adapter_config.json").exists()
    assert all(trained[k].dtype == torch.float32 for k in trained)  # trained weights stay fp32
    assert any(not torch.allclose(trained[k], start[k]) for k in start)
    loaded = load(str(out), device="cuda")  # the next stage loads it by path
    assert loaded.model.device.type == "cuda"
    text = render_prompt(loaded.tokenizer, "Write a short review of the film Alien.")
    assert len(generate_batch(loaded.model, loaded.tokenizer, [text], max_new_tokens=4, temperature=0.0)) == 1
