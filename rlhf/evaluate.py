"""Aligned vs base: generate from each model on the same held-out prompts and seeds, score, compare, report.

For every aligned model, against the base model:
  - win-rate by the gold function and by the reward model: per prompt, 1 if the aligned response scores higher,
    0.5 on a tie, with a 95 % percentile-bootstrap interval over prompts (Efron & Tibshirani 1993, ch. 13). With
    `samples_per_prompt` n, every model answers each prompt n times and a prompt's figure is the mean of its n
    comparisons (the i-th sample of one model against the i-th of the other): the same win-rate, measured with
    less sampling noise, the interval still resampling prompts;
  - mean gold and reward scores; response lengths (tokens, words); distinct-1/2 (Li et al. 2016);
  - KL(aligned || base), estimated from the aligned samples as the mean over prompts of
    sum_t [log pi_aligned(y_t | x, y_<t) - log pi_base(y_t | x, y_<t)]  (the sequence-level KL of the DPO paper,
    §6.1). Departure: both log-probs use logits / temperature, i.e. the KL between the distributions that were
    actually sampled from, so the estimator stays unbiased at temperatures other than 1.
Several aligned models (checkpoints or rounds) give the reward-vs-KL frontier (the shape of DPO's Fig. 2).
With `db`, people's arena votes in that store (tasks of kind `arena`: one response from each of two models) add the
human win-rate of each aligned model over base and Bradley-Terry ratings of every model voted on, on the Elo
scale Chatbot Arena uses (Chiang et al. 2024), both with bootstrap intervals over votes.
Writes `metrics.json` and a self-contained `report.html` (plots embedded as PNG, every model output escaped).

    rlhf evaluate --base smollm2-135m-instruct --aligned runs/demo/round-1/dpo --limit 32 --max_new_tokens 48
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf import losses
from rlhf.annotators import load_gold
from rlhf.arena import arena_figures, arena_name, arena_outcomes, bootstrap_ci, bradley_terry  # noqa: F401
from rlhf.config import field
from rlhf.data import read_prompts
from rlhf.models import DEFAULT_MODEL, load
from rlhf.sample import generate_batch, render_prompt


@dataclass
class EvaluateConfig:
    # Models
    base: str = field(DEFAULT_MODEL, "The base model (spec or directory).")
    aligned: list[str] = field([], "One or more aligned models to compare with the base (several: a frontier).")
    names: list[str] = field([], "The aligned models' names in the report, one per aligned model (default: each "
                             "directory's name, e.g. dpo and rloo for a loop round's).")
    reward: str = field("", "Reward model directory for reward win-rates ('' to skip).")
    gold: str = field("sentiment", "Gold function: sentiment, length[:N], keyword[:w,..], module:function; '' to skip.")
    device: str = field("auto", "auto, cpu, cuda, mps.")
    precision: str = field("auto", "auto, fp32, bf16 or fp16.")
    # Data
    prompts: str = field("sentiment", "Prompts: 'sentiment' (shipped set) or a .jsonl (prompt/messages) / .txt file.")
    split: str = field("test", "Keep prompts of this split when the file has a split column ('' keeps all).")
    limit: int = field(64, "Evaluate on at most this many prompts (0: all).")
    system: str = field("", "Optional system prompt for every model.")
    prompt_baselines: list[str] = field([], "System prompts that steer the base model: baselines the aligned "
                                        "models must beat (e.g. 'Always write glowing, positive reviews.').")
    # Generation
    max_new_tokens: int = field(48, "Maximum new tokens per response.")
    temperature: float = field(0.7, "Sampling temperature (the same for every model; 0 is greedy).")
    top_p: float = field(1.0, "Nucleus sampling; keep 1.0 for an unbiased KL estimate.")
    batch_size: int = field(16, "Responses per generation batch.")
    samples_per_prompt: int = field(1, "Responses each model samples per prompt; win-rates and KL average a "
                                    "prompt's samples (less noise for n times the sampling).")
    seed: int = field(0, "Seed: every model samples with the same seeds on the same prompts.")
    db: str = field("", "Store whose arena votes (people comparing two models' answers) give human win-rates and "
                    "Bradley-Terry ratings ('' = none).")
    # Statistics and output
    bootstrap: int = field(1000, "Bootstrap resamples for the 95 % intervals.")
    output_dir: str = field("runs/eval", "Where metrics.json and report.html go.")
    samples_in_report: int = field(12, "Prompts shown side by side in the report.")

    def __post_init__(self):
        if not self.aligned:
            raise ValueError("name at least one aligned model (aligned: [dir, ...] or --aligned DIR)")
        if self.names and len(self.names) != len(self.aligned):
            raise ValueError(f"names: {len(self.names)} given for {len(self.aligned)} aligned models; give one each")
        if len(set(self.names)) != len(self.names) or any(n == "base" or n.startswith("prompt") or not n.strip()
                                                          for n in self.names):
            raise ValueError("names must be distinct, not empty, and not 'base' or 'prompt...' (the baselines' names)")
        if self.limit < 0 or min(self.batch_size, self.max_new_tokens, self.bootstrap, self.samples_per_prompt) < 1:
            raise ValueError("limit must be >= 0; batch_size, max_new_tokens, bootstrap and samples_per_prompt >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


# ---------------------------------------------------------------- statistics (pure)
# bootstrap_ci and the arena's statistics live in rlhf.arena, which the labeling app imports without torch;
# arena_outcomes and bradley_terry are imported above so that they stay importable from here.


def win_rate(aligned_scores, base_scores, samples_per_prompt: int = 1) -> np.ndarray:
    """Per prompt: 1 if aligned scored higher, 0.5 on a tie, 0 otherwise; with n samples per prompt (consecutive
    entries), the mean of the prompt's n comparisons."""
    a, b = np.asarray(aligned_scores, dtype=float), np.asarray(base_scores, dtype=float)
    return per_prompt(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0)), samples_per_prompt)


def per_prompt(values, samples_per_prompt: int) -> np.ndarray:
    """The mean of each prompt's n consecutive values: what the bootstrap resamples."""
    values = np.asarray(values, dtype=float)
    return values.reshape(-1, samples_per_prompt).mean(axis=1)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all word n-grams, across the responses (Li et al. 2016)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------- model passes


@torch.no_grad()
def response_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], temperature: float,
                      batch_size: int = 16) -> list[float]:
    """Sum of log pi(y_t | x, y_<t) over each response's tokens, from logits / temperature (1 when greedy)."""
    temp = temperature if temperature > 0 else 1.0
    totals = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, responses = prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
        seqs = [p + r for p, r in zip(prompts, responses)]
        width = max(len(s) for s in seqs)
        # Right padding: real tokens keep positions 0..len-1, so no position_ids are needed.
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        # Only the positions that predict a response token go through the vocabulary projection (most of a row is
        # its prompt), as an index tensor: a count would slice the hidden states into a non-contiguous view, on
        # which torch's linear copies a frozen weight once per row (docs/performance.md).
        first = max(min(len(p) for p in prompts) - 1, 0)
        keep = torch.arange(first, width - 1, device=model.device)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       logits_to_keep=keep).logits  # (B, width - 1 - first, V): predicts tokens first+1..width-1
        targets = ids[:, first + 1 :].to(model.device)
        # The float32 log-softmax a few rows at a time: over the whole batch its temporaries ran to gigabytes at 64
        # rows, and writing them cost more than the forward pass (docs/performance.md).
        token_logp = torch.cat([losses.logprobs_from_logits(logits[r : r + 4].float() / temp, targets[r : r + 4])
                                for r in range(0, len(seqs), 4)]).cpu()
        for i, (p, r) in enumerate(zip(prompts, responses)):
            totals.append(float(token_logp[i, len(p) - 1 - first : len(p) - 1 - first + len(r)].sum()))
    return totals


def _sample(loaded, prompts: list, system: str, config: EvaluateConfig, desc: str) -> dict:
    """Every prompt answered samples_per_prompt times (consecutive rows: the sampler prefills a repeated prompt
    once)."""
    texts = [render_prompt(loaded.tokenizer, p, system) for p in prompts for _ in range(config.samples_per_prompt)]
    results = []
    for start in tqdm(range(0, len(texts), config.batch_size), desc=f"sampling {desc}", unit="batch"):
        results += generate_batch(loaded.model, loaded.tokenizer, texts[start : start + config.batch_size],
                                  max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, generator_seed=config.seed + start)
    return {"texts": [r["text"] for r in results], "response_ids": [r["token_ids"] for r in results],
            "prompt_ids": [loaded.tokenizer(t, add_special_tokens=False).input_ids for t in texts],
            "tokens": [r["new_tokens"] for r in results]}


def _summary(texts: list[str], tokens: list[int]) -> dict:
    return {"mean_tokens": float(np.mean(tokens)), "mean_words": float(np.mean([len(t.split()) for t in texts])),
            "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}


def _add_win_rates(row: dict, scores: dict, against: dict, suffix: str, config: EvaluateConfig) -> None:
    for key, values in scores.items():
        mean, lo, hi = bootstrap_ci(win_rate(values, against[key], config.samples_per_prompt), config.bootstrap,
                                    config.seed)
        row[f"win_rate_{key}{suffix}"] = mean
        row[f"win_rate_{key}{suffix}_ci"] = [lo, hi]


def run(config: EvaluateConfig) -> dict:
    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(config.prompts, config.split, config.limit)
    gold = load_gold(config.gold) if config.gold else None
    reward_model = None
    if config.reward:
        from rlhf.reward import RewardModel

        reward_model = RewardModel.load(config.reward, device=config.device, precision=config.precision)

    answered = [p for p in prompts for _ in range(config.samples_per_prompt)]  # the prompt of every response

    def scores(texts: list[str]) -> dict:
        result = {}
        if gold is not None:
            result["gold"] = [float(x) for x in gold(answered, texts)]
        if reward_model is not None:
            result["reward"] = reward_model.score(answered, texts).tolist()
        return result

    base_model = load(config.base, device=config.device, precision=config.precision)
    # The base under the plain prompt, then prompt baselines (the same base model steered by a system prompt),
    # then the aligned models; KL of each against the base is taken on that contestant's own samples.
    contestants = [("base", "base", config.base, config.system)]
    contestants += [("prompt", f"prompt {i + 1}" if len(config.prompt_baselines) > 1 else "prompt", config.base,
                     system) for i, system in enumerate(config.prompt_baselines)]
    contestants += [("aligned", label, spec, config.system)
                    for label, spec in zip(aligned_labels(config.aligned, config.names), config.aligned)]
    rows, samples, all_scores = [], {}, {}
    base_prompt_ids = None
    for role, label, spec, system in contestants:
        loaded = base_model if spec == config.base else load(spec, device=config.device, precision=config.precision)
        sampled = _sample(loaded, prompts, system, config, label)
        if role == "base":
            base_prompt_ids = sampled["prompt_ids"]
        row = {"label": label, "role": role, "model": spec, "system": system,
               **_summary(sampled["texts"], sampled["tokens"])}
        all_scores[label] = scores(sampled["texts"])
        row.update({f"mean_{k}": float(np.mean(v)) for k, v in all_scores[label].items()})
        if role == "base":
            row["kl_vs_base"] = 0.0
        elif len(loaded.tokenizer) == len(base_model.tokenizer):
            lp_model = response_logprobs(loaded.model, sampled["prompt_ids"], sampled["response_ids"],
                                         config.temperature, config.batch_size)
            lp_base = response_logprobs(base_model.model, base_prompt_ids, sampled["response_ids"],
                                        config.temperature, config.batch_size)
            kl = per_prompt(np.asarray(lp_model) - np.asarray(lp_base), config.samples_per_prompt)
            row["kl_vs_base"] = float(kl.mean())
            row["kl_vs_base_ci"] = list(bootstrap_ci(kl, config.bootstrap, config.seed)[1:])
        else:
            row["kl_vs_base"] = None  # different vocabularies: token log-probs are not comparable
        if role != "base":
            _add_win_rates(row, all_scores[label], all_scores["base"], "", config)
        rows.append(row)
        samples[label] = sampled["texts"][:: config.samples_per_prompt]  # the report shows each prompt's first
        if loaded is not base_model:
            del loaded

    # The cheap alternative to beat: the best prompt baseline by mean gold (else mean reward).
    baselines = [r for r in rows if r["role"] == "prompt"]
    key = "mean_gold" if gold is not None else "mean_reward" if reward_model is not None else None
    best = max(baselines, key=lambda r: r[key]) if baselines and key else None
    if best is not None:
        for row in rows:
            if row["role"] == "aligned":
                _add_win_rates(row, all_scores[row["label"]], all_scores[best["label"]], "_vs_prompt", config)

    if config.db:
        from rlhf.store import Store

        # The app names a prompt baseline by the base's spec and its system prompt (arena_name), so votes against
        # "the base told to be positive" are found here under the same name.
        names = {r["label"]: arena_name(r["model"], r["system"] if r["role"] == "prompt" else "") for r in rows}
        prompt_names = [names[r["label"]] for r in rows if r["role"] == "prompt"]
        human = arena_figures(Store(config.db, create=False).tasks(kind="arena"), config.base, config.aligned,
                              config.bootstrap, config.seed, baselines=prompt_names)
        for row in rows:
            name = names[row["label"]]
            if name in human["win_rate_human"] and row["role"] != "base":
                figure = human["win_rate_human"][name]
                row["win_rate_human"], row["win_rate_human_ci"] = figure["mean"], figure["ci"]
            # Against the best prompt baseline by the oracle, like the other "_vs_prompt" figures (the only one when
            # nothing scores them).
            target = best or (baselines[0] if len(baselines) == 1 else None)
            versus = human["win_rate_human_vs"].get(name, {}).get(names[target["label"]] if target else "")
            if versus is not None:
                row["win_rate_human_vs_prompt"], row["win_rate_human_vs_prompt_ci"] = versus["mean"], versus["ci"]
    metrics = {"config": asdict(config), "n_prompts": len(prompts), "models": rows,
               "arena": human if config.db else None, "reward_model": _reward_evidence(config.reward),
               "best_prompt_baseline": best["label"] if best else None,
               "rl_curves": rl_curves(rows), "seconds": round(time.perf_counter() - start, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.html").write_text(render_report(metrics, prompts, samples, config))
    _print_summary(metrics, out)
    return metrics


def aligned_labels(aligned: list[str], names: list[str]) -> list[str]:
    """The report's name of each aligned model: the user's, else its directory's name (a loop round's dpo, rloo),
    else "aligned i" where those names repeat or would read as the base or a prompt baseline."""
    if names:
        return list(names)
    dirs = [Path(str(spec).rstrip("/")).name for spec in aligned]
    if len(set(dirs)) == len(dirs) and all(d and d != "base" and not d.startswith("prompt") for d in dirs):
        return dirs
    return [f"aligned {i + 1}" for i in range(len(aligned))] if len(aligned) > 1 else ["aligned"]


def rl_curves(rows: list[dict]) -> dict:
    """Per RL-trained model (a directory with the `rlhf ppo` metrics.jsonl), its training steps as the reward
    model and the gold saw them: KL, proxy score, gold score (when the run scored one) and the ensemble's spread.
    Gains are in units of step 1's spread over responses, so proxy and gold share an axis (as the guard measures
    them): a proxy that keeps rising while the gold falls is over-optimisation (Gao et al. 2022, fig. 1)."""
    curves = {}
    for row in rows:
        path = Path(str(row["model"])) / "metrics.jsonl"
        if row.get("role") != "aligned" or not path.is_file():
            continue
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not steps or "objective/scores" not in steps[0]:
            continue
        first = steps[0]

        def gain(step: dict, key: str, first: dict = first) -> float | None:
            if key not in step:
                return None
            return (step[key] - first[key]) / max(first.get(f"{key}_std", 1.0), 1e-6)

        curves[row["label"]] = [{"step": m["step"], "kl": m["objective/kl"], "proxy": m["objective/scores"],
                                 "gold": m.get("objective/gold"), "spread": m.get("objective/reward_spread"),
                                 "proxy_gain": gain(m, "objective/scores"), "gold_gain": gain(m, "objective/gold")}
                                for m in steps]
    return curves


# ---------------------------------------------------------------- report


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(metrics: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    aligned = metrics["models"][1:]
    names = [m["label"] for m in aligned]
    for key in ("gold", "reward"):
        if f"win_rate_{key}" not in aligned[0]:
            continue
        fig, ax = plt.subplots(figsize=(5, 0.6 + 0.5 * len(aligned)))
        rates = [100 * m[f"win_rate_{key}"] for m in aligned]
        errs = np.array([[r - 100 * m[f"win_rate_{key}_ci"][0], 100 * m[f"win_rate_{key}_ci"][1] - r]
                         for r, m in zip(rates, aligned)]).T
        ax.barh(names, rates, xerr=errs, color="#4c72b0", capsize=4)
        ax.axvline(50, color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"win-rate over base by {key} (%), 95 % bootstrap interval")
        plots.append((f"Win-rate by {key}", _png(fig)))
        plt.close(fig)
    score_key = "mean_gold" if "mean_gold" in aligned[0] else "mean_reward" if "mean_reward" in aligned[0] else None
    if score_key and all(m.get("kl_vs_base") is not None for m in aligned):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        kls = [0.0] + [m["kl_vs_base"] for m in aligned]
        vals = [metrics["models"][0][score_key]] + [m[score_key] for m in aligned]
        ax.plot(kls, vals, "o-", color="#dd8452")
        for label, x, y in zip(["base"] + names, kls, vals):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("KL(aligned || base), nats per response")
        ax.set_ylabel(score_key.replace("_", " "))
        ax.set_title("Reward vs KL frontier")
        plots.append(("Reward vs KL", _png(fig)))
        plt.close(fig)
    curves = metrics.get("rl_curves") or {}
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        has_gold = False
        for i, (name, steps) in enumerate(curves.items()):
            colour = colours[i % len(colours)]
            kls = [s["kl"] for s in steps]
            ax.plot(kls, [s["proxy_gain"] for s in steps], "-", color=colour, label=f"{name}: reward model")
            if all(s["gold_gain"] is not None for s in steps):
                has_gold = True
                ax.plot(kls, [s["gold_gain"] for s in steps], "--", color=colour, label=f"{name}: gold")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("KL(policy || reference) during training, nats per response")
        ax.set_ylabel("gain since step 1 (step-1 std units)")
        ax.set_title("Proxy vs gold reward during RL" if has_gold else "Reward-model score during RL")
        ax.legend(fontsize=7)
        plots.append(("Proxy and gold reward against KL, per RL step (the shape of Gao et al. 2022, fig. 1)",
                      _png(fig)))
        plt.close(fig)
    return plots


def render_report(metrics: dict, prompts: list, samples: dict[str, list[str]], config: EvaluateConfig) -> str:
    """A self-contained HTML page: the metrics table, plots, and samples; every model output is escaped."""
    e = html.escape
    cols = ["label", "model", "system", "mean_gold", "mean_reward", "win_rate_gold", "win_rate_reward",
            "win_rate_human", "win_rate_gold_vs_prompt", "win_rate_reward_vs_prompt", "win_rate_human_vs_prompt",
            "kl_vs_base", "mean_tokens", "distinct_1", "distinct_2"]
    cols = [c for c in cols if any(m.get(c) not in (None, "") for m in metrics["models"])]

    def cell(m: dict, c: str) -> str:
        v = m.get(c)
        if v is None:
            return "—"
        if isinstance(v, float):
            text = f"{100 * v:.1f} %" if c.startswith("win_rate") else f"{v:.3f}"
            if f"{c}_ci" in m:
                lo, hi = m[f"{c}_ci"]
                text += f" <small>[{100 * lo:.1f}, {100 * hi:.1f}]</small>" if c.startswith("win_rate") else \
                    f" <small>[{lo:.2f}, {hi:.2f}]</small>"
            return text
        return f"<small>{e(str(v))}</small>" if c in ("model", "system") else f"<b>{e(str(v))}</b>"

    header = "<tr>" + "".join(f"<th>{e(c.replace('_', ' ').replace('label', ''))}</th>" for c in cols) + "</tr>"
    table = header + "".join(
        "<tr>" + "".join(f"<td>{cell(m, c)}</td>" for c in cols) + "</tr>" for m in metrics["models"])
    plots = "".join(f"<figure><img alt='{e(t)}' src='{src}'><figcaption>{e(t)}</figcaption></figure>"
                    for t, src in _plots(metrics))
    names = list(samples)
    rows = []
    for i in range(min(config.samples_in_report, len(prompts))):
        prompt = prompts[i] if isinstance(prompts[i], str) else prompts[i][-1]["content"]
        rows.append("<tr><td class='prompt'>" + e(prompt) + "</td>" +
                    "".join(f"<td><pre>{e(samples[n][i])}</pre></td>" for n in names) + "</tr>")
    header = "<tr><th>prompt</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rlhf: aligned vs base</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; width: 100%; }}
th, td {{ border: 1px solid #ddd; padding: .4rem .6rem; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} small {{ color: #666; }}
pre {{ white-space: pre-wrap; word-break: break-word; margin: 0; font: inherit; max-height: 16em; overflow: auto; }}
figure {{ display: inline-block; margin: 0 1.5rem 1rem 0; }} figcaption {{ color: #555; font-size: .9em; }}
td.prompt {{ width: 18%; color: #444; }}
</style></head><body>
<h1>Aligned vs base</h1>
<p>{metrics['n_prompts']} held-out prompts ({e(config.prompts)}, split {e(config.split or 'all')}),
{config.samples_per_prompt} response{'s' if config.samples_per_prompt > 1 else ''} per prompt and model, temperature
{config.temperature}, {config.max_new_tokens} new tokens at most, seed {config.seed}; gold: {e(config.gold or 'none')};
reward model: {e(config.reward or 'none')}. Win-rates count a tie as half; intervals are 95 % bootstrap over prompts.
KL(aligned || base) is in nats per response.</p>
<table>{table}</table>
{plots}
{_reward_section(metrics.get("reward_model"))}
{_arena_section(metrics.get("arena"))}
<h2>Samples</h2>
<table>{header}{''.join(rows)}</table>
</body></html>
"""


_EVIDENCE = ("test_pairs", "test_prompts", "accuracy", "accuracy_ci", "eval_loss", "plain_loss", "ece", "ceiling",
             "share_of_ceiling", "gold_accuracy", "length_spearman", "longer_rejected_pairs",
             "accuracy_longer_rejected", "ensemble", "kept", "verdict")


def _reward_evidence(reward_dir: str) -> dict | None:
    """The reward model's held-out evidence from its metrics.json (written by `rlhf reward`), if there is one."""
    path = Path(reward_dir) / "metrics.json" if reward_dir else None
    if path is None or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return {k: saved[k] for k in _EVIDENCE if k in saved}


def _reward_section(evidence: dict | None) -> str:
    """What the reward model is worth on held-out labels, in numbers and in words (a reward model at chance makes
    every reward win-rate above meaningless)."""
    if not evidence:
        return ""
    e = html.escape
    if not evidence.get("test_pairs"):
        return "<h2>Reward model</h2><p>No held-out pairs: nothing says whether the reward model generalises.</p>"
    lo, hi = evidence["accuracy_ci"]
    rows = [("held-out accuracy", f"{evidence['accuracy']:.3f} <small>[{lo:.3f}, {hi:.3f}]</small> on "
                                  f"{evidence['test_pairs']} pairs ({evidence['test_prompts']} prompts)")]
    ceiling = evidence.get("ceiling")
    if ceiling:
        rows.append(("ceiling", f"{ceiling['value']:.3f} <small>[{ceiling['ci'][0]:.3f}, {ceiling['ci'][1]:.3f}]: "
                                f"{e(ceiling['source'])}</small>"))
        if evidence.get("share_of_ceiling") is not None:
            rows.append(("share of the ceiling", f"{evidence['share_of_ceiling']:.0%}"))
    if "gold_accuracy" in evidence:
        rows.append(("agreement with the gold itself", f"{evidence['gold_accuracy']:.3f}"))
    plain = evidence.get("plain_loss", evidence["eval_loss"])
    rows.append(("loss / ECE", f"{plain:.3f} (ln 2 = 0.693 is a coin flip; with the margins "
                               f"{evidence['eval_loss']:.3f}) / {evidence['ece']:.3f}"))
    rho, longer = evidence.get("length_spearman"), evidence.get("accuracy_longer_rejected")
    rows.append(("length bias", f"Spearman(reward, words) {rho:.2f}" + (
        f"; accuracy {longer:.3f} on the {evidence['longer_rejected_pairs']} pairs whose longer response lost"
        if longer is not None else "")))
    if evidence.get("ensemble"):
        ens = evidence["ensemble"]
        low, high = ens.get("accuracy_low_spread"), ens.get("accuracy_high_spread")
        rows.append(("ensemble", f"{ens['members']} members, mean spread of r_c - r_r {ens['mean_pair_spread']:.3f}"
                                 + (f"; accuracy {low:.3f} where they agree most, {high:.3f} where least"
                                    if low is not None else "")))
    if isinstance(evidence.get("kept"), dict):
        rows.append(("checkpoint kept", f"step {evidence['kept']['step']} ({e(evidence['kept']['rule'])})"))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<h2>Reward model</h2><p><b>{e(evidence['verdict'])}</b></p><table>{table}</table>"


def _arena_section(arena: dict | None) -> str:
    """People's arena votes: Bradley-Terry ratings with intervals (model names escaped like everything else)."""
    if not arena:
        return ""
    if not arena["ratings"]:
        return "<h2>Arena</h2><p>No arena votes in the store yet.</p>"
    e = html.escape
    rows = "".join(f"<tr><td>{e(m)}</td><td>{r['rating']:.0f} "
                   f"<small>[{r['ci'][0]:.0f}, {r['ci'][1]:.0f}]</small></td></tr>"
                   for m, r in sorted(arena["ratings"].items(), key=lambda kv: -kv[1]["rating"]))
    return (f"<h2>Arena</h2><p>{arena['votes']} human votes between two models' answers; Bradley-Terry ratings on "
            f"the Elo scale (mean 1000), 95 % bootstrap intervals over votes.</p>"
            f"<table><tr><th>model</th><th>rating</th></tr>{rows}</table>")


def _print_summary(metrics: dict, out: Path) -> None:
    for m in metrics["models"][1:]:
        parts = [f"{m['label']} ({m['model']})"]
        for key in ("gold", "reward", "human"):
            if f"win_rate_{key}" in m:
                lo, hi = m[f"win_rate_{key}_ci"]
                parts.append(f"win-rate by {key} {100 * m[f'win_rate_{key}']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]")
            if f"win_rate_{key}_vs_prompt" in m:
                parts.append(f"vs best prompt baseline {100 * m[f'win_rate_{key}_vs_prompt']:.1f} %")
        if m.get("kl_vs_base") is not None:
            parts.append(f"KL {m['kl_vs_base']:.2f}")
        print(" | ".join(parts))
    print(f"report: {out / 'report.html'}  metrics: {out / 'metrics.json'}  ({metrics['seconds']} s)")
