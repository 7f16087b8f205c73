"""Rounds of the whole loop: generate -> label -> export -> align -> evaluate -> next round's policy.

Align is DPO on the exported pairs, or a reward model trained on them and then PPO against it, or both side by
side (`align: both`): evaluation then compares both with the base, and the one with the higher gold win-rate
(the reward model's, without a gold function) becomes the next round's policy.

Each round writes under `runs/<name>/round-<k>/`; a step that finished leaves `<step>.json` there, so running
the same command again resumes where it stopped (a half-done generation continues with the prompts that have no
task yet). Labels come from simulated annotators (a gold function with Bradley-Terry noise), or from people in
the labeling app: then the loop waits, printing a progress line, until the round's tasks have their votes.

`rlhf demo` is this loop on the embedded SmolLM2-135M-Instruct with the controlled-sentiment task of the DPO
paper (§6.1): VADER sentiment as the gold function, prompts asking for film reviews, one round of DPO and of PPO,
and a report of both aligned models vs base and vs a prompt baseline.

    rlhf demo                                  # the main job, sized for a laptop CPU
    rlhf loop --config configs/loop.yaml --rounds 2
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.config import UserError, field, load_config
from rlhf.models import DEFAULT_MODEL


@dataclass
class LoopConfig:
    # Run
    name: str = field("demo", "Run name: everything goes under runs/<name>/ (running again resumes).")
    runs_dir: str = field("runs", "Parent directory of runs.")
    rounds: int = field(1, "Rounds of generate -> label -> align -> evaluate.")
    db: str = field("", "Database URL ('' = runs/<name>/store.db, a store of the run's own).")
    # Model
    base_model: str = field(DEFAULT_MODEL, "The starting policy (spec or directory).")
    device: str = field("auto", "auto, cpu, cuda.")
    precision: str = field("auto", "auto, fp32, bf16 or fp16.")
    # Data and generation
    prompts: str = field("sentiment", "Prompts: 'sentiment' (shipped, with a held-out test split) or a file.")
    prompts_per_round: int = field(128, "Training prompts labeled per round.")
    n: int = field(2, "Responses sampled per prompt (paired into one task).")
    max_new_tokens: int = field(48, "Maximum new tokens per response (generation and evaluation).")
    temperature: float = field(0.8, "Sampling temperature for candidates.")
    batch_size: int = field(32, "Sequences per generation batch.")
    # Labeling
    labeler: str = field("simulated", "simulated (gold + Bradley-Terry noise) or human (wait for the app's votes).")
    gold: str = field("sentiment", "Gold function of the simulated annotator and of evaluation.")
    tau: float = field(0.05, "Simulated annotator's Bradley-Terry temperature.")
    overlap: int = field(1, "Votes per task.")
    poll_seconds: float = field(10.0, "With labeler=human: seconds between progress checks.")
    # Alignment
    align: str = field("both", "dpo, ppo (reward model, then PPO against it) or both (compared in the report).")
    dpo_learning_rate: float = field(5e-5, "DPO learning rate.")
    dpo_beta: float = field(0.1, "DPO beta.")
    dpo_epochs: float = field(1.0, "DPO epochs over the round's pairs.")
    dpo_batch_size: int = field(8, "DPO pairs per step.")
    dpo_lora: bool = field(False, "DPO with a LoRA adapter (merged on save).")
    max_length: int = field(160, "Truncate prompt + response to this many tokens in training.")
    # Reward model and PPO (align: ppo or both)
    reward_backbone: str = field("minilm-l6", "Reward model backbone: a spec (minilm-l6: the 22M MiniLM encoder, "
                                 "5x cheaper than SmolLM2 and closer to the gold labels on the demo's 128 pairs) or "
                                 "'' for the round's policy (then the critic starts from the reward model).")
    reward_learning_rate: float = field(1e-4, "Reward model learning rate.")
    reward_epochs: float = field(4.0, "Reward model epochs over the labeled pairs.")
    reward_batch_size: int = field(8, "Reward model pairs per step.")
    ppo_steps: int = field(12, "PPO steps (each: ppo_batch_size rollouts, then ppo_epochs of updates).")
    ppo_batch_size: int = field(16, "PPO rollouts per step.")
    ppo_mini_batch_size: int = field(8, "PPO rollouts per optimizer update.")
    ppo_epochs: int = field(1, "PPO passes over each rollout batch.")
    ppo_learning_rate: float = field(6e-5, "PPO learning rate (policy and critic).")
    ppo_kl_coef: float = field(0.05, "PPO's KL penalty beta.")
    # Evaluation
    eval_prompts: int = field(64, "Held-out prompts in each round's evaluation.")
    prompt_baselines: list[str] = field(["Always write warm, enthusiastic, positive movie reviews."],
                                        "System prompts steering the base model: the cheap alternative to beat.")
    seed: int = field(0, "Random seed.")

    def __post_init__(self):
        if self.labeler not in ("simulated", "human"):
            raise ValueError("labeler must be simulated or human")
        if self.align not in ("dpo", "ppo", "both"):
            raise ValueError("align must be dpo, ppo or both")
        if min(self.rounds, self.prompts_per_round, self.eval_prompts, self.overlap) < 1 or self.n < 2:
            raise ValueError("rounds, prompts_per_round, eval_prompts and overlap must be >= 1; n >= 2")


def _step(path: Path, name: str, timings: dict, fn):
    """Run a step once: its result is kept in <name>.json, and a second run of the loop reuses it."""
    marker = path / f"{name}.json"
    if marker.is_file():
        result = json.loads(marker.read_text())
        print(f"[{path.name}] {name}: done earlier, skipped")
        timings[f"{path.name}/{name}"] = result.get("_seconds", 0.0)
        return result
    print(f"[{path.name}] {name} ...", flush=True)
    start = time.perf_counter()
    result = fn() or {}
    result = json.loads(json.dumps(result, default=str))
    result["_seconds"] = round(time.perf_counter() - start, 1)
    timings[f"{path.name}/{name}"] = result["_seconds"]
    marker.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _wait_for_votes(store, round_: int, poll: float) -> dict:
    while True:
        progress = store.progress(round=round_)
        print(f"\r  waiting for labels: {progress['votes']}/{progress['slots']} votes, "
              f"{progress['complete_tasks']}/{progress['tasks']} tasks complete", end="", flush=True)
        if progress["complete_tasks"] >= progress["tasks"]:
            print()
            return progress
        time.sleep(poll)


def run(config: LoopConfig) -> dict:
    from rlhf.annotators import LabelSimConfig, label_sim
    from rlhf.data import ExportConfig, run_export
    from rlhf.dpo import DPOConfig
    from rlhf.dpo import run as run_dpo
    from rlhf.evaluate import EvaluateConfig
    from rlhf.evaluate import run as run_evaluate
    from rlhf.generate import GenerateConfig
    from rlhf.generate import run as run_generate
    from rlhf.ppo import PPOConfig
    from rlhf.ppo import run as run_ppo
    from rlhf.reward import RewardConfig
    from rlhf.reward import run as run_reward
    from rlhf.store import Store

    root = Path(config.runs_dir) / config.name
    root.mkdir(parents=True, exist_ok=True)
    (root / "loop.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    db = config.db or f"sqlite:///{(root / 'store.db').resolve()}"
    store = Store(db)
    timings: dict[str, float] = {}
    policy = config.base_model
    start = time.perf_counter()
    for k in range(1, config.rounds + 1):
        rd = root / f"round-{k}"
        rd.mkdir(exist_ok=True)
        _step(rd, "generate", timings, lambda: run_generate(load_config(
            GenerateConfig, model=policy, db=db, prompts=config.prompts, split="train", limit=config.prompts_per_round,
            n=config.n, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            batch_size=config.batch_size, seed=config.seed + k, overlap=config.overlap, round=k,
            device=config.device, precision=config.precision, skip_existing=True)))
        if config.labeler == "simulated":
            _step(rd, "label", timings, lambda: label_sim(load_config(
                LabelSimConfig, db=db, annotator=f"sim-{config.gold.split(':')[0]}", gold=config.gold,
                tau=config.tau, round=k, seed=config.seed + k)))
        else:
            _step(rd, "label", timings, lambda: _wait_for_votes(store, k, config.poll_seconds))
        # Every round trains on all pairs labeled so far.
        _step(rd, "export", timings, lambda: run_export(load_config(
            ExportConfig, db=db, out=str(rd / "export"), seed=config.seed)))
        aligned = []
        if config.align in ("dpo", "both"):
            _step(rd, "dpo", timings, lambda: run_dpo(load_config(
                DPOConfig, model=policy, data=str(rd / "export"), output_dir=str(rd / "dpo"),
                learning_rate=config.dpo_learning_rate, beta=config.dpo_beta, epochs=config.dpo_epochs,
                batch_size=config.dpo_batch_size, lora=config.dpo_lora, max_length=config.max_length,
                device=config.device, precision=config.precision, seed=config.seed, logging_steps=4)))
            aligned.append(str(rd / "dpo"))
        if config.align in ("ppo", "both"):
            # With the policy as backbone the critic starts from the reward model (same tokenizer); with another
            # backbone PPO starts the critic from the policy with a zero value head.
            _step(rd, "reward", timings, lambda: run_reward(load_config(
                RewardConfig, model=config.reward_backbone or policy, data=str(rd / "export"),
                output_dir=str(rd / "reward"), learning_rate=config.reward_learning_rate, epochs=config.reward_epochs,
                batch_size=config.reward_batch_size, max_length=config.max_length, device=config.device,
                precision=config.precision, seed=config.seed)))
            _step(rd, "ppo", timings, lambda: run_ppo(load_config(
                PPOConfig, model=policy, reward_model=str(rd / "reward"), prompts=config.prompts,
                prompt_split="train", max_new_tokens=config.max_new_tokens, steps=config.ppo_steps,
                batch_size=config.ppo_batch_size, mini_batch_size=config.ppo_mini_batch_size,
                ppo_epochs=config.ppo_epochs, learning_rate=config.ppo_learning_rate, kl_coef=config.ppo_kl_coef,
                output_dir=str(rd / "ppo"), device=config.device, precision=config.precision, seed=config.seed)))
            aligned.append(str(rd / "ppo"))
        if policy != config.base_model:
            aligned.append(policy)  # last round's policy, to see this round's gain
        # With a reward model, the report shows its win-rates beside the gold's: a gap between them is reward hacking.
        evaluation = _step(rd, "evaluate", timings, lambda: run_evaluate(load_config(
            EvaluateConfig, base=config.base_model, aligned=aligned, gold=config.gold, prompts=config.prompts,
            reward=str(rd / "reward") if config.align != "dpo" else "",
            split="test", limit=config.eval_prompts, max_new_tokens=config.max_new_tokens,
            prompt_baselines=config.prompt_baselines, output_dir=str(rd / "eval"), device=config.device,
            precision=config.precision, seed=config.seed)))
        candidates = aligned[: 2 if config.align == "both" else 1]
        policy = _next_policy(evaluation, candidates)

    total = time.perf_counter() - start
    print("\nwall time per stage:")
    for key, seconds in timings.items():
        print(f"  {key:<24} {seconds:8.1f} s")
    print(f"  {'total (this run)':<24} {total:8.1f} s")
    _print_verdict(evaluation, candidates, root, config, db)
    return {"timings": timings, "evaluation": evaluation, "policy": policy}


def _next_policy(evaluation: dict, candidates: list[str]) -> str:
    """The candidate with the highest win-rate over base: by the gold function where there is one, else by the
    reward model (evaluation's figures for each aligned model, in the order they were given)."""
    rows = {m["model"]: m for m in evaluation["models"]}
    key = "win_rate_gold" if "win_rate_gold" in rows[candidates[0]] else "win_rate_reward"
    return max(candidates, key=lambda c: rows[c].get(key, 0.0))


def _print_verdict(evaluation: dict, candidates: list[str], root: Path, config: LoopConfig, db: str) -> None:
    """For this round's aligned models: the gold win-rate over base and whether they beat the prompt baseline."""
    rows = {m["model"]: m for m in evaluation["models"]}
    print()
    for path in candidates:
        row, name = rows[path], Path(path).name.upper()
        if "win_rate_gold" in row:
            lo, hi = row["win_rate_gold_ci"]
            print(f"{name} vs base on the gold oracle ({config.gold}): win-rate {100 * row['win_rate_gold']:.1f} % "
                  f"[{100 * lo:.1f}, {100 * hi:.1f}], KL {row['kl_vs_base']:.2f} nats")
        if "win_rate_gold_vs_prompt" in row:
            rate = row["win_rate_gold_vs_prompt"]
            lo, hi = row["win_rate_gold_vs_prompt_ci"]
            verdict = "beat" if lo > 0.5 else "did not beat" if hi < 0.5 else "was not distinguishable from"
            print(f"  {name} {verdict} the prompt baseline ({evaluation['best_prompt_baseline']}): "
                  f"win-rate {100 * rate:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]")
    if len(candidates) > 1:
        print(f"next round's policy: {Path(_next_policy(evaluation, candidates)).name.upper()} (higher win-rate)")
    report = root / f"round-{config.rounds}" / "eval" / "report.html"
    print(f"\nreport: {report.resolve()}")
    print(f"store:  {db}  (rlhf data stats --db {db})")
    print(f"label by hand on the same store:\n  rlhf annotators add YOUR_NAME --db {db}\n  rlhf label --db {db}")


def demo(config: LoopConfig) -> dict:
    """`rlhf demo`: the loop with the demo's defaults (the LoopConfig defaults), checked before it starts."""
    if config.base_model == DEFAULT_MODEL:
        from rlhf.models import pull_default

        pull_default()  # fail fast, with the pip command, if the embedded model's wheel is missing
    if config.labeler != "simulated":
        raise UserError("the demo labels with simulated annotators; use `rlhf loop` for human labels")
    return run(config)
