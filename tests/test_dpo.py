"""DPO on the tiny model: it trains, saves a loadable model, moves log-probs the right way, and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import UserError, load_config
from rlhf.dpo import DPOConfig, run
from rlhf.evaluate import response_logprobs
from rlhf.models import load

MARKER = " wonderful"


def _write_pairs(path, n: int = 24, prefer_marker: bool = True) -> None:
    with path.open("w") as f:
        for i in range(n):
            good, bad = f"The film{MARKER}{MARKER} number {i}.", f"The film dull number {i}."
            chosen, rejected = (good, bad) if prefer_marker else (bad, good)
            f.write(json.dumps({"prompt": f"Review film {i}", "chosen": chosen, "rejected": rejected}) + "\n")


def _logps(model_dir: str, tokenizer_dir: str, texts: list[str]) -> torch.Tensor:
    loaded = load(model_dir, device="cpu", precision="fp32")
    tok = loaded.tokenizer
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": "Review film 0"}], add_generation_prompt=True,
                                          tokenize=False)] * len(texts)
    p_ids = [tok(p, add_special_tokens=False).input_ids for p in prompt_ids]
    r_ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    return torch.tensor(response_logprobs(loaded.model, p_ids, r_ids, temperature=1.0))


def _train(tmp_path, tiny_model_dir, prefer_marker: bool, **kw):
    data = tmp_path / ("pairs.jsonl" if prefer_marker else "swapped.jsonl")
    _write_pairs(data, prefer_marker=prefer_marker)
    out = tmp_path / ("dpo" if prefer_marker else "dpo-swapped")
    config = load_config(DPOConfig, model=tiny_model_dir, data=str(data), output_dir=str(out), device="cpu",
                         batch_size=4, max_steps=12, learning_rate=5e-3, beta=0.1, max_length=64, **kw)
    return run(config), out


@pytest.mark.parametrize("prefer_marker", [True, False])
def test_dpo_moves_chosen_up_and_rejected_down(tmp_path, tiny_model_dir, prefer_marker):
    metrics, out = _train(tmp_path, tiny_model_dir, prefer_marker)
    marker_text, plain_text = [f"The film{MARKER}{MARKER} number 99."], ["The film dull number 99."]
    delta_marker = _logps(str(out), str(out), marker_text) - _logps(tiny_model_dir, tiny_model_dir, marker_text)
    delta_plain = _logps(str(out), str(out), plain_text) - _logps(tiny_model_dir, tiny_model_dir, plain_text)
    # On a held-out pair: the preferred kind of response gains log-probability relative to the reference,
    # the other kind loses it. Swapping the data must swap the directions (a flipped sign fails one of the two).
    if prefer_marker:
        assert delta_marker.item() > 0 > delta_plain.item()
    else:
        assert delta_plain.item() > 0 > delta_marker.item()
    assert metrics["steps"] == 12 and metrics["final"]["loss"] < metrics["first"]["loss"]
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["final"].values())


def test_dpo_saves_a_full_model_that_reloads_and_changed(tmp_path, tiny_model_dir):
    metrics, out = _train(tmp_path, tiny_model_dir, True, lora=True, lora_r=4, lora_alpha=8)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 12 and "rewards/accuracies" in saved["final"]
    assert not (out / "adapter_config.json").exists()  # the adapter was merged
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    after = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    reloaded = load(str(out), device="cpu")
    assert reloaded.tokenizer.padding_side == "left"


@pytest.mark.slow
def test_dpo_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    _write_pairs(data)
    common = dict(model=tiny_model_dir, data=str(data), output_dir=str(tmp_path / "r"), device="cpu", batch_size=4,
                  learning_rate=5e-3, max_length=64, save_steps=3)
    run(load_config(DPOConfig, max_steps=3, **common))
    assert (tmp_path / "r" / "checkpoint-3").is_dir()
    metrics = run(load_config(DPOConfig, max_steps=6, resume="latest", **common))
    assert metrics["steps"] == 6
    # Only the steps after the checkpoint ran in the second call: its log starts at step 4.
    state = json.loads((tmp_path / "r" / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_bad_dpo_options():
    for bad in (dict(loss_type="nope"), dict(beta=0.0), dict(max_steps=0), dict(warmup_ratio=1.5)):
        with pytest.raises(UserError):
            load_config(DPOConfig, **bad)
    with pytest.raises(UserError, match="dataset not found|not found"):
        run(load_config(DPOConfig, data="/nonexistent/pairs.jsonl"))
