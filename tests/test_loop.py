"""The whole loop, CI-sized: the tiny model through generate -> label -> export -> DPO and reward -> PPO ->
evaluate, twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import UserError, load_config
from rlhf.loop import LoopConfig, _next_policy, run
from rlhf.rounds import curves, describe, rounds
from rlhf.store import Store


@pytest.mark.slow
def test_two_rounds_end_to_end_then_resume(tmp_path, tiny_model_dir, capsys):
    config = load_config(LoopConfig, name="ci", runs_dir=str(tmp_path), rounds=2, base_model=tiny_model_dir,
                         device="cpu", align=["dpo", "ppo"],
                         generate={"limit": 8, "max_new_tokens": 6, "batch_size": 8},
                         dpo={"epochs": 1.0, "batch_size": 4, "max_length": 64}, export={"test_size": 0.4},
                         reward={"model": "", "batch_size": 4, "max_length": 64},
                         ppo={"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6},
                         evaluate={"limit": 6, "max_new_tokens": 6})
    result = run(config)
    root = tmp_path / "ci"
    for k in (1, 2):
        for step in ("generate", "label", "export", "dpo", "reward", "ppo", "evaluate"):
            assert (root / f"round-{k}" / f"{step}.json").is_file()
        for model in ("dpo", "reward", "ppo"):
            assert (root / f"round-{k}" / model / "model.safetensors").is_file()
        assert (root / f"round-{k}" / "eval" / "report.html").is_file()
    ppo = json.loads((root / "round-1" / "ppo.json").read_text())
    assert ppo["reward"] == str(root / "round-1" / "reward") and ppo["steps"] == 2
    first = json.loads((root / "round-1" / "generate.json").read_text())
    assert first["tasks"] == 8
    # Round 2 trained on both rounds' pairs, starting from round 1's policy, and was compared with it too.
    assert json.loads((root / "round-2" / "export.json").read_text())
    # Round 2 compares its DPO and PPO models with base, the prompt baseline and round 1's pick.
    models = [(m["label"], m["model"]) for m in result["evaluation"]["models"]]
    assert [label for label, _ in models][:4] == ["base", "prompt", "dpo", "ppo"]  # the report names the methods
    assert models[4][0] in ("round-1 dpo", "round-1 ppo")
    assert [model for _, model in models[2:4]] == [str(root / "round-2" / "dpo"), str(root / "round-2" / "ppo")]
    assert models[4][1] in (str(root / "round-1" / "dpo"), str(root / "round-1" / "ppo"))
    assert result["policy"] in (str(root / "round-2" / "dpo"), str(root / "round-2" / "ppo"))
    assert all("win_rate_reward" in m for m in result["evaluation"]["models"][1:])  # the round's reward model
    # The reward model's held-out evidence, its ceiling from the simulated labels' gold, is in the report.
    reward = json.loads((root / "round-2" / "reward" / "metrics.json").read_text())
    assert reward["test_pairs"] > 0 and reward["ceiling"]["source"].endswith("gold function sentiment")
    assert result["evaluation"]["reward_model"]["verdict"] == reward["verdict"]
    out = capsys.readouterr().out
    assert "REWARD model: " in out
    assert "wall time per stage" in out and "report:" in out and "prompt baseline" in out
    assert "DPO vs base" in out and "PPO vs base" in out and "next round's policy" in out
    assert "rlhf rounds --db" in out and f"--reward_model {(root / 'round-2' / 'reward').resolve()}" in out

    # The store holds the run's rounds as the Rounds page shows them: the reward model's held-out figures and each
    # aligned model's win-rates as the round's own files have them, the pairs exported so far, the report.
    store = Store(f"sqlite:///{root / 'store.db'}")
    [recorded] = rounds(store)
    assert recorded["name"] == "ci" and [e["round"] for e in recorded["rounds"]] == [1, 2]
    for entry in recorded["rounds"]:
        rd = root / f"round-{entry['round']}"
        metrics = json.loads((rd / "reward" / "metrics.json").read_text())
        assert entry["reward"]["accuracy"] == metrics["accuracy"] and entry["reward"]["ceiling"] == metrics[
            "ceiling"]["value"]
        assert entry["labels"]["train"] == json.loads((rd / "export.json").read_text())["train"]
        evaluation = {m["label"]: m for m in json.loads((rd / "evaluate.json").read_text())["models"]}
        assert [m["label"] for m in entry["models"]][:2] == ["dpo", "ppo"]
        for m in entry["models"]:
            assert m["judge"] == "gold" and m["vs_base"] == evaluation[m["label"]]["win_rate_gold"]
            assert m["kl"] == evaluation[m["label"]]["kl_vs_base"]
        assert entry["steps"] == ["generate", "label", "export", "dpo", "reward", "ppo", "evaluate"]
        assert entry["rankings"]["votes"] > 0 and Path(entry["report"]) == (rd / "eval" / "report.html").resolve()
    first_labels = recorded["rounds"][0]["labels"]["train"]
    assert recorded["rounds"][1]["labels"]["train"] > first_labels  # round 2 trains on both rounds' pairs
    assert len([row for row in curves([recorded])["accuracy"] if row["series"] == "reward model"]) == 2
    assert main(["rounds", "--db", store.url]) == 0
    shown = capsys.readouterr().out
    assert "run ci" in shown and "round 2:" in shown and "dpo: vs base" in shown and "report:" in shown

    # Running it again resumes: every step is found done, nothing is recomputed, nothing recorded twice.
    again = run(config)
    assert "done earlier, skipped" in capsys.readouterr().out
    assert again["policy"] == result["policy"]
    assert [e["steps"] for e in rounds(store)[0]["rounds"]] == [e["steps"] for e in recorded["rounds"]]


@pytest.mark.slow
def test_a_round_labeled_by_people_shows_its_progress_while_the_loop_waits(tmp_path, tiny_model_dir, capsys):
    """labeler=human: the loop waits for the app's votes; meanwhile the store's record of the round (what the Rounds
    page reads) shows the round, its steps so far and its labeling progress vote by vote."""
    import threading
    import time

    config = load_config(LoopConfig, name="people", runs_dir=str(tmp_path), rounds=1, base_model=tiny_model_dir,
                         device="cpu", align=["dpo"], labeler="human", poll_seconds=0.05,
                         generate={"limit": 4, "n": 2, "rank": 0, "max_new_tokens": 6, "batch_size": 4},
                         dpo={"epochs": 1.0, "batch_size": 2, "max_length": 64}, export={"test_size": 0.0},
                         evaluate={"limit": 3, "max_new_tokens": 6})
    outcome: dict = {}
    loop = threading.Thread(target=lambda: outcome.update(run(config)))
    loop.start()
    store_path = tmp_path / "people" / "store.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (store_path.exists() and rounds(Store(f"sqlite:///{store_path}"))):
        time.sleep(0.1)
    store = Store(f"sqlite:///{store_path}")
    store.add_annotator("alice")
    tasks = store.tasks(round=1)
    seen = []
    for task in tasks:
        [entry] = rounds(store)[0]["rounds"]
        seen.append(entry["pairs"]["votes"])
        assert entry["steps"] == ["generate"]  # still waiting for the labels
        store.submit("alice", task["task_id"], "A")
    loop.join(timeout=300)
    assert not loop.is_alive() and outcome
    assert seen == list(range(len(tasks))) and len(tasks) == 4
    [entry] = rounds(store)[0]["rounds"]
    assert entry["steps"] == ["generate", "label", "export", "dpo", "evaluate"]
    assert entry["pairs"]["complete_tasks"] == 4 and entry["annotators"][0]["annotator"] == "alice"
    assert entry["labels"]["train"] == 4 and entry["models"][0]["label"] == "dpo"
    assert "waiting for labels" in capsys.readouterr().out


def test_next_policy_is_the_higher_win_rate_by_gold_else_by_reward():
    evaluation = {"models": [{"model": "base"}, {"model": "r/dpo", "win_rate_gold": 0.6, "win_rate_reward": 0.9},
                             {"model": "r/ppo", "win_rate_gold": 0.7, "win_rate_reward": 0.8}]}
    assert _next_policy(evaluation, ["r/dpo", "r/ppo"]) == "r/ppo"
    for row in evaluation["models"]:
        row.pop("win_rate_gold", None)
    assert _next_policy(evaluation, ["r/dpo", "r/ppo"]) == "r/dpo"
    assert _next_policy(evaluation, ["r/ppo"]) == "r/ppo"


@pytest.mark.slow
def test_several_rl_methods_share_one_reward_model_and_are_compared_in_one_report(tmp_path, tiny_model_dir, capsys):
    config = load_config(LoopConfig, name="rl", runs_dir=str(tmp_path), base_model=tiny_model_dir, device="cpu",
                         align=["rloo", "grpo"], generate={"limit": 8, "max_new_tokens": 6, "batch_size": 8},
                         export={"test_size": 0.4}, reward={"model": "", "batch_size": 4, "max_length": 64},
                         ppo={"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1,
                              "max_new_tokens": 6, "samples_per_prompt": 2},
                         evaluate={"limit": 6, "max_new_tokens": 6})
    result = run(config)
    rd = tmp_path / "rl" / "round-1"
    assert not (rd / "dpo.json").exists() and not (rd / "ppo.json").exists()
    for method in ("rloo", "grpo"):
        summary = json.loads((rd / f"{method}.json").read_text())
        assert summary["estimator"] == method and summary["critic"] is False
        assert summary["reward"] == str(rd / "reward") and summary["samples_per_prompt"] == 2
        # the simulated labels' gold is scored beside the reward model on every step
        assert all("objective/gold" in json.loads(line) for line in (rd / method / "metrics.jsonl").open())
    models = [m["model"] for m in result["evaluation"]["models"]]
    assert models[2:] == [str(rd / "rloo"), str(rd / "grpo")]
    out = capsys.readouterr().out
    assert "RLOO vs base" in out and "GRPO vs base" in out and out.count("[round-1] reward ...") == 1


def test_loop_options_are_checked():
    assert load_config(LoopConfig, align=["both", "rloo"]).align == ["dpo", "ppo", "rloo"]
    with pytest.raises(UserError, match="distinct"):
        load_config(LoopConfig, align=["dpo", "dpo"])
    with pytest.raises(UserError):
        load_config(LoopConfig, align=["rlaif"])
    with pytest.raises(UserError):
        load_config(LoopConfig, labeler="crowd")
    with pytest.raises(UserError, match="generate: "):
        load_config(LoopConfig, generate={"n": 1})  # the stage's own check, when the loop's config is read
    with pytest.raises(UserError, match="unknown option"):
        load_config(LoopConfig, dpo={"learning_rat": 1e-5})


def test_a_stage_option_set_on_the_command_line_reaches_the_stage(tmp_path, monkeypatch):
    """`rlhf loop --ppo.cliprange 0.1`: any PPOConfig option, not only those the loop names, reaches PPO."""
    from rlhf import loop

    seen = {}
    monkeypatch.setattr(loop, "run", lambda config: seen.setdefault("config", config))
    assert main(["loop", "--runs_dir", str(tmp_path), "--ppo.cliprange", "0.1", "--ppo.steps", "3"]) == 0
    from rlhf.ppo import PPOConfig

    ppo = loop.stage_config(seen["config"], "ppo", PPOConfig, model="m", output_dir=str(tmp_path / "ppo"))
    assert (ppo.cliprange, ppo.steps, ppo.learning_rate, ppo.model) == (0.1, 3, 1.4e-3, "m")


def test_demo_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--generate.limit" in out and "--ppo.steps" in out


@pytest.mark.parametrize("store_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_round_on_postgresql(tmp_path, tiny_model_dir, store_url, capsys):
    """The loop keeps its tasks and votes in PostgreSQL when given a URL (as a team sharing one store would)."""
    config = load_config(LoopConfig, name="pg", runs_dir=str(tmp_path), rounds=1, base_model=tiny_model_dir,
                         device="cpu", align=["dpo"], db=store_url,
                         generate={"limit": 6, "max_new_tokens": 6, "batch_size": 6},
                         dpo={"epochs": 1.0, "batch_size": 3, "max_length": 64},
                         evaluate={"limit": 4, "max_new_tokens": 6})
    run(config)
    from sqlalchemy.engine import make_url

    password = make_url(store_url).password
    out = capsys.readouterr().out
    assert "store:" in out and (not password or f":{password}@" not in out)  # the URL is printed masked
    store = Store(store_url)
    # The demo's default tasks: one ranking of 4 per prompt.
    assert len(store.tasks(round=1, kind="rank")) == 6 and len(store.votes(round=1, kind="rank")) == 6
    assert not (tmp_path / "pg" / "store.db").exists()
    assert (tmp_path / "pg" / "round-1" / "dpo" / "model.safetensors").is_file()
    [recorded] = rounds(store)  # the Rounds page's record lives in PostgreSQL as well
    assert recorded["name"] == "pg" and recorded["rounds"][0]["models"][0]["label"] == "dpo"


def test_kto_in_align_rates_every_response_and_trains_on_the_ratings(tmp_path, tiny_model_dir, capsys):
    """align kto: generate adds a rating task per response, the simulated annotator rates them, the export holds
    them as KTO rows, and `rlhf kto` trains the round's model, evaluated beside the others."""
    config = load_config(LoopConfig, name="kto", runs_dir=str(tmp_path), base_model=tiny_model_dir, device="cpu",
                         align=["kto"], generate={"limit": 6, "n": 2, "rank": 0, "max_new_tokens": 6, "batch_size": 4},
                         label_sim={"rate_threshold": 0.0}, export={"test_size": 0.0},
                         kto={"max_steps": 2, "batch_size": 4, "max_length": 64, "eval_examples": 0},
                         evaluate={"limit": 3, "max_new_tokens": 6})
    result = run(config)
    rd = tmp_path / "kto" / "round-1"
    store = Store(f"sqlite:///{tmp_path / 'kto' / 'store.db'}")
    rated = store.tasks(kind="rate")
    assert len(rated) == 12 and all(len(t["votes"]) == 1 for t in rated)
    exported = json.loads((rd / "export.json").read_text())
    assert exported["ratings_train"] == 12 and not (rd / "dpo.json").exists()
    summary = json.loads((rd / "kto.json").read_text())
    assert summary["steps"] == 2
    assert str(rd / "kto") in [m["model"] for m in result["evaluation"]["models"]]
    assert "KTO vs base" in capsys.readouterr().out
    [entry] = rounds(store)[0]["rounds"]
    assert entry["ratings"]["complete_tasks"] == 12 and "kto" in entry["steps"]
    assert "ratings 12/12 votes, 12/12 tasks complete" in describe(rounds(store))


def test_a_human_round_waits_for_ratings_and_rankings_too(tmp_path, capsys):
    """The loop waits until every labeled kind of the round has its votes, not the pairs alone."""
    import threading

    from rlhf.loop import _wait_for_votes

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.add_annotator("ann")
    [pid] = store.add_prompts(["p"])
    _, [pair, rate_a, rate_b] = store.add_candidates(pid, [("a", "m", {}), ("b", "m", {})], [([0, 1], "random")],
                                                     round=1, rate=True)
    store.submit("ann", pair, "A")
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (_wait_for_votes(store, 1, 0.01), done.set()))
    waiter.start()
    assert not done.wait(0.3)  # the pair is voted, the ratings are not
    store.submit_rating("ann", rate_a, "up")
    store.submit_rating("ann", rate_b, "down")
    assert done.wait(30)
    waiter.join()
    assert "3/3 tasks complete" in capsys.readouterr().out
