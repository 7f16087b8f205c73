"""KTO on the tiny model: the label's sign, the weights rule, the data it reads (ratings, files, pairs), saving."""

from __future__ import annotations

import json
import math
import typing

import pytest
import torch
from safetensors.torch import load_file
from test_dpo import MARKER, PLAIN, _response_logps, _write  # _response_logps: ours, through the chat template

from rlhf.config import UserError, load_config
from rlhf.kto import LOSS_TYPES, KTOConfig, build_trainer, load_kto_dataset, loss_weights, run
from rlhf.models import load


def _ratings(n: int, desirable_marker: bool = True) -> list[dict]:
    """Two rated responses to each of n prompts, as the export writes them: the marker one and the plain one."""
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Review film {i}"}]
        for text, marker in ((f"The film{MARKER}{MARKER} number {i}.", True), (f"The film{PLAIN} number {i}.", False)):
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text}],
                         "label": marker == desirable_marker, "likert": None, "group": f"task-{i}"})
    return rows


def _export(tmp_path, train: list[dict], test: list[dict] | None = None, name: str = "export") -> str:
    """An export directory: rating files beside a pair file that KTO (without from_pairs) does not read."""
    out = tmp_path / name
    out.mkdir()
    _write(out / "ratings_train.jsonl", train)
    _write(out / "ratings_test.jsonl", test or [])
    _write(out / "train.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    return str(out)


def _config(tmp_path, data: str, tiny_model_dir: str, name: str, **kw) -> KTOConfig:
    values = dict(model=tiny_model_dir, data=data, output_dir=str(tmp_path / name), device="cpu", batch_size=4,
                  max_steps=12, learning_rate=5e-3, beta=0.1, max_length=64,
                  precision="fp32")  # exact comparisons below; `auto` is bf16 on CPUs with AVX512-BF16
    values.update(kw)
    return load_config(KTOConfig, **values)


def _shift(model_dir: str, base_dir: str, rows: list[tuple[str, str]]) -> float:
    """Mean log pi(y|x) - log pi_ref(y|x) over the rows, by our own forward passes."""
    return (_response_logps(model_dir, rows) - _response_logps(base_dir, rows)).mean().item()


@pytest.mark.parametrize("desirable_marker", [True, False], ids=["marker-desirable", "labels-flipped"])
def test_kto_raises_desirable_and_lowers_undesirable_relative_to_the_reference(tmp_path, tiny_model_dir,
                                                                               desirable_marker):
    rows = _ratings(24, desirable_marker)
    data = _write(tmp_path / "ratings.jsonl", rows)
    metrics = run(_config(tmp_path, data, tiny_model_dir, "kto"))
    out = str(tmp_path / "kto")

    def pairs(label: bool) -> list[tuple[str, str]]:
        return [(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in rows if r["label"] == label]

    desirable, undesirable = _shift(out, tiny_model_dir, pairs(True)), _shift(out, tiny_model_dir, pairs(False))
    assert desirable > 0 > undesirable, (desirable, undesirable)
    # Held-out responses of each kind move the same way: the marker kind up only when its label is desirable.
    marker = _shift(out, tiny_model_dir, [("Review film 99", f"The film{MARKER}{MARKER} number 99.")])
    plain = _shift(out, tiny_model_dir, [("Review film 99", f"The film{PLAIN} number 99.")])
    assert (marker > 0 > plain) if desirable_marker else (plain > 0 > marker)

    # Step 1 sees policy == reference (precomputed log-probs): r = z0 = 0, so each response's loss is 1 - sigmoid(0).
    assert metrics["first"]["loss"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["first"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["steps"] == 12 and metrics["desirable"] == metrics["undesirable"] > 0
    assert metrics["test_examples"] > 0 and metrics["eval"]["rewards/margins"] > 0


def test_kto_on_an_export_with_lora_saves_a_merged_model_that_reloads(tmp_path, tiny_model_dir, capsys):
    rows = _ratings(12)
    data = _export(tmp_path, rows[:20], rows[20:])
    metrics = run(_config(tmp_path, data, tiny_model_dir, "kto", lora=True, lora_r=4, lora_alpha=8, max_steps=4))
    out = tmp_path / "kto"
    saved = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in saved["log_history"] if "loss" in h and "train_loss" not in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert saved["available_examples"] == 20 and saved["test_examples"] == 4  # the export's split, not ours
    assert math.isfinite(saved["eval_loss"]) and math.isfinite(saved["eval"]["rewards/margins"])
    # The reference is the base under the adapter (LoRA's B starts at zero): step 1 has policy == reference.
    assert metrics["first"]["loss"] == pytest.approx(0.5, abs=1e-4)
    assert not (out / "adapter_config.json").exists()  # merged: a plain model directory
    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    reloaded = load(str(out), device="cpu")
    assert reloaded.tokenizer.padding_side == "left" and reloaded.tokenizer.chat_template
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("KTO (kto")]
    assert "4 steps on 16 rated responses (of 20)" in line and "held-out margin" in line


def test_from_pairs_trains_on_chosen_as_desirable_and_rejected_as_undesirable(tmp_path, tiny_model_dir, capsys):
    pairs = [{"prompt": f"Review film {i}", "chosen": f"The film{MARKER} {i}.", "rejected": f"The film{PLAIN} {i}.",
              "margin": 1.0} for i in range(10)]
    data = _write(tmp_path / "pairs.jsonl", pairs)
    trainer, split = build_trainer(_config(tmp_path, data, tiny_model_dir, "x", from_pairs=True, max_steps=-1))
    train = split["train"]
    assert set(train.column_names) == {"prompt", "completion", "label"}
    assert len(train) == 2 * 9 and sum(train["label"]) == 9  # one prompt of ten held out, as dpo holds it out
    assert all((MARKER in row["completion"][0]["content"]) == row["label"] for row in train)
    assert len(trainer.eval_dataset) == 2
    assert "balance_weights" not in capsys.readouterr().out  # a pair gives one of each: balanced already
    metrics = run(_config(tmp_path, data, tiny_model_dir, "pairs", from_pairs=True, max_steps=2))
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])
    assert "2 steps on 8 responses from preference pairs (of 18)" in capsys.readouterr().out


def test_the_weights_rule_and_that_the_weights_reach_the_loss(tmp_path, tiny_model_dir, capsys):
    balanced = load_config(KTOConfig)
    assert loss_weights(12, 36, balanced)[:2] == (3.0, 1.0)  # the rarer desirable kind raised to ratio 1
    assert loss_weights(36, 12, balanced)[:2] == (1.0, 3.0)
    assert loss_weights(14, 12, balanced) == (1.0, 1.0, "")  # ratio 7/6 lies within [1, 4/3]: as given
    assert loss_weights(12, 14, balanced)[:2] == pytest.approx((14 / 12, 1.0))
    as_given = load_config(KTOConfig, balance_weights=False, desirable_weight=2.0)
    w_d, w_u, note = loss_weights(12, 36, as_given)
    assert (w_d, w_u) == (2.0, 1.0) and note.startswith("warning:") and "0.67, outside [1, 4/3]" in note

    # 2 desirable and 6 undesirable in one batch, desirable_weight raised to 3: step 1's loss is the mean weight / 2.
    rows = _ratings(6)
    data = _export(tmp_path, [r for r in rows if r["label"]][:2] + [r for r in rows if not r["label"]])
    metrics = run(_config(tmp_path, data, tiny_model_dir, "w", batch_size=8, max_steps=1))
    assert (metrics["desirable"], metrics["undesirable"]) == (2, 6) and metrics["test_examples"] == 0
    assert (metrics["desirable_weight"], metrics["undesirable_weight"]) == (3.0, 1.0)
    assert metrics["first"]["loss"] == pytest.approx((3.0 * 2 + 1.0 * 6) / 8 / 2, abs=1e-4)
    assert "desirable_weight 3, undesirable_weight 1 (balance_weights" in capsys.readouterr().out


@pytest.mark.parametrize("label", [True, False], ids=["all-desirable", "all-undesirable"])
def test_data_of_one_label_warns_in_one_line_and_still_trains(tmp_path, tiny_model_dir, capsys, label):
    rows = [r for r in _ratings(8) if r["label"] == label]
    metrics = run(_config(tmp_path, _write(tmp_path / "one.jsonl", rows), tiny_model_dir, "one", max_steps=2))
    [warning] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning:")]
    assert ("pushes no response down" if label else "only pushes responses down") in warning
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])


def test_bad_rating_data_is_a_one_line_error_naming_the_file_and_line(tmp_path):
    def fails(rows, match: str):
        with pytest.raises(UserError, match=match):
            load_kto_dataset(load_config(KTOConfig, data=_write(tmp_path / "bad.jsonl", rows)))

    good = _ratings(1)[0]
    fails([good, {k: v for k, v in good.items() if k != "label"}], r"bad.jsonl:2: no label \(true: a desirable")
    fails([{**good, "label": "yes"}], "bad.jsonl:1: label must be true or false, not 'yes'")
    fails([{"prompt": "p", "chosen": "a", "rejected": "b"}], "a preference pair.*pass --from_pairs")
    fails([{**good, "completion": [{"role": "assistant", "content": " "}]}], "bad.jsonl:1: an empty prompt or comp")
    fails([{**good, "prompt": [{"role": "assistant", "content": "hi"}]}], "ending with the user's turn")

    export = tmp_path / "export"
    export.mkdir()
    _write(export / "train.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    for ratings in (None, ""):  # no rating file, then an empty one (nothing rated yet)
        if ratings is not None:
            (export / "ratings_train.jsonl").write_text(ratings)
        with pytest.raises(UserError, match="no rated responses.*rate responses.*or pass --from_pairs") as e:
            load_kto_dataset(load_config(KTOConfig, data=str(export)))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_kto_dataset(load_config(KTOConfig, data="/nonexistent/ratings.jsonl"))


def test_max_steps_precomputes_only_the_responses_it_trains_on_in_a_seeded_order(tmp_path, tiny_model_dir):
    data = _write(tmp_path / "ratings.jsonl", _ratings(20))
    trainer, split = build_trainer(_config(tmp_path, data, tiny_model_dir, "few", max_steps=3, eval_examples=3))
    # 3 steps x batch 4: the reference ran over 12 responses, a seeded draw, not the file's head (where a prompt's two
    # responses sit side by side and the KL estimate would pair each prompt with its own other response).
    assert len(trainer.train_dataset) == 12 and "ref_KL_logps" in trainer.train_dataset.column_names
    assert trainer.train_dataset["prompt"] != split["train"]["prompt"][:12]
    again, _ = build_trainer(_config(tmp_path, data, tiny_model_dir, "again", max_steps=3))
    assert again.train_dataset["completion_ids"] == trainer.train_dataset["completion_ids"]
    assert len(trainer.eval_dataset) == len(split["test"]) == 3 and "ref_logps" in trainer.eval_dataset.column_names


def test_loss_types_match_trl_and_the_stage_is_a_command():
    import trl

    from rlhf import cli

    assert set(trl.KTOConfig.__dataclass_fields__["loss_type"].metadata["choices"]) == set(LOSS_TYPES)
    assert set(typing.get_args(typing.get_type_hints(KTOConfig)["loss_type"])) == set(LOSS_TYPES)
    assert cli._stage("kto", 3) is KTOConfig and cli._stage("kto", 4) is run


def test_bad_kto_options():
    bad_options = (dict(loss_type="nope"), dict(beta=0.0), dict(batch_size=1), dict(desirable_weight=0.0),
                   dict(undesirable_weight=-1.0), dict(warmup_ratio=1.5), dict(eval_examples=-1), dict(max_steps=0))
    for bad in bad_options:
        with pytest.raises(UserError):
            load_config(KTOConfig, **bad)
    load_config(KTOConfig, loss_type="apo_zero_unpaired", batch_size=1)  # no KL estimate, so no pairing in a batch
