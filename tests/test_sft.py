"""SFT on the tiny model: it learns the demonstrations, saves a model that reloads, resumes; the shipped demos."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import UserError, load_config
from rlhf.models import load
from rlhf.sft import SHIPPED_DEMOS, SFTConfig, load_sft_dataset, run, to_prompt_completion

DEMO = {"messages": [
    {"role": "user", "content": "Write a short review of the film Alien."},
    {"role": "assistant", "content": "The film was wonderful, moving and funny; I loved every minute."},
]}


@torch.no_grad()
def _completion_nll(model_dir: str, row: dict) -> float:
    """Mean negative log-likelihood of the row's last assistant turn, by our own forward pass."""
    loaded = load(model_dir, device="cpu", precision="fp32")
    tok, messages = loaded.tokenizer, row["messages"]
    prompt_ids = tok(tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False).input_ids
    ids = torch.tensor([tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids])
    logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
    token_logp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt_ids) - 1 :]  # response tokens
    return -token_logp.mean().item()


def _config(tmp_path, data: str, model: str, name: str = "sft", **kw) -> SFTConfig:
    values = dict(model=model, data=data, output_dir=str(tmp_path / name), device="cpu", batch_size=4, max_steps=8,
                  learning_rate=3e-3, max_length=96, logging_steps=1, warmup_ratio=0.0)
    values.update(kw)
    return load_config(SFTConfig, **values)


def test_sft_learns_the_demonstrations_and_saves_a_model_that_reloads(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "demos.jsonl"
    rows = [DEMO] + [{"instruction": f"Review film {i}.", "response": f"A wonderful film, number {i}."}
                     for i in range(7)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run(_config(tmp_path, str(data), tiny_model_dir, test_size=0.0))
    out = tmp_path / "sft"
    saved = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == saved["steps"] and metrics["train_rows"] == 8
    losses = [h["loss"] for h in saved["log_history"] if "loss" in h and "train_loss" not in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert saved["steps"] == 8 and math.isfinite(saved["train_loss"]) and losses[-1] < losses[0]
    # The trained model predicts a training response better than the starting model does.
    assert _completion_nll(str(out), DEMO) < _completion_nll(tiny_model_dir, DEMO) - 0.5
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    reloaded = load(str(out), device="cpu")
    assert reloaded.tokenizer.chat_template and reloaded.tokenizer.padding_side == "left"
    assert "SFT: 8 steps" in capsys.readouterr().out


def test_sft_with_lora_on_the_shipped_demos_merges_and_evaluates(tmp_path, tiny_model_dir):
    metrics = run(_config(tmp_path, "demos", tiny_model_dir, lora=True, lora_r=4, lora_alpha=8, max_steps=3))
    out = tmp_path / "sft"
    assert not (out / "adapter_config.json").exists()  # merged into a plain model directory
    assert metrics["test_rows"] > 0 and math.isfinite(metrics["eval_loss"])
    assert metrics["eval"]["mean_token_accuracy"] >= 0
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_sft_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i} it is."}) + "\n" for i in range(8)))
    common = dict(save_steps=2, test_size=0.0, batch_size=2)
    assert run(_config(tmp_path, str(data), tiny_model_dir, "r", max_steps=2, **common))["steps"] == 2
    state_file = tmp_path / "r" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][-1]["resumed_from_here"] = True  # only a run that resumed from it carries this forward
    state_file.write_text(json.dumps(state))
    metrics = run(_config(tmp_path, str(data), tiny_model_dir, "r", max_steps=4, resume="latest", **common))
    assert metrics["steps"] == 4
    assert [h["step"] for h in metrics["log_history"] if "loss" in h and "train_loss" not in h] == [1, 2, 3, 4]
    assert [h["step"] for h in metrics["log_history"] if h.get("resumed_from_here")] == [2]


def test_shipped_demos_are_well_formed():
    rows = [json.loads(line) for line in SHIPPED_DEMOS.read_text(encoding="utf-8").splitlines()]
    assert 150 <= len(rows) <= 300
    prompts = [json.dumps(r["messages"][:-1]) for r in rows]
    assert len(set(prompts)) == len(prompts)  # no duplicated prompt
    for row in rows:
        converted = to_prompt_completion(row)
        assert converted["completion"][0]["role"] == "assistant" and converted["prompt"][-1]["role"] == "user"
    # The demo task is writing film reviews: a good share of the set.
    reviews = [r for r in rows if "review" in r["messages"][-2]["content"].lower()]
    assert len(reviews) >= 30
    data = load_sft_dataset("demos", test_size=0.05, seed=0)
    assert len(data["train"]) + len(data["test"]) == len(rows) and len(data["test"]) == round(0.05 * len(rows))


def test_row_formats_and_errors(tmp_path):
    assert to_prompt_completion({"instruction": "Add.", "input": "2 and 3", "response": "5"}) == {
        "prompt": [{"role": "user", "content": "Add.\n\n2 and 3"}],
        "completion": [{"role": "assistant", "content": "5"}]}
    system = to_prompt_completion({"messages": [{"role": "system", "content": "Be brief."}] + DEMO["messages"]})
    assert [m["role"] for m in system["prompt"]] == ["system", "user"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(DEMO) + "\n" + json.dumps({"messages": DEMO["messages"][:1]}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: .*end with the assistant"):
        load_sft_dataset(str(bad))
    with pytest.raises(UserError, match="not found"):
        load_sft_dataset("/nonexistent/demos.jsonl")
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "train.jsonl").write_text(json.dumps(DEMO) + "\n")
    (tmp_path / "split" / "validation.jsonl").write_text(json.dumps(DEMO) + "\n")
    assert {k: len(v) for k, v in load_sft_dataset(str(tmp_path / "split")).items()} == {"train": 1, "test": 1}


def test_bad_sft_options():
    for bad in (dict(learning_rate=0.0), dict(max_steps=0), dict(test_size=1.0), dict(warmup_ratio=-0.1),
                dict(lora=True, lora_r=0), dict(max_length=8)):
        with pytest.raises(UserError):
            load_config(SFTConfig, **bad)
