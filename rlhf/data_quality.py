"""Quality figures of labeled tasks: annotator counts and speed, agreement (Cohen, Fleiss, Krippendorff; for
rankings Kendall's tau-b and ordinal alpha; for ratings Cohen's kappa on the thumbs and ordinal alpha on the Likert
scores), position and length bias, swapped-repeat consistency. Pure functions
of `Store.tasks()` rows; `rlhf data stats` and the admin page print them (rlhf.data re-exports them)."""

from __future__ import annotations

import contextlib
from collections import Counter


def quality_stats(tasks: list[dict]) -> dict:
    """Annotator counts, speed, agreement (Cohen, Fleiss, Krippendorff), position and length bias, from tasks."""
    from rlhf.agreement import cohen_kappa, fleiss_kappa, krippendorff_alpha

    pairs = [t for t in tasks if len(t["responses"]) == 2 and t["votes"]]
    per: dict[str, dict] = {}
    by_task = {t["task_id"]: {v["annotator"]: v["choice"] for v in t["votes"]} for t in pairs}
    for t in pairs:
        lengths = [len(r["text"]) for r in t["responses"]]
        # Imported preference data was never shown to anyone: its votes have no left side to be biased towards.
        sided = t.get("how") != "import"
        for v in t["votes"]:
            p = per.setdefault(v["annotator"], Counter())
            p["votes"] += 1
            if v.get("seconds") is not None:
                p["seconds"] += v["seconds"]
                p["timed"] += 1
            if v["choice"] in ("A", "B") and sided:
                p["ab"] += 1
                p["left"] += v["choice"] == v["left"]
            if v["choice"] in ("A", "B") and lengths[0] != lengths[1]:
                p["length_decided"] += 1
                p["longer"] += (v["choice"] == "A") == (lengths[0] > lengths[1])
            others = [c for name, c in by_task[t["task_id"]].items() if name != v["annotator"]]
            if others:  # agreement with the majority of the *other* annotators of this task
                top = Counter(others).most_common()
                if len(top) == 1 or top[0][1] > top[1][1]:
                    p["with_majority_n"] += 1
                    p["with_majority"] += v["choice"] == top[0][0]
    # Swapped repeats: the same two responses shown again in the other order, judged by the same annotator.
    by_id = {t["task_id"]: t for t in pairs}
    for t in pairs:
        original = by_id.get(t.get("repeat_of"))
        if original is None:
            continue
        for v in t["votes"]:
            first = by_task[original["task_id"]].get(v["annotator"])
            if first in ("A", "B") and v["choice"] in ("A", "B"):
                same_text = t["responses"][0]["text"] == original["responses"][0]["text"]
                consistent = (v["choice"] == first) if same_text else (v["choice"] != first)
                p = per[v["annotator"]]
                p["repeats"] += 1
                p["consistent"] += consistent

    def share(n, d):
        return n / d if d else None

    annotators = {name: {"votes": p["votes"], "mean_seconds": share(p["seconds"], p["timed"]),
                         "left_share": share(p["left"], p["ab"]), "sided_votes": p["ab"],
                         "longer_share": share(p["longer"], p["length_decided"]),
                         "with_majority": share(p["with_majority"], p["with_majority_n"]),
                         "repeat_consistency": share(p["consistent"], p["repeats"])}
                  for name, p in sorted(per.items())}
    result: dict = {"tasks_voted": len(pairs), "votes": sum(len(t["votes"]) for t in pairs), "annotators": annotators,
                    "sided_votes": sum(p["ab"] for p in per.values())}
    multi = [t for t in pairs if len(t["votes"]) >= 2]
    if multi:
        result["krippendorff_alpha"] = krippendorff_alpha([[v["choice"] for v in t["votes"]] for t in multi])
        modal = Counter(len(t["votes"]) for t in multi).most_common(1)[0][0]
        same_n = [[v["choice"] for v in t["votes"]] for t in multi if len(t["votes"]) == modal]
        if len({c for item in same_n for c in item}) > 1:
            result["fleiss_kappa"] = fleiss_kappa(same_n)
        cohen = {}
        names = sorted(per)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                common = [tid for tid, v in by_task.items() if a in v and b in v]
                if len(common) >= 5:
                    cohen[f"{a} ~ {b}"] = cohen_kappa([by_task[t][a] for t in common], [by_task[t][b] for t in common])
        result["cohen_kappa"] = cohen
    rankings = ranking_agreement(tasks)
    if rankings["rankings"]:
        result["rankings"] = rankings
    ratings = rating_agreement(tasks)
    if ratings["ratings"]:
        result["ratings"] = ratings
    return result


def rating_agreement(tasks: list[dict]) -> dict:
    """Agreement of ratings (one response, thumbs up or down, optional Likert 1-5): Cohen's kappa on the thumbs for
    every two annotators who rated at least 5 of the same responses, and Krippendorff's ordinal alpha over the
    Likert scores (each response a unit). Votes rejected on review are left out."""
    from rlhf.agreement import cohen_kappa, krippendorff_alpha

    rated = [t for t in tasks if t.get("kind") == "rate" and t.get("how") != "repeat"]
    thumbs: dict[int, dict[str, str]] = {}
    units = []
    for t in rated:
        votes = [v for v in t["votes"] if v["choice"] in ("up", "down") and v.get("review") != "rejected"]
        thumbs[t["task_id"]] = {v["annotator"]: v["choice"] for v in votes}
        units.append([v["likert"] for v in votes if v.get("likert") is not None])
    n = sum(len(v) for v in thumbs.values())
    names = sorted({name for v in thumbs.values() for name in v})
    cohen = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = [tid for tid, v in thumbs.items() if a in v and b in v]
            if len(common) >= 5:
                cohen[f"{a} ~ {b}"] = cohen_kappa([thumbs[t][a] for t in common], [thumbs[t][b] for t in common])
    pairable = [u for u in units if len(u) >= 2]
    return {"ratings": n, "tasks": len(rated), "rated_tasks": sum(bool(v) for v in thumbs.values()),
            "up_share": sum(c == "up" for v in thumbs.values() for c in v.values()) / n if n else None,
            "likert_scores": sum(len(u) for u in units), "cohen_kappa": cohen,
            "krippendorff_alpha_ordinal": krippendorff_alpha(pairable, "ordinal", order=[1, 2, 3, 4, 5])
            if pairable else None}


def ranking_agreement(tasks: list[dict]) -> dict:
    """Agreement of rankings (K-response tasks): the mean Kendall's tau-b over every two annotators who ranked the
    same task, and Krippendorff's ordinal alpha with each (task, response) as a unit and its rank as the value.
    All-bad votes carry no order and are left out."""
    from itertools import combinations

    from rlhf.agreement import kendall_tau, krippendorff_alpha

    ranked = [t for t in tasks if t.get("kind") == "rank"]
    taus, units, n = [], [], 0
    first_on_top, chance = 0, 0.0  # position bias: how often the response shown first is ranked best
    for t in ranked:
        ranks = []  # one {position: rank} per ranking vote
        for v in t["votes"]:
            if v.get("ranking") is not None and v.get("review") != "rejected":
                ranks.append({p: g for g, group in enumerate(v["ranking"]) for p in group})
                if v.get("shown"):
                    first_on_top += v["shown"][0] in v["ranking"][0]
                    chance += len(v["ranking"][0]) / len(v["shown"])
        n += len(ranks)
        k = len(t["responses"])
        for a, b in combinations(ranks, 2):
            with contextlib.suppress(ValueError):  # one of them tied everything: no order to compare
                taus.append(kendall_tau([a[p] for p in range(k)], [b[p] for p in range(k)]))
        units += [[r[p] for r in ranks] for p in range(k)] if len(ranks) >= 2 else []
    out: dict = {"rankings": n, "tasks": len(ranked), "kendall_tau": sum(taus) / len(taus) if taus else None,
                 "kendall_pairs": len(taus), "krippendorff_alpha_ordinal": None,
                 "first_shown_on_top": first_on_top / n if n else None,
                 "first_shown_on_top_by_chance": chance / n if n else None}
    if units:
        out["krippendorff_alpha_ordinal"] = krippendorff_alpha(units, "ordinal",
                                                               order=sorted({v for u in units for v in u}))
    return out


def format_stats(stats: dict) -> str:
    """The quality figures as a readable table."""
    def f(v, pct=False):
        return "—" if v is None else f"{100 * v:5.1f}%" if pct else f"{v:6.1f}"

    lines = [f"{stats['tasks_voted']} tasks with votes, {stats['votes']} votes ({stats['sided_votes']} A/B votes with "
             "a shown side: imported ones have none)", "",
             f"{'annotator':<24}{'votes':>7}{'sec/vote':>10}{'left':>8}{'longer':>8}{'w/ majority':>13}"
             f"{'repeat ok':>11}"]
    for name, a in stats["annotators"].items():
        lines.append(f"{name[:23]:<24}{a['votes']:>7}{f(a['mean_seconds']):>10}{f(a['left_share'], True):>8}"
                     f"{f(a['longer_share'], True):>8}{f(a['with_majority'], True):>13}"
                     f"{f(a['repeat_consistency'], True):>11}")
    lines.append("")
    for key in ("krippendorff_alpha", "fleiss_kappa"):
        if key in stats:
            lines.append(f"{key.replace('_', ' ')}: {stats[key]:.3f}")
    for pair, kappa in stats.get("cohen_kappa", {}).items():
        lines.append(f"cohen kappa {pair}: {kappa:.3f}")
    if "rankings" in stats:
        r = stats["rankings"]
        tau = "—" if r["kendall_tau"] is None else f"{r['kendall_tau']:.3f} over {r['kendall_pairs']} pairs of rankings"
        alpha = "—" if r["krippendorff_alpha_ordinal"] is None else f"{r['krippendorff_alpha_ordinal']:.3f}"
        lines.append(f"rankings: {r['rankings']} of {r['tasks']} tasks; Kendall tau-b {tau}; "
                     f"Krippendorff alpha (ordinal) {alpha}")
        if r["first_shown_on_top"] is not None:
            lines.append(f"rankings: the response shown first was ranked best in {100 * r['first_shown_on_top']:.0f} % "
                         f"(by chance {100 * r['first_shown_on_top_by_chance']:.0f} %: position bias if far above)")
    if "ratings" in stats:
        r = stats["ratings"]
        alpha = "—" if r["krippendorff_alpha_ordinal"] is None else f"{r['krippendorff_alpha_ordinal']:.3f}"
        lines.append(f"ratings: {r['ratings']} on {r['rated_tasks']} of {r['tasks']} responses, "
                     f"{100 * r['up_share']:.0f} % thumbs up; {r['likert_scores']} Likert scores, Krippendorff alpha "
                     f"(ordinal) {alpha}")
        for pair, kappa in r["cohen_kappa"].items():
            lines.append(f"ratings: cohen kappa {pair}: {kappa:.3f}")
    lines.append("left: share of A/B votes for the response shown on the left (50% = no position bias); longer: share "
                 "for the longer response (length bias)")
    return "\n".join(lines)
