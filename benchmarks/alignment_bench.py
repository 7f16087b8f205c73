"""The demo's round for several seeds: DPO, KTO, PPO and each critic-free estimator on the same labels per seed,
judged by the gold function against the base model and head to head against the prompt baseline.

    python benchmarks/alignment_bench.py --work /tmp/ab                       # seeds 0 1 2, every method
    python benchmarks/alignment_bench.py --work /tmp/ab --seeds 0 --methods dpo rloo
    python benchmarks/alignment_bench.py --work /tmp/ab --config my_loop.yaml # the loop's sections changed

Per seed, the round's stages run as `rlhf loop` would run them (each stage's config is built by the loop itself,
`rlhf.loop.stage_config`, from the demo's defaults or `--config`; seed s labels as the demo with `--seed s` does):
generate (with kto among the methods, a rating task per response too) -> label-sim -> export -> dpo -> kto (on the
ratings of the same responses) -> reward -> `rlhf ppo --estimator` for each RL method -> one `rlhf evaluate` of
every method against the base and the prompt baseline. Each stage is a subprocess of its own (`rlhf <stage>
--config <its yaml>`), so its wall time and peak resident memory (os.wait4) are its own (ru_maxrss counts from
before the child's exec, so no stage reads below this bench's own ~260 MB; the RL stages hold several GB). A stage
that finished left its summary in `<work>/seed-<s>/<stage>.json` and is not run again: a seed can be resumed, or
extended with another method (evaluate then runs again over all of them). `--config` changes the stages for every
seed: use a fresh `--work` for a new configuration. The evaluation samples `--eval_samples` responses (default 4)
per held-out prompt from every model, where the demo samples one: the 62 held-out prompts are all there are, and one
sample each leaves a win-rate near 85 % a binomial standard error of sqrt(0.85 * 0.15 / 62) = 4.5 points; the figure
measured is the same (docs/performance.md compares the two on the same policies).

Prints per seed and method: the gold win-rate over base and over the prompt baseline (head to head on the same
held-out prompts) with 95 % bootstrap intervals, the KL to base (nats per response), the stage's wall time and
peak memory; then per method the range over seeds and the goal's verdict: over the prompt baseline >= 65 % with
the interval's lower end above 50 % and over base >= 80 %, at KL <= 10 nats, on every seed. Run it alone: the
stages use every core, and wall times measured beside another heavy process mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf.loop import ALIGN_METHODS, RL_ESTIMATORS, LoopConfig, stage_config  # noqa: E402

GOAL_VS_PROMPT, GOAL_VS_BASE, GOAL_KL = 0.65, 0.80, 10.0


def run_stage(work: Path, name: str, argv: list[str], config) -> dict:
    """`rlhf <argv> --config <name>.yaml` in a subprocess; its wall time and peak RSS, kept in <name>.json."""
    marker = work / f"{name}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    from dataclasses import asdict

    cfg = work / "configs" / f"{name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {work.name} {name} ...", end="", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *argv, "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"\n{name} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    result = {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    marker.write_text(json.dumps(result) + "\n")
    print(f" {seconds:.0f} s, {result['peak_rss_mb']} MB")
    return result


def run_seed(loop: LoopConfig, work: Path, seed: int, methods: list[str], eval_samples: int = 1) -> dict:
    """One seed's round; returns {method: its figures}. eval_samples: responses per held-out prompt and model."""
    from rlhf.annotators import LabelSimConfig
    from rlhf.data import ExportConfig
    from rlhf.dpo import DPOConfig
    from rlhf.evaluate import EvaluateConfig
    from rlhf.generate import GenerateConfig
    from rlhf.kto import KTOConfig
    from rlhf.ppo import PPOConfig
    from rlhf.reward import RewardConfig

    work.mkdir(parents=True, exist_ok=True)
    db, k = f"sqlite:///{(work / 'store.db').resolve()}", 1  # round 1 of a loop run with --seed seed
    shared = {"device": loop.device, "precision": loop.precision}
    policy, gold = loop.base_model, loop.gold
    stages = {}
    stages["generate"] = run_stage(work, "generate", ["generate"], stage_config(
        loop, "generate", GenerateConfig, model=policy, db=db, prompts=loop.prompts, split="train", round=k,
        seed=seed + k, skip_existing=True, rate="kto" in methods, **shared))
    run_stage(work, "label", ["label-sim"], stage_config(
        loop, "label_sim", LabelSimConfig, db=db, annotator=f"sim-{gold.split(':')[0]}", gold=gold, round=k,
        seed=seed + k))
    run_stage(work, "export", ["data", "export"], stage_config(
        loop, "export", ExportConfig, db=db, out=str(work / "export"), seed=seed))
    if "dpo" in methods:
        stages["dpo"] = run_stage(work, "dpo", ["dpo"], stage_config(
            loop, "dpo", DPOConfig, model=policy, data=str(work / "export"), output_dir=str(work / "dpo"),
            seed=seed, **shared))
    if "kto" in methods:
        stages["kto"] = run_stage(work, "kto", ["kto"], stage_config(
            loop, "kto", KTOConfig, model=policy, data=str(work / "export"), output_dir=str(work / "kto"),
            seed=seed, **shared))
    rl = [m for m in methods if m in RL_ESTIMATORS]
    if rl:
        stages["reward"] = run_stage(work, "reward", ["reward"], stage_config(
            loop, "reward", RewardConfig, model=loop.reward.get("model") or policy, data=str(work / "export"),
            output_dir=str(work / "reward"), seed=seed, gold=gold, **shared))
    for m in rl:
        stages[m] = run_stage(work, m, ["ppo"], stage_config(
            loop, "ppo", PPOConfig, model=policy, reward_model=str(work / "reward"), prompts=loop.prompts,
            output_dir=str(work / m), seed=seed, estimator=RL_ESTIMATORS[m], gold=gold, **shared))
    name = "evaluate-" + "-".join(methods) + (f"-n{eval_samples}" if eval_samples > 1 else "")
    run_stage(work, name, ["evaluate"], stage_config(
        loop, "evaluate", EvaluateConfig, base=policy, aligned=[str(work / m) for m in methods], gold=gold,
        prompts=loop.prompts, reward=str(work / "reward") if rl else "", output_dir=str(work / name), seed=seed,
        samples_per_prompt=eval_samples, **shared))
    rows = {r["model"]: r for r in json.loads((work / name / "metrics.json").read_text())["models"]}
    figures = {}
    for m in methods:
        row = rows[str(work / m)]
        figures[m] = {"vs_base": row["win_rate_gold"], "vs_base_ci": row["win_rate_gold_ci"],
                      "vs_prompt": row.get("win_rate_gold_vs_prompt"),
                      "vs_prompt_ci": row.get("win_rate_gold_vs_prompt_ci"),
                      "kl": row["kl_vs_base"], **stages[m]}
    if rl:
        figures["_reward"] = json.loads((work / "reward" / "metrics.json").read_text())
    return figures


def pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}"


def ci(pair) -> str:
    return "" if not pair else f"[{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"


def meets(f: dict) -> bool:
    return (f["vs_prompt"] is not None and f["vs_prompt"] >= GOAL_VS_PROMPT and f["vs_prompt_ci"][0] > 0.5
            and f["vs_base"] >= GOAL_VS_BASE and f["kl"] is not None and f["kl"] <= GOAL_KL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="Directory for every seed's runs (resumable).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(ALIGN_METHODS), choices=ALIGN_METHODS)
    parser.add_argument("--eval_samples", type=int, default=4, help="Responses each model samples per held-out "
                        "prompt in the evaluation (the demo's evaluates 1): the win-rates measured with less "
                        "sampling noise, the intervals still over prompts.")
    parser.add_argument("--config", default="", help="A loop config (configs/loop.yaml's keys) whose sections "
                        "change the stages; default: the demo's.")
    args = parser.parse_args()
    from rlhf.config import load_config

    loop = load_config(LoopConfig, args.config or None, align=args.methods)
    work = Path(args.work)
    results = {}
    for seed in args.seeds:
        print(f"seed {seed}:")
        results[seed] = run_seed(loop, work / f"seed-{seed}", seed, args.methods, args.eval_samples)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{'method':<13} {'seed':>4}  {'vs base %':<22} {'vs prompt %':<22} {'KL':>6} {'wall s':>7} "
          f"{'peak MB':>8}")
    for m in args.methods:
        for seed in args.seeds:
            f = results[seed][m]
            print(f"{m:<13} {seed:>4}  {pct(f['vs_base'])} {ci(f['vs_base_ci']):<15} {pct(f['vs_prompt'])} "
                  f"{ci(f['vs_prompt_ci']):<15} {f['kl']:6.2f} {f['seconds']:7.0f} {f['peak_rss_mb']:8d}")
    if any("_reward" in results[s] for s in args.seeds):
        from rlhf.reward import summary_line

        for seed in args.seeds:
            if "_reward" in results[seed]:
                print(f"reward model, seed {seed}: {summary_line(results[seed]['_reward'])}")
    print(f"\ngoal: over the prompt baseline >= {100 * GOAL_VS_PROMPT:.0f} % (interval above 50 %), over base >= "
          f"{100 * GOAL_VS_BASE:.0f} %, KL <= {GOAL_KL:g}, on every seed")
    for m in args.methods:
        figures = [results[s][m] for s in args.seeds]
        vs_prompt = [f["vs_prompt"] for f in figures if f["vs_prompt"] is not None]
        met = sum(meets(f) for f in figures)
        base, kl = [f["vs_base"] for f in figures], [f["kl"] for f in figures]
        print(f"  {m:<13} vs prompt {pct(min(vs_prompt, default=None))} to {pct(max(vs_prompt, default=None))} %, "
              f"vs base {pct(min(base))} to {pct(max(base))} %, KL {min(kl):.1f} to {max(kl):.1f}: goal met on "
              f"{met} of {len(figures)} seeds")


if __name__ == "__main__":
    main()
