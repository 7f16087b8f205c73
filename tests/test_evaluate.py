"""Aligned vs base evaluation: statistics by hand, log-probs, the two sanity cases, and the report."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from rlhf.config import UserError, load_config
from rlhf.data import read_prompts
from rlhf.evaluate import (
    EvaluateConfig,
    aligned_labels,
    arena_figures,
    arena_outcomes,
    bootstrap_ci,
    bradley_terry,
    distinct_n,
    response_logprobs,
    rl_curves,
    run,
    win_rate,
)
from rlhf.models import load
from rlhf.store import Store


def shorter_is_better(prompts, responses):
    """A gold function for the tests (loaded as `test_evaluate:shorter_is_better`)."""
    return [-float(len(r)) for r in responses]


def recording_gold(prompts, responses):
    """A gold function that writes what it was asked to score (`test_evaluate:recording_gold`)."""
    with open(os.environ["RLHF_TEST_GOLD_LOG"], "a") as log:
        log.write(json.dumps([prompts, responses]) + "\n")
    return [float(len(r)) for r in responses]


def test_win_rate_and_bootstrap_by_hand():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]).tolist() == [1.0, 0.5, 0.0, 1.0]
    # Two samples per prompt: each prompt's two comparisons averaged, one value per prompt for the bootstrap.
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1], samples_per_prompt=2).tolist() == [0.75, 0.5]
    mean, lo, hi = bootstrap_ci([1.0, 0.5, 0.0, 1.0], resamples=2000)
    assert mean == 0.625 and 0.0 <= lo < mean < hi <= 1.0
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5, 0.5)


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran over 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n([""], 2) == 0.0


def test_response_logprobs_match_a_direct_forward_and_ignore_padding(tiny_model_dir):
    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    prompt_ids = [[5, 6, 7, 8, 9], [10, 11]]
    response_ids = [[12, 13], [14, 15, 16, 17]]
    got = response_logprobs(loaded.model, prompt_ids, response_ids, temperature=0.5)
    for p, r, value in zip(prompt_ids, response_ids, got):
        with torch.no_grad():
            logits = loaded.model(torch.tensor([p + r])).logits[0] / 0.5
        logp = torch.log_softmax(logits, -1)
        expected = sum(float(logp[len(p) - 1 + i, tok]) for i, tok in enumerate(r))
        assert value == pytest.approx(expected, abs=1e-4)


def test_response_logprobs_project_only_the_positions_that_predict_a_response_token(tiny_model_dir):
    loaded = load(tiny_model_dir, device="cpu", precision="fp32")
    rows = []
    hook = loaded.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append((args[0].shape[:2], args[0].is_contiguous())))
    try:
        response_logprobs(loaded.model, [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]], [[16, 17], [18, 19, 20]], 1.0)
    finally:
        hook.remove()
    # Width 10, shortest prompt 3: positions 2..8 predict tokens 3..9, every response token; 7 of 9 positions.
    assert rows == [((2, 7), True)]


def test_read_prompts_shipped_and_files(tmp_path):
    test_prompts = read_prompts("sentiment", "test")
    train_prompts = read_prompts("sentiment", "train")
    assert len(test_prompts) >= 50 and len(train_prompts) >= 200 and not set(test_prompts) & set(train_prompts)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"p.jsonl:2: not valid JSON"):
        read_prompts(str(bad))


def _config(tmp_path, base, aligned, **kw):
    defaults = dict(base=base, aligned=[aligned], prompts="sentiment", limit=12, max_new_tokens=8, batch_size=6,
                    bootstrap=300, device="cpu", output_dir=str(tmp_path / "eval"))
    return load_config(EvaluateConfig, **{**defaults, **kw})


def test_model_against_itself_is_even_with_zero_kl(tmp_path, tiny_model_dir):
    metrics = run(_config(tmp_path, tiny_model_dir, tiny_model_dir, gold="sentiment"))
    aligned = metrics["models"][1]
    lo, hi = aligned["win_rate_gold_ci"]
    assert lo <= 0.5 <= hi
    assert abs(aligned["kl_vs_base"]) < 1e-4


def test_a_model_that_always_wins_by_gold_gets_about_100_percent(tmp_path, tiny_model_dir, tiny_tokenizer):
    # "Aligned" here answers with EOS at once (every other token suppressed): the shortest possible answer.
    shutil.copytree(tiny_model_dir, tmp_path / "terse")
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(tmp_path / "terse")
    gen.suppress_tokens = [i for i in range(len(tiny_tokenizer)) if i != tiny_tokenizer.eos_token_id]
    gen.save_pretrained(tmp_path / "terse")
    metrics = run(_config(tmp_path, tiny_model_dir, str(tmp_path / "terse"), gold="test_evaluate:shorter_is_better"))
    aligned = metrics["models"][1]
    assert aligned["win_rate_gold"] >= 0.95 and aligned["mean_tokens"] == 1.0
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["models"][1]["win_rate_gold"] == aligned["win_rate_gold"]


def test_several_samples_per_prompt_are_scored_against_their_own_prompt(tmp_path, tiny_model_dir, monkeypatch):
    log = tmp_path / "gold.jsonl"
    monkeypatch.setenv("RLHF_TEST_GOLD_LOG", str(log))
    metrics = run(_config(tmp_path, tiny_model_dir, tiny_model_dir, gold="test_evaluate:recording_gold", limit=4,
                          samples_per_prompt=3, temperature=1.0, max_new_tokens=6))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    prompts = read_prompts("sentiment", "test", 4)
    assert len(calls) == 2  # one call per contestant: the base and the aligned model
    for asked, responses in calls:
        assert asked == [p for p in prompts for _ in range(3)] and len(responses) == 12
        assert any(len(set(responses[i : i + 3])) > 1 for i in range(0, 12, 3))  # sampled, not one answer copied
    aligned = metrics["models"][-1]
    assert metrics["n_prompts"] == 4 and abs(aligned["kl_vs_base"]) < 1e-4
    assert aligned["win_rate_gold"] == 0.5  # the same model with the same seeds: every comparison a tie
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "3 responses per prompt and model" in page


def test_report_escapes_model_output(tmp_path, tiny_model_dir):
    prompts = tmp_path / "xss.jsonl"
    prompts.write_text(json.dumps({"prompt": "<script>alert(1)</script><img src=x onerror=alert(2)>"}) + "\n")
    run(_config(tmp_path, tiny_model_dir, tiny_model_dir, prompts=str(prompts), split="", limit=0))
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_rl_curves_put_proxy_and_gold_gains_on_one_axis_and_the_report_plots_them(tmp_path, tiny_model_dir):
    rl = tmp_path / "rloo"
    shutil.copytree(tiny_model_dir, rl)
    steps = [{"step": 1, "objective/kl": 0.0, "objective/scores": 0.5, "objective/scores_std": 2.0,
              "objective/gold": 0.1, "objective/gold_std": 0.5},
             {"step": 2, "objective/kl": 3.0, "objective/scores": 1.5, "objective/scores_std": 2.0,
              "objective/gold": 0.0, "objective/gold_std": 0.5}]
    (rl / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in steps))
    rows = [{"label": "base", "role": "base", "model": str(rl)}, {"label": "aligned 1", "role": "aligned",
            "model": tiny_model_dir}, {"label": "aligned 2", "role": "aligned", "model": str(rl)}]
    curves = rl_curves(rows)
    assert list(curves) == ["aligned 2"]  # neither a model without RL metrics nor the base has a curve
    # step 2: proxy (1.5 - 0.5) / 2 = 0.5 std up, gold (0.0 - 0.1) / 0.5 = 0.2 std down
    assert [(c["kl"], c["proxy_gain"], c["gold_gain"]) for c in curves["aligned 2"]] == [(0.0, 0.0, 0.0),
                                                                                       (3.0, 0.5, -0.2)]
    metrics = run(_config(tmp_path, tiny_model_dir, str(rl), limit=2))
    assert metrics["rl_curves"]["rloo"][1]["gold_gain"] == pytest.approx(-0.2)  # named by its directory
    assert "Proxy and gold reward against KL" in (tmp_path / "eval" / "report.html").read_text()


def test_bad_config_is_rejected():
    with pytest.raises(UserError, match="aligned"):
        load_config(EvaluateConfig, aligned=[])
    with pytest.raises(UserError, match="2 aligned models"):
        load_config(EvaluateConfig, aligned=["a", "b"], names=["one"])
    for names in (["x", "x"], ["base", "x"], ["prompt 2", "x"], [" ", "x"]):
        with pytest.raises(UserError, match="names must be distinct"):
            load_config(EvaluateConfig, aligned=["a", "b"], names=names)


def test_aligned_models_are_named_by_the_user_else_by_their_directory():
    assert aligned_labels(["runs/demo/round-1/dpo", "runs/demo/round-1/rloo/"], []) == ["dpo", "rloo"]
    assert aligned_labels(["r/dpo", "r/rloo"], ["DPO beta 0.1", "RLOO"]) == ["DPO beta 0.1", "RLOO"]
    # Names that repeat (two rounds' dpo) or read as a baseline fall back to numbers.
    assert aligned_labels(["round-1/dpo", "round-2/dpo"], []) == ["aligned 1", "aligned 2"]
    assert aligned_labels(["x/base"], []) == ["aligned"]
    assert aligned_labels(["x/prompted"], []) == ["aligned"]


@pytest.mark.browser
def test_report_renders_in_chromium(tmp_path, tiny_model_dir, browser, artifacts_dir):
    run(_config(tmp_path, tiny_model_dir, tiny_model_dir, limit=6))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "eval" / "report.html").as_uri())
    assert page.locator("h1").inner_text() == "Aligned vs base"
    images = page.locator("img")
    assert images.count() >= 2
    for i in range(images.count()):  # every embedded plot decoded to a real picture
        assert page.evaluate("img => img.naturalWidth", images.nth(i).element_handle()) > 100
    page.screenshot(path=str(artifacts_dir / "evaluate_report.png"), full_page=True)
    assert not errors
    page.close()


def test_prompt_baseline_identical_to_base_gives_equal_figures(tmp_path, tiny_model_dir):
    metrics = run(_config(tmp_path, tiny_model_dir, tiny_model_dir, prompt_baselines=[""]))
    base, prompt, aligned = metrics["models"]
    assert prompt["label"] == "prompt" and metrics["best_prompt_baseline"] == "prompt"
    assert prompt["mean_gold"] == base["mean_gold"] and prompt["mean_tokens"] == base["mean_tokens"]
    assert abs(prompt["kl_vs_base"]) < 1e-4 and prompt["win_rate_gold"] == 0.5
    assert aligned["win_rate_gold_vs_prompt"] == 0.5


def test_prompt_baseline_that_changes_outputs_gives_different_figures(tmp_path, tiny_model_dir):
    metrics = run(_config(tmp_path, tiny_model_dir, tiny_model_dir, gold="test_evaluate:shorter_is_better",
                          prompt_baselines=["You are a film critic. Write a long and detailed review."]))
    base, prompt, _ = metrics["models"]
    assert prompt["mean_gold"] != base["mean_gold"]
    assert prompt["kl_vs_base"] > 0.01  # a different context moves the base model's distribution
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "<th>prompt</th>" in page and "You are a film critic" in page


def test_reward_model_win_rates(tmp_path, tiny_model_dir, tiny_reward_dir):
    metrics = run(_config(tmp_path, tiny_model_dir, tiny_model_dir, reward=tiny_reward_dir))
    aligned = metrics["models"][1]
    assert aligned["win_rate_reward"] == 0.5 and "mean_reward" in metrics["models"][0]


def test_the_report_shows_the_reward_models_held_out_evidence(tmp_path, tiny_model_dir, tiny_reward_dir):
    import shutil

    reward = tmp_path / "reward"
    shutil.copytree(tiny_reward_dir, reward)
    evidence = {"test_pairs": 64, "test_prompts": 32, "accuracy": 0.55, "accuracy_ci": [0.45, 0.66],
                "eval_loss": 0.91, "plain_loss": 0.71, "ece": 0.08,
                "ceiling": {"value": 0.9, "ci": [0.84, 0.95], "pairs": 64,
                            "source": "labels that agree with <b>gold</b>"},
                "share_of_ceiling": 0.61, "length_spearman": 0.4, "longer_rejected_pairs": 20,
                "accuracy_longer_rejected": 0.3, "kept": {"step": 8, "rule": "lowest held-out loss"},
                "verdict": "no better than chance on the held-out pairs (accuracy 0.550, ...)"}
    (reward / "metrics.json").write_text(json.dumps({**evidence, "normalization": {"mean": 0.0, "std": 1.0}}))
    metrics = run(_config(tmp_path, tiny_model_dir, tiny_model_dir, reward=str(reward), limit=4))
    assert metrics["reward_model"]["verdict"] == evidence["verdict"]
    page = (tmp_path / "eval" / "report.html").read_text()
    section = page.split("<h2>Reward model</h2>", 1)[1].split("<h2>", 1)[0]
    assert "<b>no better than chance on the held-out pairs" in section
    assert "0.550 <small>[0.450, 0.660]</small> on 64 pairs (32 prompts)" in section
    assert "labels that agree with &lt;b&gt;gold&lt;/b&gt;" in section  # escaped like everything else
    assert "Spearman(reward, words) 0.40; accuracy 0.300 on the 20 pairs whose longer response lost" in section
    assert "step 8 (lowest held-out loss)" in section
    assert "0.710 (ln 2 = 0.693 is a coin flip; with the margins 0.910) / 0.080" in section


def test_bradley_terry_by_hand():
    # Plain maximum likelihood: A beat B 3 times of 4, so p_A / p_B = 3 and A is 400 log10(3) = 190.8 above B.
    ratings = bradley_terry([("A", "B", 1.0)] * 3 + [("A", "B", 0.0)], prior=0)
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (ratings["A"] + ratings["B"]) / 2 == pytest.approx(1000)
    # A cycle in which everyone wins once and loses once (plus ties) leaves everyone equal.
    cycle = bradley_terry([("A", "B", 1.0), ("B", "C", 1.0), ("C", "A", 1.0), ("A", "C", 0.5)], prior=0)
    assert all(r == pytest.approx(1000, abs=1e-6) for r in cycle.values())
    # Never beaten: finite only with the prior, and on top.
    unbeaten = bradley_terry([("A", "B", 1.0), ("A", "C", 1.0), ("B", "C", 1.0), ("C", "B", 1.0)])
    assert math.isfinite(unbeaten["A"]) and unbeaten["A"] > unbeaten["B"] and unbeaten["A"] > unbeaten["C"]


def _arena_store(tmp_path, choices: list[str]):
    """A store with arena tasks: the prompt answered by 'base' (A) and 'aligned' (B), one vote per choice; and a
    task between two answers of one model, which says nothing about models."""
    store = Store(f"sqlite:///{tmp_path / 'arena.db'}")
    prompt = store.add_prompts(["Review Alien."])[0]
    for i, choice in enumerate(choices):
        base_r = store.add_responses(prompt, [f"base answer {i}"], model="base")[0]
        aligned_r = store.add_responses(prompt, [f"aligned answer {i}"], model="aligned")[0]
        task = store.add_task([base_r, aligned_r], kind="arena")
        store.submit(store.annotator(f"person-{i}", create_simulated=True).name, task, choice)
    same = store.add_responses(prompt, ["one", "two"], model="aligned")
    store.submit("person-0", store.add_task(same, kind="arena"), "A")
    return store


def test_arena_human_win_rate_and_ratings_from_the_store(tmp_path):
    store = _arena_store(tmp_path, ["B", "B", "B", "A", "tie", "both_bad"])
    outcomes = arena_outcomes(store.tasks(kind="arena"))
    assert outcomes == [("base", "aligned", s) for s in (0.0, 0.0, 0.0, 1.0, 0.5, 0.5)]  # same-model task left out
    figures = arena_figures(store.tasks(kind="arena"), "base", ["aligned"], resamples=300)
    human = figures["win_rate_human"]["aligned"]
    assert human["mean"] == pytest.approx(4 / 6) and human["votes"] == 6  # 3 wins + 2 half-wins of 6
    assert 0 <= human["ci"][0] < human["mean"] < human["ci"][1] <= 1
    ratings = figures["ratings"]
    assert ratings["aligned"]["rating"] > 1000 > ratings["base"]["rating"]
    lo, hi = ratings["aligned"]["ci"]
    assert lo <= ratings["aligned"]["rating"] <= hi
    assert ratings["aligned"]["votes"] == ratings["base"]["votes"] == 6  # the same-model task counts for no one


def test_evaluate_reads_arena_votes_into_the_report(tmp_path, tiny_model_dir):
    store = _arena_store(tmp_path, ["B", "B", "A"])
    # The arena stores each response under the spec of the model that wrote it; evaluate matches on those.
    aligned_dir = str(tmp_path / "aligned-dir")
    shutil.copytree(tiny_model_dir, aligned_dir)
    with store.session() as s:
        from rlhf.store import Response

        for r in s.query(Response):
            r.model = {"base": tiny_model_dir, "aligned": aligned_dir}[r.model]
    metrics = run(_config(tmp_path, tiny_model_dir, aligned_dir, db=store.url, limit=4))
    aligned = metrics["models"][1]
    assert aligned["win_rate_human"] == pytest.approx(2 / 3) and metrics["arena"]["votes"] == 3
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "<h2>Arena</h2>" in page and "3 human votes" in page


def test_the_arena_pits_aligned_models_against_a_prompt_baseline(tmp_path, tiny_model_dir):
    """Votes between the aligned model and the base steered by a system prompt (named as the app names it) give
    the prompt baseline's human win-rate over base and the aligned model's over the prompt baseline."""
    from rlhf.evaluate import arena_name

    aligned_dir = str(tmp_path / "aligned-dir")
    shutil.copytree(tiny_model_dir, aligned_dir)
    system = "Write a positive review."
    prompted = arena_name(tiny_model_dir, system)
    store = Store(f"sqlite:///{tmp_path / 'arena.db'}")
    [pid] = store.add_prompts(["Review Alien."])
    votes = [(aligned_dir, prompted, "A"), (aligned_dir, prompted, "A"), (prompted, aligned_dir, "A"),
             (aligned_dir, prompted, "tie"), (prompted, tiny_model_dir, "A")]
    for i, (a, b, choice) in enumerate(votes):
        ids = [store.add_responses(pid, [f"{m} answer {i}"], model=m)[0] for m in (a, b)]
        store.submit(store.annotator(f"person-{i}", create_simulated=True).name, store.add_task(ids, kind="arena"),
                     choice)
    metrics = run(_config(tmp_path, tiny_model_dir, aligned_dir, db=store.url, limit=4, prompt_baselines=[system]))
    by_label = {m["label"]: m for m in metrics["models"]}
    assert by_label["prompt"]["win_rate_human"] == pytest.approx(1.0)  # its one vote against base
    # Aligned vs prompt: won 2, lost 1, tied 1 of 4 -> (2 + 0.5) / 4.
    assert by_label["aligned-dir"]["win_rate_human_vs_prompt"] == pytest.approx(2.5 / 4)
    assert "win_rate_human" not in by_label["aligned-dir"]  # no votes against the plain base
    assert "human vs prompt" in (tmp_path / "eval" / "report.html").read_text()
