"""Rounds of the whole loop: generate -> label -> export -> align -> evaluate -> next round's policy.

Align is a list of methods run side by side on the same labels: `dpo` on the exported pairs, `kto` on ratings of
single responses (with kto in align, every generated response also gets a rating task), and RL against a reward
model trained on the pairs (trained once, shared): `ppo` (a critic and GAE), `rloo`, `grpo` and `reinforce_pp` (no
critic; `rlhf ppo --estimator`). Evaluation compares each with the base and the prompt baselines, and the one with
the higher gold win-rate (the reward model's, without a gold function) becomes the next round's policy.

Each round writes under `runs/<name>/round-<k>/`; a step that finished leaves `<step>.json` there, so running
the same command again resumes where it stopped (a half-done generation continues with the prompts that have no
task yet). Labels come from simulated annotators (a gold function with Bradley-Terry noise), or from people in
the labeling app: then the loop waits, printing a progress line, until the round's tasks have their votes.

`rlhf demo` is this loop on the embedded SmolLM2-135M-Instruct with the controlled-sentiment task of the DPO
paper (§6.1): VADER sentiment as the gold function, prompts asking for film reviews, one round of DPO and of RLOO
with a reward model (the critic-free estimator that measured best: docs/performance.md), and a report of both
aligned models vs base and vs a prompt baseline.

Each stage is configured by a section of the loop's config holding that stage's own options (`ppo: {steps: 20}`
in YAML, `--ppo.steps 20` on the command line), merged over the stage's defaults.

    rlhf demo                                  # the main job, sized for a laptop CPU
    rlhf loop --config configs/loop.yaml --rounds 2 --ppo.learning_rate 1e-5
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.config import UserError, check_sections, field, load_config, section
from rlhf.models import DEFAULT_MODEL

# The loop's alignment methods: DPO, or RL with a reward model and the estimator (rlhf.ppo) each names.
RL_ESTIMATORS = {"ppo": "gae", "rloo": "rloo", "grpo": "grpo", "reinforce_pp": "reinforce_pp"}
ALIGN_METHODS = ("dpo", "kto", *RL_ESTIMATORS)


@dataclass
class LoopConfig:
    """The loop's own options, and one section per stage holding that stage's options (its `rlhf <stage> --help`),
    merged over the stage's defaults: `dpo: {beta: 0.2}` in YAML, `--dpo.beta 0.2` on the command line. The loop
    sets in every stage what it must share across them: the store, the models and data each round hands on, the
    device, the precision, the seed, the prompts and the gold function."""

    # Run
    name: str = field("demo", "Run name: everything goes under runs/<name>/ (running again resumes).")
    runs_dir: str = field("runs", "Parent directory of runs.")
    rounds: int = field(1, "Rounds of generate -> label -> align -> evaluate.")
    db: str = field("", "Database URL ('' = runs/<name>/store.db, a store of the run's own).")
    # Shared by every stage
    base_model: str = field(DEFAULT_MODEL, "The starting policy (spec or directory).")
    device: str = field("auto", "auto, cpu, cuda.")
    precision: str = field("auto", "auto, fp32, bf16 or fp16.")
    prompts: str = field("sentiment", "Prompts: 'sentiment' (shipped, with a held-out test split) or a file.")
    gold: str = field("sentiment", "Gold function of the simulated annotator and of evaluation.")
    seed: int = field(0, "Random seed (round k generates and labels with seed + k).")
    # Labeling and alignment
    labeler: str = field("simulated", "simulated (gold + Bradley-Terry noise) or human (wait for the app's votes).")
    poll_seconds: float = field(10.0, "With labeler=human: seconds between progress checks.")
    align: list[str] = field(["dpo", "rloo"], "Alignment methods, compared side by side in the report: dpo, kto (on "
                             "ratings: each response also gets a rating task), and RL against a reward model trained "
                             "on the same pairs: ppo, rloo, grpo, reinforce_pp (the `ppo` section configures every RL "
                             "method; `rlhf ppo --estimator`). 'both' = dpo ppo.")
    # The stages, each with its own options
    generate: dict = section(
        "rlhf.generate:GenerateConfig", "Candidates for labeling (`rlhf generate`); `limit` = prompts per round.",
        # Every one of the 254 train prompts, each a ranking of 4 responses: 6 pairs from 4 samples, so the
        # reward model learns from ~1400 pairs and its held-out split (25 prompts) holds ~150 (docs/performance.md,
        # "Reward-model recipes").
        # 128 rows (32 prompts) a batch: a decoding step reads every weight once whatever its rows, so more rows a
        # step give more tokens per second (docs/performance.md, "Batch sizes and repeated prompts").
        {"limit": 0, "n": 4, "rank": 4, "max_new_tokens": 48, "temperature": 0.8, "batch_size": 128, "overlap": 1},
        fixed=("model", "db", "prompts", "split", "round", "seed", "device", "precision", "skip_existing", "rate"))
    label_sim: dict = section(
        "rlhf.annotators:LabelSimConfig", "The simulated annotator (`rlhf label-sim`), with labeler=simulated.",
        {"tau": 0.05}, fixed=("db", "annotator", "gold", "round", "seed"))
    export: dict = section(
        "rlhf.data:ExportConfig", "Training data from every vote so far (`rlhf data export`).", {},
        fixed=("db", "out", "seed"))
    dpo: dict = section(
        "rlhf.dpo:DPOConfig", "DPO on the exported pairs (`rlhf dpo`), with dpo in align.",
        # 64 of the ~150 held-out pairs: DPO's held-out figures, at half the forwards (the round's evaluation is the
        # judge of the aligned model).
        {"learning_rate": 5e-5, "beta": 0.1, "epochs": 1.0, "max_steps": 15, "batch_size": 8, "lora": False,
         "max_length": 160, "logging_steps": 4, "eval_pairs": 64},
        fixed=("model", "data", "output_dir", "device", "precision", "seed"))
    kto: dict = section(
        "rlhf.kto:KTOConfig", "KTO on the exported ratings (`rlhf kto`), with kto in align.",
        # 30 steps of 8 rated responses: as many sequences through the policy as DPO's 15 steps of 8 pairs, and
        # better than 15 on each of 3 seeds (docs/kto.md, "Measured on the demo's task").
        {"learning_rate": 5e-5, "beta": 0.1, "epochs": 1.0, "max_steps": 30, "batch_size": 8, "lora": False,
         "max_length": 160, "logging_steps": 4, "eval_examples": 64},
        fixed=("model", "data", "output_dir", "device", "precision", "seed"))
    reward: dict = section(
        "rlhf.reward:RewardConfig", "The reward model on the exported pairs (`rlhf reward`), for the RL methods; "
        "model '' = the round's policy (the critic then starts from the reward model; with another backbone, from "
        "the policy with a zero value head).",
        {"model": "minilm-l6", "learning_rate": 1.5e-4, "epochs": 1.0, "batch_size": 8, "max_length": 160},
        fixed=("data", "output_dir", "device", "precision", "seed", "gold"))
    ppo: dict = section(
        "rlhf.ppo:PPOConfig", "RL against the round's reward model (`rlhf ppo`), for every RL method in align (the "
        "method sets the estimator); gold is the loop's with labeler=simulated, scored every step.",
        {"prompt_split": "train", "max_new_tokens": 48, "steps": 12, "batch_size": 32, "mini_batch_size": 16,
         "ppo_epochs": 1, "learning_rate": 1.4e-3, "kl_coef": 0.1, "lora": True},
        fixed=("model", "reward_model", "prompts", "output_dir", "device", "precision", "seed", "estimator", "gold"))
    evaluate: dict = section(
        "rlhf.evaluate:EvaluateConfig", "Aligned vs base and the prompt baselines (`rlhf evaluate`); `limit` = "
        "held-out prompts.",
        # The 62 held-out prompts in one batch of 64: sampling at 4x the batch of the stage's default.
        {"split": "test", "limit": 64, "max_new_tokens": 48, "batch_size": 64,
         "prompt_baselines": ["Always write warm, enthusiastic, positive movie reviews."]},
        fixed=("base", "aligned", "names", "reward", "gold", "prompts", "output_dir", "device", "precision", "seed"),
        check_with={"aligned": ["the round's aligned models"]})

    def __post_init__(self):
        if self.labeler not in ("simulated", "human"):
            raise ValueError("labeler must be simulated or human")
        self.align = [m for a in self.align for m in (("dpo", "ppo") if a == "both" else (a,))]
        unknown = [m for m in self.align if m not in ALIGN_METHODS]
        if not self.align or unknown or len(set(self.align)) < len(self.align):
            raise ValueError(f"align must list distinct methods from {', '.join(ALIGN_METHODS)} (or 'both' = dpo "
                             f"ppo), not {' '.join(self.align) or 'nothing'}")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        check_sections(self)


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
    from rlhf.store import LABELED

    while True:
        # Pairs, rankings and ratings alike: the round is labeled when every task of every kind has its votes.
        each = [store.progress(round=round_, kind=kind) for kind in LABELED]
        progress = {key: sum(p[key] for p in each) for key in each[0]}
        print(f"\r  waiting for labels: {progress['votes']}/{progress['slots']} votes, "
              f"{progress['complete_tasks']}/{progress['tasks']} tasks complete", end="", flush=True)
        if progress["complete_tasks"] >= progress["tasks"]:
            print()
            return progress
        time.sleep(poll)


def stage_config(config: LoopConfig, stage: str, cls: type, **fixed):
    """A stage's config: its defaults, then the loop's section for it, then what the loop sets (`fixed`)."""
    return load_config(cls, **{**getattr(config, stage), **fixed})


def _round(config: LoopConfig, k: int, policy: str, db: str, store, rd: Path, timings: dict) -> tuple[dict, list]:
    """One round in `rd`: generate -> label -> export -> align -> evaluate. Returns the evaluation and the round's
    aligned models, the candidates for the next policy."""
    from rlhf.annotators import LabelSimConfig, label_sim
    from rlhf.data import ExportConfig, run_export
    from rlhf.dpo import DPOConfig
    from rlhf.dpo import run as run_dpo
    from rlhf.evaluate import EvaluateConfig
    from rlhf.evaluate import run as run_evaluate
    from rlhf.generate import GenerateConfig
    from rlhf.generate import run as run_generate
    from rlhf.kto import KTOConfig
    from rlhf.kto import run as run_kto
    from rlhf.ppo import PPOConfig
    from rlhf.ppo import run as run_ppo
    from rlhf.reward import RewardConfig
    from rlhf.reward import run as run_reward
    from rlhf.rounds import record_step

    def step(name: str, fn) -> dict:
        # Recorded in the store as well, resumed or not: the app's Rounds page reads it there.
        result = _step(rd, name, timings, fn)
        record_step(store, rd.parent, config.name, k, name, result)
        return result

    shared = {"device": config.device, "precision": config.precision}
    step("generate", lambda: run_generate(stage_config(
        config, "generate", GenerateConfig, model=policy, db=db, prompts=config.prompts, split="train", round=k,
        seed=config.seed + k, skip_existing=True, rate="kto" in config.align, **shared)))
    if config.labeler == "simulated":
        step("label", lambda: label_sim(stage_config(
            config, "label_sim", LabelSimConfig, db=db, annotator=f"sim-{config.gold.split(':')[0]}",
            gold=config.gold, round=k, seed=config.seed + k)))
    else:
        step("label", lambda: _wait_for_votes(store, k, config.poll_seconds))
    # Every round trains on all pairs labeled so far.
    step("export", lambda: run_export(stage_config(
        config, "export", ExportConfig, db=db, out=str(rd / "export"), seed=config.seed)))
    aligned = []
    gold = config.gold if config.labeler == "simulated" else ""
    rl = [m for m in config.align if m in RL_ESTIMATORS]
    for method in config.align:
        if method == "dpo":
            step("dpo", lambda: run_dpo(stage_config(
                config, "dpo", DPOConfig, model=policy, data=str(rd / "export"), output_dir=str(rd / "dpo"),
                seed=config.seed, **shared)))
        elif method == "kto":
            step("kto", lambda: run_kto(stage_config(
                config, "kto", KTOConfig, model=policy, data=str(rd / "export"), output_dir=str(rd / "kto"),
                seed=config.seed, **shared)))
        else:
            if method == rl[0]:  # one reward model for every RL method
                step("reward", lambda: run_reward(stage_config(
                    config, "reward", RewardConfig, model=config.reward.get("model") or policy,
                    data=str(rd / "export"), output_dir=str(rd / "reward"), seed=config.seed, gold=gold, **shared)))
            step(method, lambda m=method: run_ppo(stage_config(
                config, "ppo", PPOConfig, model=policy, reward_model=str(rd / "reward"), prompts=config.prompts,
                output_dir=str(rd / m), seed=config.seed, estimator=RL_ESTIMATORS[m], gold=gold, **shared)))
        aligned.append(str(rd / method))
    candidates = list(aligned)
    names = list(config.align)
    if policy != config.base_model:
        aligned.append(policy)  # last round's policy, to see this round's gain
        names.append(f"{Path(policy).parent.name} {Path(policy).name}")  # e.g. "round-1 dpo"
    # With a reward model, the report shows its win-rates beside the gold's: a gap between them is reward hacking.
    evaluation = step("evaluate", lambda: run_evaluate(stage_config(
        config, "evaluate", EvaluateConfig, base=config.base_model, aligned=aligned, names=names,
        gold=config.gold, prompts=config.prompts, reward=str(rd / "reward") if rl else "",
        output_dir=str(rd / "eval"), seed=config.seed, **shared)))
    return evaluation, candidates


def run(config: LoopConfig) -> dict:
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
        evaluation, candidates = _round(config, k, policy, db, store, rd, timings)
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
    from rlhf.store import masked_url

    rows = {m["model"]: m for m in evaluation["models"]}
    print()
    if evaluation.get("reward_model"):
        from rlhf.reward import summary_line

        print(f"REWARD model: {summary_line(evaluation['reward_model'])}")
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
    shown = masked_url(db)  # a PostgreSQL password stays out of the terminal and its logs
    print(f"store:  {shown}  (rlhf data stats --db {shown})")
    reward = root / f"round-{config.rounds}" / "reward"
    with_reward = f" --reward_model {reward.resolve()}" if reward.is_dir() else ""
    print(f"rounds: rlhf rounds --db {shown}")
    print(f"label by hand on the same store (an admin also sees the Rounds page, live):\n"
          f"  rlhf annotators add YOUR_NAME --admin --db {shown}\n  rlhf label --db {shown}{with_reward}")


def demo(config: LoopConfig) -> dict:
    """`rlhf demo`: the loop with the demo's defaults (the LoopConfig defaults), checked before it starts."""
    if config.base_model == DEFAULT_MODEL:
        from rlhf.models import pull_default

        pull_default()  # fail fast, with the pip command, if the embedded model's wheel is missing
    if config.labeler != "simulated":
        raise UserError("the demo labels with simulated annotators; use `rlhf loop` for human labels")
    return run(config)
