"""The rounds of loop runs, as the store knows them: what the labeling app's Rounds page and `rlhf rounds` show.

`rlhf loop` records each round in the store it labels into, one JSON document per run (the store's records, in its
meta table), updated after every step: the pairs exported so far, the reward model's held-out accuracy beside the
ceiling, each aligned model's win-rates over base and over the prompt baseline with their intervals and KL, and
where the round's report is. Whoever opens the store sees every run's rounds, with no access to the run's
directory (a PostgreSQL store shared by machines); what changes by the minute, the labeling progress per annotator
and how well the app's reward model agrees with the votes arriving, is read live from the votes.

A store shared by several loop runs shares its round numbers too: their labeling progress is the store's round k.

    rlhf rounds --db sqlite:///runs/demo/store.db
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlhf.config import UserError, field

PREFIX = "loop:"


@dataclass
class RoundsConfig:
    db: str = field("", "Database URL ('' = sqlite under $RLHF_HOME); a loop run's own store is "
                        "runs/<name>/store.db.")
    json: bool = field(False, "Print the figures as JSON instead of tables.")


def run_key(root: Path) -> str:
    """The record key of the loop run in directory `root` (a hash: a path may be longer than a key)."""
    return PREFIX + hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- what the loop records


def _model_figures(row: dict) -> dict:
    """An evaluated model's win-rates by the best judge it has (gold, else the reward model), and its KL."""
    judge = next((j for j in ("gold", "reward", "human") if f"win_rate_{j}" in row), None)
    out = {"label": row["label"], "judge": judge, "kl": row.get("kl_vs_base")}
    if judge:
        for name, key in (("vs_base", f"win_rate_{judge}"), ("vs_prompt", f"win_rate_{judge}_vs_prompt")):
            if key in row:
                out[name], out[f"{name}_ci"] = row[key], row.get(f"{key}_ci")
    return out


def step_figures(step: str, result: dict) -> dict:
    """What a loop step's result (its marker file) adds to its round's record."""
    if step == "export":
        return {"labels": {k: result.get(k, 0) for k in ("train", "test", "ties")}}
    if step == "reward" and result.get("test_pairs"):
        ceiling = result.get("ceiling") or {}
        return {"reward": {"accuracy": result["accuracy"], "accuracy_ci": result["accuracy_ci"],
                           "test_pairs": result["test_pairs"], "train_pairs": result.get("train_pairs"),
                           "ceiling": ceiling.get("value"), "ceiling_ci": ceiling.get("ci"),
                           "verdict": result.get("verdict", "")}}
    if step == "reward":
        return {"reward": {"test_pairs": 0, "train_pairs": result.get("train_pairs"),
                           "verdict": "no test pairs: nothing says whether this reward model generalises"}}
    if step == "evaluate":
        report = Path(result.get("config", {}).get("output_dir", "")) / "report.html"
        return {"models": [_model_figures(r) for r in result.get("models", []) if r.get("role") == "aligned"],
                "prompt_baseline": result.get("best_prompt_baseline"), "report": str(report.resolve())}
    return {}


def record_step(store, root: Path, name: str, round_: int, step: str, result: dict) -> None:
    """Add a finished (or resumed) step of round `round_` of the run in `root` to the store's record of it."""
    key = run_key(root)
    record = store.records(key).get(key) or {"name": name, "root": str(Path(root).resolve()), "rounds": {}}
    entry = record["rounds"].setdefault(str(round_), {"steps": []})
    if step not in entry["steps"]:
        entry["steps"].append(step)
    entry["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entry.update(step_figures(step, result))
    store.put_record(key, record)


# ---------------------------------------------------------------- what the page and the CLI read


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927): sensible from the first vote on, where a bootstrap
    of one vote gives [0, 0] or [1, 1]."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def reward_agreement(votes: list[dict]) -> dict | None:
    """How often the app's reward model (its verdict, stored with each vote as P(A better)) agreed with the
    annotators' decisive votes (A or B, swapped repeats left out): the reward model's health on labels it has never
    seen, as they arrive. A verdict of exactly 0.5 counts half. A 95 % Wilson interval; None before any judged
    vote."""
    hits = [0.5 if v["model_p_a"] == 0.5 else float((v["model_p_a"] > 0.5) == (v["choice"] == "A"))
            for v in votes if v.get("model_p_a") is not None and v["choice"] in ("A", "B") and v["how"] != "repeat"]
    if not hits:
        return None
    return {"agreement": sum(hits) / len(hits), "ci": list(wilson_interval(sum(hits), len(hits))), "votes": len(hits)}


def rounds(store) -> list[dict]:
    """Every loop run recorded in the store, oldest key first, each round with its live labeling progress (pairs,
    rankings and ratings, per annotator) and the reward model's agreement with the round's votes so far."""
    runs = []
    for key, record in store.records(PREFIX).items():
        entries = []
        for k, entry in sorted(record.get("rounds", {}).items(), key=lambda kv: int(kv[0])):
            k = int(k)
            entries.append({**entry, "round": k, "pairs": store.progress(round=k),
                            "rankings": store.progress(round=k, kind="rank"),
                            "ratings": store.progress(round=k, kind="rate"),
                            "annotators": store.progress_by_annotator(round=k),
                            "reward_agreement": reward_agreement(store.votes(round=k))})
        runs.append({"key": key, "name": record.get("name", key), "root": record.get("root", ""), "rounds": entries})
    return runs


def report_path(store, key: str, round_: int) -> Path | None:
    """The report file a run's round recorded, if the key names a run and the file is here; else None."""
    if not key.startswith(PREFIX):
        return None
    record = store.records(key).get(key)
    report = ((record or {}).get("rounds", {}).get(str(round_)) or {}).get("report")
    path = Path(report) if report else None
    return path if path is not None and path.name == "report.html" and path.is_file() else None


def curves(runs: list[dict]) -> dict[str, list[dict]]:
    """The points of the plots across rounds, each with its 95 % interval: the reward model's held-out accuracy (and
    the ceiling) against the pairs it was trained on, and each aligned model's win-rates by round."""
    accuracy, wins = [], []
    for run in runs:
        for entry in run["rounds"]:
            reward = entry.get("reward") or {}
            labels = reward.get("train_pairs") or (entry.get("labels") or {}).get("train")
            if reward.get("test_pairs") and labels:
                accuracy.append({"run": run["name"], "pairs": labels, "series": "reward model",
                                 "accuracy": reward["accuracy"], "ci": reward.get("accuracy_ci")})
                if reward.get("ceiling") is not None:
                    accuracy.append({"run": run["name"], "pairs": labels, "series": "ceiling",
                                     "accuracy": reward["ceiling"], "ci": reward.get("ceiling_ci")})
            for model in entry.get("models", []):
                for against in ("base", "prompt"):
                    if f"vs_{against}" in model:
                        wins.append({"run": run["name"], "round": entry["round"],
                                     "series": f"{model['label']} vs {against}",
                                     "win_rate": model[f"vs_{against}"], "ci": model.get(f"vs_{against}_ci")})
    return {"accuracy": accuracy, "wins": wins}


# ---------------------------------------------------------------- the CLI


def percent(value, ci=None, ci_digits: int = 1) -> str:
    """A share as a percentage with its interval, '—' when there is none."""
    if value is None:
        return "—"
    return f"{100 * value:.1f} %" + (f" [{100 * ci[0]:.{ci_digits}f}, {100 * ci[1]:.{ci_digits}f}]" if ci else "")


def describe(runs: list[dict]) -> str:
    """The runs as text tables (also what the CLI prints)."""
    if not runs:
        return ("No loop run has recorded rounds in this store yet: `rlhf loop` records each round in the store it "
                "labels into, as it goes.")
    lines = []
    for run in runs:
        lines.append(f"run {run['name']} ({run['root']})")
        for e in run["rounds"]:
            reward = e.get("reward") or {}
            labeling = "; ".join(f"{kind} {x['votes']}/{x['slots']} votes, {x['complete_tasks']}/{x['tasks']} tasks "
                                 "complete" for kind, x in (("pairs", e["pairs"]), ("rankings", e["rankings"]),
                                                            ("ratings", e["ratings"])) if x["tasks"]) or "no tasks yet"
            lines.append(f"  round {e['round']}: steps done {', '.join(e['steps']) or 'none'}; labeling: {labeling}")
            if reward:
                ceiling = f", ceiling {percent(reward['ceiling'])}" if reward.get("ceiling") is not None else ""
                shown = (f"held-out accuracy {percent(reward['accuracy'], reward['accuracy_ci'])} on "
                         f"{reward['test_pairs']} pairs{ceiling}" if reward.get("test_pairs") else reward["verdict"])
                lines.append(f"    reward model: {shown}")
            if e.get("reward_agreement"):
                a = e["reward_agreement"]
                lines.append(f"    the app's reward model agrees with {percent(a['agreement'], a['ci'])} of this "
                             f"round's {a['votes']} judged votes")
            for m in e.get("models", []):
                kl = "—" if m.get("kl") is None else f"{m['kl']:.2f} nats"
                lines.append(f"    {m['label']}: vs base {percent(m.get('vs_base'), m.get('vs_base_ci'))}, vs prompt "
                             f"{percent(m.get('vs_prompt'), m.get('vs_prompt_ci'))} ({m['judge'] or 'no judge'}), "
                             f"KL {kl}")
            if e.get("report"):
                lines.append(f"    report: {e['report']}")
    return "\n".join(lines)


def run(config: RoundsConfig) -> list[dict]:
    from rlhf.store import Store, StoreError

    try:
        store = Store(config.db or None, create=False)
    except StoreError as e:
        raise UserError(str(e)) from None
    runs = rounds(store)
    print(json.dumps(runs, indent=2) if config.json else describe(runs))
    return runs
