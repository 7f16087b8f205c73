"""DPO on the tiny model: the preference sign, the reference, ODPO's offset, saving, resuming, options."""

from __future__ import annotations

import json
import math
import re
import typing

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import UserError, load_config
from rlhf.dpo import LOSS_TYPES, DPOConfig, build_trainer, odpo_shift_reference, run
from rlhf.models import load

MARKER = " wonderful"
PLAIN = " dull"


def _pairs(n: int, prefer_marker: bool = True, margins: list[float] | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        good, bad = f"The film{MARKER}{MARKER} number {i}.", f"The film{PLAIN} number {i}."
        chosen, rejected = (good, bad) if prefer_marker else (bad, good)
        row = {"prompt": f"Review film {i}", "chosen": chosen, "rejected": rejected}
        if margins is not None:
            row["margin"] = margins[i % len(margins)]
        rows.append(row)
    return rows


def _write(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@torch.no_grad()
def _response_logps(model_dir: str, rows: list[tuple[str, str]]) -> torch.Tensor:
    """Our own sum of log pi(response tokens | prompt) through the chat template, one sequence at a time."""
    loaded = load(model_dir, device="cpu", precision="fp32")
    model, tok = loaded.model, loaded.tokenizer
    totals = []
    for prompt, response in rows:
        user = [{"role": "user", "content": prompt}]
        prompt_ids = tok(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False).input_ids
        full_ids = tok(tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False),
                       add_special_tokens=False).input_ids
        assert full_ids[: len(prompt_ids)] == prompt_ids
        ids = torch.tensor([full_ids])  # (1, T)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # (T-1, V): predicts t+1
        token_logp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)  # (T-1,)
        totals.append(token_logp[len(prompt_ids) - 1 :].sum())
    return torch.stack(totals)  # (N,)


def _config(tmp_path, data: str, tiny_model_dir: str, name: str, **kw) -> DPOConfig:
    values = dict(model=tiny_model_dir, data=data, output_dir=str(tmp_path / name), device="cpu", batch_size=4,
                  max_steps=12, learning_rate=5e-3, beta=0.1, max_length=64,
                  precision="fp32")  # exact comparisons below; `auto` is bf16 on CPUs with AVX512-BF16
    values.update(kw)
    return load_config(DPOConfig, **values)


@pytest.mark.parametrize("prefer_marker,precompute", [(True, True), (False, False)],
                         ids=["marker-preferred", "swapped-frozen-copy"])
def test_dpo_raises_chosen_and_lowers_rejected_relative_to_the_reference(tmp_path, tiny_model_dir, prefer_marker,
                                                                          precompute):
    rows = _pairs(24, prefer_marker)
    data = _write(tmp_path / "pairs.jsonl", rows)
    metrics = run(_config(tmp_path, data, tiny_model_dir, "dpo", precompute_ref_log_probs=precompute))
    out = str(tmp_path / "dpo")

    chosen = [(r["prompt"], r["chosen"]) for r in rows]
    rejected = [(r["prompt"], r["rejected"]) for r in rows]
    # log pi(y) - log pi_ref(y), measured by our own forward passes, on the training pairs.
    chosen_shift = (_response_logps(out, chosen) - _response_logps(tiny_model_dir, chosen)).mean().item()
    rejected_shift = (_response_logps(out, rejected) - _response_logps(tiny_model_dir, rejected)).mean().item()
    assert chosen_shift > 0 > rejected_shift, (chosen_shift, rejected_shift)
    # A held-out pair of each kind moves the same way: the marker kind up only when the data prefers it.
    held_out = [("Review film 99", f"The film{MARKER}{MARKER} number 99."),
                ("Review film 99", f"The film{PLAIN} number 99.")]
    marker_shift, plain_shift = (_response_logps(out, held_out) - _response_logps(tiny_model_dir, held_out)).tolist()
    assert (marker_shift > 0 > plain_shift) if prefer_marker else (plain_shift > 0 > marker_shift)

    # Step 1 sees policy == reference (the frozen copy, or the precomputed log-probs): loss log 2, rewards 0.
    assert metrics["first"]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["first"]["rewards/chosen"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["steps"] == 12 and metrics["final"]["loss"] < metrics["first"]["loss"]
    assert metrics["final"]["rewards/margins"] > 0 and metrics["final"]["rewards/accuracies"] > 0.5


def test_dpo_with_lora_logs_saves_a_merged_model_that_reloads(tmp_path, tiny_model_dir, capsys):
    data = _write(tmp_path / "pairs.jsonl", _pairs(24))
    metrics = run(_config(tmp_path, data, tiny_model_dir, "dpo", lora=True, lora_r=4, lora_alpha=8, max_steps=6))
    out = tmp_path / "dpo"
    saved = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in saved["log_history"] if "loss" in h and "train_loss" not in h]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert math.isfinite(saved["final"][key]) and math.isfinite(saved["eval"][key])
    assert math.isfinite(saved["train_loss"]) and math.isfinite(saved["eval_loss"]) and saved["test_pairs"] > 0
    # The reference is the base under the adapter (LoRA's B starts at zero): step 1 has policy == reference.
    assert metrics["first"]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert not (out / "adapter_config.json").exists()  # merged: a plain model directory
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    reloaded = load(str(out), device="cpu")
    assert reloaded.tokenizer.padding_side == "left"
    assert reloaded.tokenizer.chat_template
    assert "reward accuracy" in capsys.readouterr().out


def test_odpo_offset_by_hand():
    # h_chosen = 2, h_rejected = -1, beta = 0.1, offset 0.5: ODPO's loss is -log sigmoid(0.3 - 0.5) = log(1 + e^0.2).
    logp_chosen, ref_chosen = torch.tensor([-10.0]), torch.tensor([-12.0])
    h_rejected = torch.tensor([-1.0])
    shifted = odpo_shift_reference(ref_chosen, torch.tensor([0.5]), beta=0.1)
    trl_sigmoid_loss = -torch.nn.functional.logsigmoid(0.1 * ((logp_chosen - shifted) - h_rejected))
    assert trl_sigmoid_loss.item() == pytest.approx(math.log(1 + math.exp(0.2)), abs=1e-6)


def test_dpo_margin_enters_as_an_odpo_offset(tmp_path, tiny_model_dir):
    margins = [0.0, 0.5, 1.0]
    (tmp_path / "export").mkdir()  # an export directory: every training pair (and its margin) is known
    _write(tmp_path / "export" / "test.jsonl", _pairs(1, margins=[1.0]))
    data = _write(tmp_path / "export" / "train.jsonl", _pairs(6, margins=margins)).rsplit("/", 1)[0]
    metrics = run(_config(tmp_path, data, tiny_model_dir, "odpo", margin_scale=2.0, batch_size=6, max_steps=2))
    # Step 1: policy == reference, so each pair's loss is -log sigmoid(0 - 2 * margin) = log(1 + e^(2 margin)).
    expected = sum(math.log1p(math.exp(2.0 * m)) for m in margins) / len(margins)
    first = metrics["first"]
    assert first["loss"] == pytest.approx(expected, abs=2e-3)
    assert first["rewards/offset"] == pytest.approx(1.0, abs=1e-6)
    # The logged rewards keep their DPO meaning (the offset is added back): still 0 at step 1.
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-3)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["margin_offset"] is True

    # margin_scale 0 (the default) ignores the column: plain DPO, log 2.
    plain = run(_config(tmp_path, data, tiny_model_dir, "plain", batch_size=6, max_steps=1))
    assert plain["first"]["loss"] == pytest.approx(math.log(2), abs=1e-3) and plain["margin_offset"] is False
    with pytest.raises(UserError, match="precompute_ref_log_probs"):
        run(_config(tmp_path, data, tiny_model_dir, "x", margin_scale=1.0, precompute_ref_log_probs=False))


@pytest.mark.slow
def test_a_run_shorter_than_logging_steps_summarises_its_mean_loss_not_nan(tmp_path, tiny_model_dir, capsys):
    data = _write(tmp_path / "pairs.jsonl", _pairs(16))
    metrics = run(_config(tmp_path, data, tiny_model_dir, "short", max_steps=2, logging_steps=10))
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("DPO (")]
    assert metrics["final"] == {} and "nan" not in line
    assert f"loss {metrics['train_loss']:.3f} (mean of the run; no step was logged)" in line


def test_max_steps_precomputes_only_the_pairs_it_trains_on(tmp_path, tiny_model_dir):
    data = _write(tmp_path / "pairs.jsonl", _pairs(40))
    trainer, _ = build_trainer(_config(tmp_path, data, tiny_model_dir, "few", max_steps=3))
    # 3 steps x batch 4: the reference ran over 12 pairs, not 40, and they are a seeded draw, not the file's head.
    assert len(trainer.train_dataset) == 12 and "ref_chosen_logps" in trainer.train_dataset.column_names
    again, _ = build_trainer(_config(tmp_path, data, tiny_model_dir, "again", max_steps=3))
    assert again.train_dataset["prompt"] == trainer.train_dataset["prompt"]
    assert trainer.train_dataset["prompt"] != [[{"role": "user", "content": f"Review film {i}"}] for i in range(12)]
    everything, split = build_trainer(_config(tmp_path, data, tiny_model_dir, "all", max_steps=-1, epochs=1.0))
    assert len(everything.train_dataset) == len(split["train"]) > 12  # the epochs see every training pair
    assert len(everything.eval_dataset) == len(split["test"]) > 3
    # eval_pairs: the reference runs over that many test pairs only, a seeded draw.
    few, few_split = build_trainer(_config(tmp_path, data, tiny_model_dir, "eval3", max_steps=3, eval_pairs=3))
    assert len(few.eval_dataset) == len(few_split["test"]) == 3 and "ref_chosen_logps" in few.eval_dataset.column_names
    assert set(few.eval_dataset["prompt"][i][0]["content"] for i in range(3)) <= set(
        split["test"]["prompt"][i][0]["content"] for i in range(len(split["test"])))


def test_dpo_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    data = _write(tmp_path / "pairs.jsonl", _pairs(24))
    first = run(_config(tmp_path, data, tiny_model_dir, "r", max_steps=3, save_steps=3))
    assert first["steps"] == 3
    state_file = tmp_path / "r" / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["global_step"] == 3
    # Mark the checkpoint's log: only a run that really resumed from it carries the mark forward.
    state["log_history"][-1]["resumed_from_here"] = True
    state_file.write_text(json.dumps(state))

    second = run(_config(tmp_path, data, tiny_model_dir, "r", max_steps=6, save_steps=3, resume="latest"))
    assert second["steps"] == 6
    steps = [h["step"] for h in second["log_history"] if "loss" in h and "train_loss" not in h]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in second["log_history"] if h.get("resumed_from_here")] == [3]
    with pytest.raises(UserError, match="no checkpoint"):
        run(_config(tmp_path, data, tiny_model_dir, "r", resume=str(tmp_path / "nowhere")))


def test_loss_types_match_trl():
    import trl

    help_text = trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(re.findall(r"`'(\w+)'`", help_text)) == set(LOSS_TYPES)
    assert set(typing.get_args(typing.get_type_hints(DPOConfig)["loss_type"])) == set(LOSS_TYPES)


def test_bad_dpo_options():
    bad_options = (dict(loss_type="nope"), dict(beta=0.0), dict(max_steps=0), dict(warmup_ratio=1.5),
                   dict(loss_type="exo_pair"), dict(loss_type="robust", label_smoothing=0.5),
                   dict(margin_scale=-1.0), dict(save_steps=-1))
    for bad in bad_options:
        with pytest.raises(UserError):
            load_config(DPOConfig, **bad)
    load_config(DPOConfig, loss_type="exo_pair", label_smoothing=1e-3)
    with pytest.raises(UserError, match="not found"):
        run(load_config(DPOConfig, data="/nonexistent/pairs.jsonl"))
