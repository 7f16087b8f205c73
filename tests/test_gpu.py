"""On a CUDA machine: device-aware precision picks bf16, batched sampling works on the GPU, and so does our PPO
(full weights and LoRA) on one GPU at bf16; every stage runs on one GPU under `accelerate launch` with each launch
config (DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3), and vLLM samples where it is installed.

These run where a GPU is present (a lent accelerator machine, a user's workstation); CI has none.
tests/gpu_check.sh runs them all.
"""

from __future__ import annotations

import importlib.util
import json
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


# ---------------------------------------------------------------- every stage under every launch config


# On one GPU accelerate starts even a 1-process FSDP or DeepSpeed launch through torchrun, so the run is set up as
# the config says; plain DDP with one process is accelerate's NO.
ONE_GPU_LAYOUT = {
    "ddp.yaml": {"type": "NO", "processes": 1},
    "fsdp2.yaml": {"type": "FSDP", "processes": 1, "fsdp_version": 2},
    "deepspeed_zero2.yaml": {"type": "DEEPSPEED", "processes": 1, "zero_stage": 2},
    "deepspeed_zero3.yaml": {"type": "DEEPSPEED", "processes": 1, "zero_stage": 3},
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ONE_GPU_LAYOUT)
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_stage_on_one_gpu(tmp_path, stage, launcher, tiny_model_dir):
    """`accelerate launch --config_file configs/accelerate/<launcher> --num_processes 1 -m rlhf.cli <stage>` on the
    GPU at `auto` precision: the run is laid out as the config says and writes a full model directory that loads
    and computes finite outputs."""
    from test_distributed import _launch, _pairs

    if launcher.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed here (pip install deepspeed)")
    data = tmp_path / "data"
    data.mkdir()
    if stage == "sft":
        rows = [{"instruction": r["prompt"], "response": r["chosen"]} for r in _pairs(32, 0)]
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        for split, n, seed in (("train", 32, 0), ("test", 16, 1)):
            (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(n, seed)))
    options = {"model": tiny_model_dir, "device": "cuda", "precision": "auto", "output_dir": tmp_path / "out"}
    if stage == "ppo":
        options.update(reward_model="", reward_fn="length:8", prompts=data / "train.jsonl", steps=2, batch_size=4,
                       mini_batch_size=2, max_new_tokens=8)
    else:
        options.update(data=data, epochs=1, batch_size=4, max_length=64)
        if stage == "sft":
            options["test_size"] = 0.0
    flags = [a for k, v in options.items() for a in (f"--{k}", str(v))]
    _launch(launcher, "--num_processes", "1", "-m", "rlhf.cli", stage, "--config", f"configs/{stage}.yaml", *flags)
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["distributed"] == ONE_GPU_LAYOUT[launcher]
    loaded = load(str(out), head="score" if stage == "reward" else "causal-lm", device="cuda")
    batch = loaded.tokenizer(["Review film 0: the plot was wonderful"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batch).logits).all()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed here (pip install vllm)")
def test_vllm_backend_samples(tiny_model_dir):
    """`rlhf generate --backend vllm`'s path: vLLM loads the saved model and samples one response per prompt, each
    with its own seed (a prompt repeated twice gets two samples)."""
    from rlhf.sample import load_for_sampling

    loaded = load_for_sampling(tiny_model_dir, backend="vllm", memory=0.3)
    assert not isinstance(loaded.model, torch.nn.Module)  # vLLM's engine, not the transformers fallback
    texts = [render_prompt(loaded.tokenizer, "Write a short review of the film Alien.")] * 2
    out = generate_batch(loaded.model, loaded.tokenizer, texts, max_new_tokens=8, temperature=1.0, generator_seed=0)
    assert len(out) == 2 and all(0 < r["new_tokens"] <= 9 for r in out)
    assert out[0]["token_ids"] != out[1]["token_ids"]
