"""The labeling app: annotators compare pairs, rank several responses or rate one at a time (and may rewrite an answer
they judge: "Improve this answer"), anyone signed in can try the arena, and admins watch progress, agreement and
bias, review disagreements, add prompts and accounts, export (a download or a server directory), and follow the
loop's rounds (labeling progress, the reward model, win-rates, reports), the figures refreshing on their own.

Thin over rlhf: the rules (which task to serve and how, the vote's checks, the review queue, rankings, the arena,
the admin's rights) are functions of rlhf.labeling and rlhf.arena, which the tests call without a browser. This
module lays out the page, wires those functions to buttons and renders what they return as Markdown
(labeling_ui.render: a bounded subset, no links, images or HTML from what people and models wrote; a prompt as a
chat, one block per turn). Who the user is comes from Gradio's login (checked against the store's hashed
credentials, off the event loop and throttled: labeling_ui.guard, which also expires sign-ins and ends a deactivated
account's), never from anything the page sends; the admin functions check the role on the server, so hiding the
admin tab is a convenience, not the protection. Two endpoints are public API (`/next_task`, `/vote`: what a script
or the load test needs); every other event is private to the page. The page's style and keys are static/app.css and
static/keys.js; static/secrets.js shows a new account's credential, fetched by the admin's own request (never on
the event stream).

    rlhf annotators add alice          # prints alice's credential once
    rlhf label --db sqlite:///runs/demo/store.db --reward_model runs/demo/round-1/reward \\
        --arena_models base=smollm2-135m-instruct aligned=runs/demo/round-1/dpo \\
                       "prompted=smollm2-135m-instruct|Write a positive film review."
"""

from __future__ import annotations

import errno
import html
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from labeling_ui.guard import EXPORT_PATH, REPORT_PATH, SECRET_PATH, GuardedBlocks
from labeling_ui.render import plain, render_chat, render_text
from rlhf import labeling
from rlhf.arena import (
    ARENA_CHOICES,
    MAX_PROMPT_CHARS,
    Arena,
    ask_both,
    draw_prompt,
    parse_contestants,
    record_vote,
    standings,
)
from rlhf.config import UserError, field
from rlhf.labeling import ADMIN_PROMPT_MAX, ADMIN_PROMPTS_MAX, CHOICE_TO_LABEL, RATIONALE_MAX, STRENGTHS
from rlhf.rounds import PREFIX, curves, percent
from rlhf.store import EDIT_MAX, LIKERT, NAME_MAX, Store, StoreError

MAX_RANK = 9
REVIEW_SHOWN = 50
REFRESH_S = 10.0  # how often the admin's figures (progress, agreement, rounds) refresh on their own
STATIC = Path(__file__).parent / "static"
PRIVATE = {"api_visibility": "private"}
EMPTY = {"task_id": None}
RATE_KEYS = ("Keys: `1` thumbs up, `2` thumbs down (either one saves the rating, with the score and reason given so "
             "far); `Q` `W` `E` `R` `T` score 1-5, `0` no score; `S` skip; `U` or `Ctrl+Z` undo; `Esc` leaves a text "
             "box so that the keys work again.")
LIKERT_CHOICES = [("no score (0)", "")] + [(f"{n} ({key})", str(n)) for n, key in enumerate("QWERT", LIKERT[0])]
STRENGTH_KEY = ("slight: a small difference · clear: plainly better · strong: the other is wrong or harmful "
                "(keys Q, W, E)")

DEFAULT_GUIDELINES = """**Which response answers the prompt better?** Judge helpfulness, honesty and harmlessness first,
then clarity. Ignore which side a response is on, and do not reward length for its own sake.

* **Left / Right is better**: pick the better one; say how sure you are (slight, clear, strong).
* **Tie**: both are about equally good. **Both bad**: neither is acceptable.
* **How sure**: *slight*, a small difference another careful reader might see the other way; *clear*, one is
  plainly better; *strong*, the other is wrong, unhelpful or harmful. A stronger vote asks the models for a wider
  gap (its margin in training).
* Keys: `1`/`A` left, `2`/`B` right, `3`/`T` tie, `4`/`X` both bad; `Q` slight, `W` clear, `E` strong; `Enter`
  submit, `S` skip, `U` or `Ctrl+Z` undo.
* **Ranking several**: press the response numbers from best to worst (`=` before a number ties it with the one
  before), `Backspace` takes the last one back, `X` marks all of them bad, `Enter` submits.
* **Rating one response**: thumbs up if you would be glad to get this answer, thumbs down if not; a score from 1
  (poor) to 5 (excellent) if you can say more. Keys on the Rate page.
* **Improve this answer**: rewrite an answer as it should have been; it is kept beside the original (which stays
  as it was) and can become a demonstration for fine-tuning. Your vote on the task is separate from your edit.
"""


@dataclass
class LabelConfig:
    # Store
    db: str = field("", "Database URL ('' = sqlite under $RLHF_HOME).")
    round: int = field(-1, "Only hand out tasks of this round (-1: any).")
    # Server
    host: str = field("127.0.0.1", "Interface to listen on (127.0.0.1: this machine only; 0.0.0.0: the network).")
    port: int = field(7860, "Port.")
    # Labeling
    guidelines: str = field("", "Markdown file with the labeling guidelines ('' = the built-in ones).")
    guideline_version: str = field("v1", "Version stored with every vote, so guideline changes can be traced.")
    undo_window_s: float = field(300.0, "How long after a vote its annotator may still undo it.")
    repeat_share: float = field(0.05, "Share of pairs that are one the annotator already judged, shown with the "
                                      "sides swapped (the position-bias audit).")
    # Reward model verdict
    reward_model: str = field("", "Reward model directory: after each vote (never before) show its probability that "
                                  "the left response is better, and queue strong disagreements for review.")
    disagree_below: float = field(0.2, "Queue a strong vote when the reward model gives the chosen response less "
                                       "than this probability.")
    # Arena
    arena_models: list[str] = field([], "Arena contestants, LABEL=MODEL, or LABEL=MODEL|SYSTEM PROMPT for a prompt "
                                        "baseline (the model steered by a system prompt). Two or more open the arena.")
    arena_max_new_tokens: int = field(96, "Arena: maximum new tokens per answer.")
    arena_temperature: float = field(0.7, "Arena: sampling temperature.")
    device: str = field("auto", "Device for the arena and reward models: auto, cpu, cuda, mps.")
    precision: str = field("auto", "auto, fp32, bf16 or fp16.")
    # Sign-in
    session_hours: float = field(12.0, "A sign-in expires after this many hours; then the page asks again.")

    def __post_init__(self):
        if not 0 < self.port < 65536 or self.undo_window_s < 0:
            raise ValueError("port must be in 1-65535 and undo_window_s >= 0")
        if not 0 < self.session_hours <= 24 * 30:
            raise ValueError("session_hours must be in (0, 720]")
        if not 0 <= self.repeat_share <= 0.5 or not 0 < self.disagree_below < 0.5:
            raise ValueError("repeat_share must be in [0, 0.5] and disagree_below in (0, 0.5)")
        if self.arena_max_new_tokens < 1 or self.arena_temperature <= 0:
            raise ValueError("arena_max_new_tokens must be >= 1 and arena_temperature > 0")
        parse_contestants(self.arena_models)  # a malformed entry fails here, before the app starts


# ---------------------------------------------------------------- rendering (text into safe Markdown and HTML)


def _excerpt(pair: dict, width: int = 80) -> str:
    """The start of a pair's last prompt message, to name the pair in a line about it."""
    text = " ".join(str(pair["messages"][-1]["content"]).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_pair(pair: dict) -> dict:
    """A pair from labeling.next_pair as the page shows it: prompt, left and right; {} when there is none."""
    if pair.get("task_id") is None:
        return {}
    left, right = labeling.sides(pair)
    return {"prompt": render_chat(pair["messages"]), "left": render_text(left), "right": render_text(right)}


def describe_order(text: str, k: int) -> str:
    """The typed order as HTML: a strip of numbered chips, placed ones first in order (they can be dragged to
    reorder), and a line that reads the order out ('#3 > #1 = #4 > #2') or says what is still missing. Only numbers
    and escaped text go into it."""
    if not (text or "").strip():
        note = f"Press the numbers 1-{k} from best to worst, or drag them into order."
    else:
        try:
            note = f"Your order: {labeling.read_order(labeling.parse_order(text, k))} — Enter submits."
        except ValueError as e:
            note = html.escape(str(e))
    chips = "".join(f'<span class="rank-chip" draggable="true" data-n="{n}">#{n}</span>'
                    for n in labeling.placed_first(text, k))
    return f'<div id="rank-strip">{chips}</div><div class="rank-note">{note}</div>'


def arena_vote(store: Store, user: str, current: dict, choice: str) -> str:
    """The arena vote (rlhf.arena.record_vote), then the reveal: which contestant was A and which B."""
    message, saved = record_vote(store, user, current, choice)
    if not saved:
        return message
    a, b = (plain(label) for label in current["labels"])
    return f"{message} **A** was **{a}**, **B** was **{b}**."


def leaderboard(store: Store, arena: Arena) -> str:
    """Bradley-Terry ratings of every contestant voted on, with 95 % bootstrap intervals, as a Markdown table."""
    figures = standings(store, arena)
    if not figures["ratings"]:
        return "*No arena votes yet.*"
    rows = ["| # | model | rating | 95 % interval | votes |", "|---:|---|---:|---|---:|"]
    ranked = sorted(figures["ratings"].items(), key=lambda kv: -kv[1]["rating"])
    for i, (name, r) in enumerate(ranked, 1):
        label = arena.by_name[name]["label"] if name in arena.by_name else name
        rows.append(f"| {i} | {plain(label)} | {r['rating']:.0f} | {r['ci'][0]:.0f} – {r['ci'][1]:.0f} | "
                    f"{r['votes']} |")
    note = f"\n\n{figures['votes']} votes; Bradley-Terry on the Elo scale (mean 1000), ties count half."
    if arena.contestants and figures["win_rate_human"]:
        base = plain(arena.contestants[0]["label"])
        parts = [f"{plain(arena.by_name[n]['label'])} {100 * w['mean']:.0f} % "
                 f"[{100 * w['ci'][0]:.0f}, {100 * w['ci'][1]:.0f}] ({w['votes']} votes)"
                 for n, w in figures["win_rate_human"].items()]
        note += f" Win-rate against {base}: " + "; ".join(parts) + "."
    return "\n".join(rows) + note


# ---------------------------------------------------------------- admin pages (rlhf.labeling checks the role)


def admin_overview(store: Store, user: str) -> str:
    """Progress per round and annotator, agreement and bias figures, as Markdown (admins only)."""
    figures = labeling.overview(store, user)
    p, r, t = figures["pairs"], figures["rankings"], figures["ratings"]
    lines = [f"**Pairs: {p['complete_tasks']}/{p['tasks']} tasks complete, {p['votes']}/{p['slots']} votes · "
             f"rankings: {r['complete_tasks']}/{r['tasks']} complete · ratings: {t['complete_tasks']}/{t['tasks']} "
             f"complete, {t['votes']}/{t['slots']} votes · {figures['awaiting_review']} votes await review**", "",
             "| annotator | round | done | skipped | s/vote | last vote |",
             "|---|---:|---:|---:|---:|---|"]
    rows = figures["annotators"]
    if not rows:
        lines[-2:] = ["*No votes yet.*"]
    for row in rows:
        secs = "—" if row["mean_seconds"] is None else f"{row['mean_seconds']:.1f}"
        lines.append(f"| {plain(row['annotator'])} | {row['round']} | {row['done']} | {row['skipped']} | "
                     f"{secs} | {(row['last_vote'] or '—')[:19]} |")
    lines += ["", "**Agreement and bias** (left: position bias, 50 % is none; repeat ok: the same choice on a swapped "
              "repeat)", "", f"```\n{figures['stats']}\n```"]
    return "\n".join(lines)


def admin_queue(store: Store, user: str) -> str:
    """The votes the reward model strongly disagreed with, for review (admins only)."""
    rows = labeling.review_queue(store, user)
    if not rows:
        return "*Nothing to review.*"
    out = []
    for row in rows[:REVIEW_SHOWN]:
        out.append(f"**Vote {row['vote_id']}** by {plain(row['annotator'])}: response {row['choice']} "
                   f"(strong); the reward model gave it {100 * row['p_chosen']:.0f} %."
                   + (f" Rationale: {render_text(row['rationale'])}" if row["rationale"] else "")
                   + f"\n\n{render_chat(row['prompt'])}\n\n**A:** {render_text(row['responses'][0])}\n\n"
                   f"**B:** {render_text(row['responses'][1])}")
    return f"{len(rows)} votes to review (oldest first):\n\n" + "\n\n---\n\n".join(out)


def admin_review(store: Store, user: str, vote_id, decision: str) -> str:
    try:
        labeling.review(store, user, vote_id, decision)
    except (TypeError, ValueError):
        return "Give the vote's number."
    except StoreError as e:
        return plain(e)
    return f"Vote {int(vote_id)}: {decision}" + (" (left out of exports)." if decision == "rejected" else ".")


def admin_add_prompts(store: Store, user: str, text: str, split: str) -> str:
    """One prompt per non-empty line into the store (admins only)."""
    try:
        ids = labeling.add_prompts(store, user, text, split)
    except StoreError as e:
        return plain(e)
    if not ids:
        return "Write one prompt per line."
    return f"Stored {len(ids)} prompts (split {plain(split or 'train')}); `rlhf generate` samples responses."


def admin_add_annotator(store: Store, user: str, name: str, admin: bool, reveal=None) -> str:
    """A new account; its credential is shown this once (admins only). `reveal(credential)` is the Markdown that
    shows it (default: the credential itself); the page passes one that hands out a one-time link instead."""
    try:
        credential = labeling.add_annotator(store, user, name, admin)
    except StoreError as e:
        return plain(e)
    if credential is None:
        return "Give a name."
    shown = reveal(credential) if reveal else f"`{credential}`"
    return f"Created **{plain(name.strip())}**{' (admin)' if admin else ''}. Credential, shown only now: {shown}"


def admin_export(store: Store, user: str, out: str) -> str:
    counts = labeling.export(store, user, out)
    return f"Exported {counts['train']} train, {counts['test']} test, {counts['ties']} ties to {plain(out)}."


def _percent(value, ci=None) -> str:
    return percent(value, ci, ci_digits=0)


def _round_rows(run: dict) -> list[str]:
    """One row per round: steps, labeling progress, the reward model beside the ceiling, the report."""
    rows = ["| round | steps done | labeling | reward model (held out) | ceiling | "
            "app's reward model vs new votes | report |", "|---:|---|---|---|---|---|---|"]
    for e in run["rounds"]:
        reward = e.get("reward") or {}
        labeling_cell = " · ".join(f"{kind}: {x['votes']}/{x['slots']} votes, {x['complete_tasks']}/{x['tasks']} done"
                                   for kind, x in (("pairs", e["pairs"]), ("rankings", e["rankings"]),
                                                   ("ratings", e["ratings"])) if x["tasks"]) or "no tasks yet"
        if reward.get("test_pairs"):
            held_out = f"{_percent(reward['accuracy'], reward['accuracy_ci'])} on {reward['test_pairs']} pairs"
        else:
            held_out = plain(reward["verdict"]) if reward else "—"
        agreement = e.get("reward_agreement")
        live = (f"agrees with {_percent(agreement['agreement'], agreement['ci'])} of {agreement['votes']}"
                if agreement else "—")
        report = (f"[open]({REPORT_PATH}{run['key'][len(PREFIX):]}/{e['round']})" if "evaluate" in e["steps"]
                  else "—")
        rows.append(f"| {e['round']} | {plain(', '.join(e['steps']))} | {labeling_cell} | {held_out} | "
                    f"{_percent(reward.get('ceiling'), reward.get('ceiling_ci'))} | {live} | {report} |")
    return rows


def _model_rows(run: dict) -> list[str]:
    rows = ["| round | aligned model | over base | over the prompt baseline | KL vs base | judge |",
            "|---:|---|---|---|---:|---|"]
    for e in run["rounds"]:
        for m in e.get("models", []):
            kl = "—" if m.get("kl") is None else f"{m['kl']:.2f}"
            rows.append(f"| {e['round']} | {plain(m['label'])} | {_percent(m.get('vs_base'), m.get('vs_base_ci'))} | "
                        f"{_percent(m.get('vs_prompt'), m.get('vs_prompt_ci'))} | {kl} | {plain(m['judge'] or '—')} |")
    return rows if len(rows) > 2 else []


def _annotator_rows(entry: dict) -> list[str]:
    rows = [f"Round {entry['round']}, per annotator (live):", "", "| annotator | done | skipped | s/vote | last vote |",
            "|---|---:|---:|---:|---|"]
    for a in entry["annotators"]:
        secs = "—" if a["mean_seconds"] is None else f"{a['mean_seconds']:.1f}"
        rows.append(f"| {plain(a['annotator'])} | {a['done']} | {a['skipped']} | {secs} | "
                    f"{(a['last_vote'] or '—')[:19]} |")
    return rows if entry["annotators"] else [f"Round {entry['round']}: no votes yet."]


def rounds_markdown(runs: list[dict]) -> str:
    """Every recorded loop run as Markdown: its rounds, its aligned models, the latest round's annotators."""
    if not runs:
        return ("*No loop run has recorded rounds in this store yet.* `rlhf loop` records each round here as it goes "
                "(`rlhf loop --db` this store's URL); the figures then appear and refresh on their own.")
    out = []
    for run in runs:
        out += [f"### Run {plain(run['name'])}", f"Directory on the server: {plain(run['root'])}", "",
                *_round_rows(run), ""]
        models = _model_rows(run)
        if models:
            out += ["Win-rates with 95 % intervals, KL in nats, by the judge named (gold: the gold function; "
                    "reward: the round's reward model):", "", *models, ""]
        if run["rounds"]:
            out += [*_annotator_rows(run["rounds"][-1]), ""]
    return "\n".join(out)


def _series_plot(points: list[dict], x: str, y: str, title: str, x_label: str, y_label: str, y_lim: tuple,
                 several_runs: bool, dodge: float = 0.0):
    """A matplotlib figure (the object API: safe on the app's worker threads) of one line per series, markers and
    95 % intervals as error bars; a dashed line for a ceiling. `dodge` shifts the series apart along x, so the
    intervals of series at the same x do not hide each other."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = fig.subplots()
    series: dict[str, list[dict]] = {}
    for p in points:
        series.setdefault(f"{p['run']} · {p['series']}" if several_runs else p["series"], []).append(p)
    for i, (name, rows) in enumerate(series.items()):
        rows.sort(key=lambda r: r[x])
        xs, ys = [r[x] + dodge * (i - (len(series) - 1) / 2) for r in rows], [r[y] for r in rows]
        errors = [[r[y] - r["ci"][0] if r.get("ci") else 0 for r in rows],
                  [r["ci"][1] - r[y] if r.get("ci") else 0 for r in rows]]
        ax.errorbar(xs, ys, yerr=errors, fmt="s--" if name.endswith("ceiling") else "o-", capsize=3, label=name)
    if not points:
        ax.text(0.5, 0.5, "nothing measured yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set(title=title, xlabel=x_label, ylabel=y_label, ylim=y_lim)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    return fig


def rounds_plots(runs: list[dict]) -> tuple:
    """The two plots across rounds: reward-model accuracy and the ceiling against the pairs it trained on, and
    win-rates by round (a series is named by its run too when there are several)."""
    rows, several = curves(runs), len(runs) > 1
    accuracy = _series_plot(rows["accuracy"], "pairs", "accuracy", "Reward model on held-out pairs",
                            "pairs it trained on", "accuracy", (0.4, 1.0), several)
    wins = _series_plot(rows["wins"], "round", "win_rate", "Aligned models by round", "round", "win-rate",
                        (0.0, 1.0), several, dodge=0.08)
    ax = wins.axes[0]
    ax.axhline(0.5, color="grey", linewidth=0.8)
    numbers = sorted({r["round"] for r in rows["wins"]})
    if numbers:
        ax.set_xticks(numbers)
        ax.set_xlim(numbers[0] - 0.5, numbers[-1] + 0.5)
    return accuracy, wins


# ---------------------------------------------------------------- the page: one function per tab


def page_assets() -> dict:
    """launch() arguments that put the page's style and keys in (the files under static/)."""
    scripts = "".join(f"\n<script>\n{(STATIC / name).read_text()}</script>\n" for name in ("keys.js", "secrets.js"))
    return {"css_paths": [STATIC / "app.css"], "head": scripts}


def side_by_side(*panes: tuple[str, str]) -> list:
    """Responses next to each other, each under its heading: the Markdown components, in order."""
    out = []
    with gr.Row(equal_height=False):
        for heading, elem_id in panes:
            with gr.Column():
                gr.Markdown(heading)
                out.append(gr.Markdown(elem_classes="response", elem_id=elem_id))
    return out


def improve_box(prefix: str, sides: bool) -> tuple:
    """"Improve this answer" (closed until opened): on the Compare page which answer; a box with its text to
    rewrite; Save; the message; the edit stored for it. Returns (which or None, box, save, message, saved)."""
    with gr.Accordion("Improve this answer", open=False, elem_id=f"{prefix}improve"):
        which = gr.Radio([("Left", "left"), ("Right", "right")], label="Which answer?",
                         elem_id=f"{prefix}edit-which") if sides else None
        box = gr.Textbox(label="Your improved answer (the original stays as it was; saving again replaces your edit)",
                         lines=6, max_length=EDIT_MAX, elem_id=f"{prefix}edit")
        with gr.Row(equal_height=True):
            save = gr.Button("Save improved answer", elem_id=f"{prefix}edit-btn", scale=0, min_width=280)
            message = gr.Markdown(elem_id=f"{prefix}edit-msg")
        saved = gr.Markdown(elem_classes="response", elem_id=f"{prefix}edit-saved", visible=False)
    return which, box, save, message, saved


def edit_draft(text: str) -> tuple[str, str]:
    """The edit box's starting text, the answer itself, cut to what an edit may hold; and a note when it was cut."""
    if len(text) <= EDIT_MAX:
        return text, ""
    return text[:EDIT_MAX], f"This answer is longer than an edit may be: the box holds its first {EDIT_MAX:,}."


def shown_edit(store: Store, user: str, current: dict, which: str | None):
    """The edit `user` has stored for the answer `which` on screen ("left"/"right" as shown, or "response"), as text
    under the box so they see exactly what was kept; hidden when there is none."""
    text = labeling.edit_of(store, user, current, which) if which else None
    if text is None:
        return gr.update(value="", visible=False)
    return gr.update(value=f"**Your saved edit:**\n\n{render_text(text)}", visible=True)


def pairs_page(store: Store, config: LabelConfig, scorer, rng: random.Random, round_: int | None, guidelines: str):
    """The "Compare pairs" tab and its events. Returns the components a page load fills and the function of the
    user name that fills them."""
    current = gr.State(EMPTY)
    status = gr.Markdown(elem_id="status")
    verdict = gr.Markdown(elem_id="verdict")  # about the pair just judged: above the next one, named by its prompt
    with gr.Accordion(f"Guidelines ({config.guideline_version})", open=False):
        gr.Markdown(guidelines)
    prompt = gr.Markdown(elem_id="prompt")
    left, right = side_by_side(("**Left** · key `1`", "left"), ("**Right** · key `2`", "right"))
    with gr.Row():
        choice = gr.Radio([(label, value) for value, label in CHOICE_TO_LABEL.items()], label="Your choice",
                          elem_id="choice", scale=3)
        strength = gr.Radio([(f"{name} ({key})", name) for name, key in zip(STRENGTHS, "QWE")], value="clear",
                            label="How sure?", info=STRENGTH_KEY, elem_id="strength", scale=2)
    rationale = gr.Textbox(label="Why? (optional)", lines=1, elem_id="rationale", max_length=RATIONALE_MAX)
    with gr.Row():
        submit = gr.Button("Submit (Enter)", variant="primary", elem_id="submit-btn")
        skip = gr.Button("Skip (S)", elem_id="skip-btn")
        undo_btn = gr.Button("Undo last vote (U)", elem_id="undo-btn")
    which, box, save_edit, edit_msg, saved = improve_box("", sides=True)
    screen = [current, status, prompt, left, right, choice, rationale, submit, which, box, edit_msg, saved]

    def show_next(user: str, message: str = ""):
        task = labeling.next_pair(store, user, round_, rng, config.repeat_share)
        has, shown = task["task_id"] is not None, render_pair(task)
        return (task, task["status"] + (f" · {message}" if message else ""),
                shown.get("prompt", "*Nothing left to label.*"), shown.get("left", ""), shown.get("right", ""),
                gr.update(value=None, interactive=has), gr.update(value=""), gr.update(interactive=has),
                gr.update(value=None, interactive=has), "", "", gr.update(value="", visible=False))

    def on_submit(current, choice, strength, rationale, request: gr.Request):
        message, vote_id = labeling.vote(store, request.username, current, choice, strength, rationale or "",
                                         config.guideline_version)
        if vote_id is None and message.startswith(("Choose", "No task", "Not saved")):
            return (current, message, *(gr.skip(),) * (len(screen) - 2), gr.skip())
        verdict = ""
        if vote_id is not None and scorer is not None:
            try:
                verdict = labeling.model_verdict(store, scorer, current, vote_id, choice, strength,
                                                 config.disagree_below)
            except Exception as e:  # noqa: BLE001 - the vote is saved; a failing model must not stall the page
                verdict = f"(The reward model could not score this pair: {html.escape(type(e).__name__)}.)"
            # The next pair is already on screen: say which pair the verdict is about.
            verdict = f"**Your last vote**, on “{plain(_excerpt(current))}”: {verdict}"
        return (*show_next(request.username, message), verdict)

    def on_skip(current, request: gr.Request):
        labeling.skip(store, request.username, current)
        return show_next(request.username, "Skipped.")

    def on_undo(request: gr.Request):
        # The verdict shown was about the vote now undone.
        return (*show_next(request.username, labeling.undo(store, request.username, config.undo_window_s)), "")

    def on_which(current, which, request: gr.Request):
        if current.get("task_id") is None or which not in ("left", "right"):
            return "", "", gr.update(visible=False)
        draft, note = edit_draft(labeling.sides(current)[which == "right"])
        return draft, note, shown_edit(store, request.username, current, which)

    def on_save_edit(current, which, text, request: gr.Request):
        message = labeling.save_edit(store, request.username, current, which or "", text)
        return plain(message), shown_edit(store, request.username, current, which)

    submit.click(on_submit, [current, choice, strength, rationale], screen + [verdict], **PRIVATE)
    skip.click(on_skip, [current], screen, **PRIVATE)
    undo_btn.click(on_undo, None, screen + [verdict], **PRIVATE)
    which.input(on_which, [current, which], [box, edit_msg, saved], **PRIVATE)
    save_edit.click(on_save_edit, [current, which, box], [edit_msg, saved], **PRIVATE)
    return screen, show_next


def rank_page(store: Store, config: LabelConfig, rng: random.Random, round_: int | None):
    """The "Rank several" tab and its events; returns what pairs_page returns."""
    current = gr.State(EMPTY)
    status = gr.Markdown(elem_id="rank-status")
    prompt = gr.Markdown(elem_id="rank-prompt")
    cards = []
    for row_start in range(0, MAX_RANK, 3):
        with gr.Row(equal_height=False):
            for i in range(row_start, row_start + 3):
                cards.append(gr.Markdown(elem_classes="card", elem_id=f"card-{i + 1}", visible=False))
    preview = gr.HTML(elem_id="rank-preview")
    with gr.Row():
        order = gr.Textbox(label="Your order, best first (keys: numbers; '=' ties; Backspace)", elem_id="rank-order",
                           scale=3)
        rationale = gr.Textbox(label="Why? (optional)", lines=1, elem_id="rank-rationale", scale=2,
                               max_length=RATIONALE_MAX)
    with gr.Row():
        submit = gr.Button("Submit ranking (Enter)", variant="primary", elem_id="rank-submit-btn")
        bad = gr.Button("All of them bad (X)", elem_id="rank-bad-btn")
        skip = gr.Button("Skip (S)", elem_id="rank-skip-btn")
        undo_btn = gr.Button("Undo last vote (U)", elem_id="rank-undo-btn")
    screen = [current, status, prompt, *cards, order, preview]

    def show_next(user: str, message: str = ""):
        task = labeling.next_ranking(store, user, round_, rng)
        texts = [render_text(r) for r in task.get("responses", [])]
        k = len(texts)
        updates = [gr.update(value=f"#### {i + 1}\n\n{texts[i]}" if i < k else "", visible=i < k)
                   for i in range(MAX_RANK)]
        return (task, task["status"] + (f" · {message}" if message else ""),
                render_chat(task["messages"]) if task["task_id"] is not None else "*Nothing left to rank.*",
                *updates,
                gr.update(value="", interactive=k > 0), describe_order("", k) if k else "")

    def on_rank_submit(current, order, rationale, request: gr.Request, all_bad: bool = False):
        message, vote_id = labeling.submit_ranking(store, request.username, current, order, all_bad, rationale or "",
                                                   config.guideline_version)
        if vote_id is None and (message.startswith("Not yet") or message.startswith("No task")):
            return (current, current.get("status", "") + f" · {message}", *(gr.skip(),) * (MAX_RANK + 3))
        return show_next(request.username, message)

    def on_rank_bad(current, rationale, request: gr.Request):
        return on_rank_submit(current, "", rationale, request, all_bad=True)

    def on_rank_skip(current, request: gr.Request):
        labeling.skip(store, request.username, current)
        return show_next(request.username, "Skipped.")

    def on_rank_undo(request: gr.Request):
        return show_next(request.username, labeling.undo(store, request.username, config.undo_window_s))

    def on_order(current, order):
        return describe_order(order, len(current.get("shown") or []))

    submit.click(on_rank_submit, [current, order, rationale], screen, **PRIVATE)
    bad.click(on_rank_bad, [current, rationale], screen, **PRIVATE)
    skip.click(on_rank_skip, [current], screen, **PRIVATE)
    undo_btn.click(on_rank_undo, None, screen, **PRIVATE)
    order.change(on_order, [current, order], preview, queue=False, **PRIVATE)
    return screen, show_next


def rate_page(store: Store, config: LabelConfig, round_: int | None, guidelines: str):
    """The "Rate" tab and its events: one response at a time, thumbs up or down (which saves it), an optional score
    and reason; returns what pairs_page returns."""
    current = gr.State(EMPTY)
    status = gr.Markdown(elem_id="rate-status")
    message = gr.Markdown(elem_id="rate-msg")
    with gr.Accordion(f"Guidelines ({config.guideline_version})", open=False):
        gr.Markdown(guidelines)
    prompt = gr.Markdown(elem_id="rate-prompt")
    gr.Markdown("**The response to rate**")
    response = gr.Markdown(elem_classes="response", elem_id="rate-response")
    with gr.Row():
        likert = gr.Radio(LIKERT_CHOICES, value="", label="Score (optional): 1 poor … 5 excellent",
                          elem_id="rate-likert", scale=3)
        rationale = gr.Textbox(label="Why? (optional)", lines=1, elem_id="rate-rationale", scale=2,
                               max_length=RATIONALE_MAX)
    with gr.Row():
        up = gr.Button("Thumbs up (1)", variant="primary", elem_id="rate-up-btn")
        down = gr.Button("Thumbs down (2)", variant="primary", elem_id="rate-down-btn")
        skip = gr.Button("Skip (S)", elem_id="rate-skip-btn")
        undo_btn = gr.Button("Undo last vote (U)", elem_id="rate-undo-btn")
    gr.Markdown(RATE_KEYS, elem_id="rate-keys")
    _, box, save_edit, edit_msg, saved = improve_box("rate-", sides=False)
    screen = [current, status, message, prompt, response, likert, rationale, up, down, box, edit_msg, saved]

    def show_next(user: str, message: str = ""):
        task = labeling.next_rating(store, user, round_)
        has, text = task["task_id"] is not None, task.get("response", "")
        draft, note = edit_draft(text)
        return (task, task["status"], message, render_chat(task["messages"]) if has else "*Nothing left to rate.*",
                render_text(text), gr.update(value="", interactive=has), gr.update(value=""),
                gr.update(interactive=has), gr.update(interactive=has), draft, note,
                shown_edit(store, user, task, "response"))

    def on_thumb(thumb: str):
        def handler(current, likert, rationale, request: gr.Request):
            message, vote_id = labeling.rate(store, request.username, current, thumb, likert, rationale or "",
                                             config.guideline_version)
            if vote_id is None and message.startswith(("Not saved", "Choose", "The rationale", "No such")):
                return (current, gr.skip(), plain(message), *(gr.skip(),) * (len(screen) - 3))  # fix it, same one
            return show_next(request.username, plain(message))
        return handler

    def on_rate_skip(current, request: gr.Request):
        labeling.skip(store, request.username, current)
        return show_next(request.username, "Skipped.")

    def on_rate_undo(request: gr.Request):
        return show_next(request.username, labeling.undo(store, request.username, config.undo_window_s))

    def on_rate_edit(current, text, request: gr.Request):
        message = labeling.save_edit(store, request.username, current, "response", text)
        return plain(message), shown_edit(store, request.username, current, "response")

    up.click(on_thumb("up"), [current, likert, rationale], screen, **PRIVATE)
    down.click(on_thumb("down"), [current, likert, rationale], screen, **PRIVATE)
    skip.click(on_rate_skip, [current], screen, **PRIVATE)
    undo_btn.click(on_rate_undo, None, screen, **PRIVATE)
    save_edit.click(on_rate_edit, [current, box], [edit_msg, saved], **PRIVATE)
    return screen, show_next


def arena_page(store: Store, arena: Arena | None, rng: random.Random):
    """The "Arena" tab, and its events when there is an arena; returns the leaderboard component."""
    current = gr.State(EMPTY)
    gr.Markdown("Two anonymous models answer your prompt; vote for the better answer, then see who they were.")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="arena-prompt", scale=4, max_length=MAX_PROMPT_CHARS)
        with gr.Column(scale=1):
            draw = gr.Button("Draw a prompt", elem_id="arena-draw-btn")
            ask = gr.Button("Ask both models", variant="primary", elem_id="arena-ask-btn")
    message = gr.Markdown(elem_id="arena-msg")
    answer_a, answer_b = side_by_side(("**Model A** · key `1`", "arena-a"), ("**Model B** · key `2`", "arena-b"))
    with gr.Row():
        buttons = [gr.Button(label, visible=False, elem_id=f"arena-{key}-btn",
                             variant="primary" if choice in ("A", "B") else "secondary")
                   for choice, label, key in (("A", "A is better", "a"), ("B", "B is better", "b"),
                                              ("tie", "Tie", "tie"), ("both_bad", "Both bad", "bad"))]
    board = gr.Markdown(elem_id="leaderboard")
    if arena is None:
        return board

    def on_draw():
        return draw_prompt(store)

    def on_ask(prompt_text):
        try:
            current = ask_both(store, arena, prompt_text, rng)
        except UserError as e:  # e.g. a contestant's model cannot be loaded: say which, keep the page usable
            current = {"task_id": None, "message": f"The arena cannot answer: {plain(e)}"}
        has = current["task_id"] is not None
        vote_buttons = [gr.update(visible=has)] * 4
        return (current, current["message"], render_text(current.get("a", "")), render_text(current.get("b", "")),
                *vote_buttons)

    def on_arena_vote(choice):
        def handler(current, request: gr.Request):
            message = arena_vote(store, request.username, current, choice)
            return (EMPTY, message, leaderboard(store, arena), *[gr.update(visible=False)] * 4)
        return handler

    draw.click(on_draw, None, prompt, **PRIVATE)
    ask.click(on_ask, [prompt], [current, message, answer_a, answer_b, *buttons], **PRIVATE)
    for button, choice in zip(buttons, ARENA_CHOICES):
        button.click(on_arena_vote(choice), [current], [current, message, board, *buttons], **PRIVATE)
    return board


def admin_page(store: Store, secrets):
    """The "Admin" tab's content and events; every handler goes through the server-side role check. Returns the
    overview component and its handler (the page refreshes it on load and on a timer)."""
    with gr.Row():
        gr.Markdown(f"Progress, agreement and bias refresh on their own every {REFRESH_S:.0f} s.")
        refresh = gr.Button("Refresh now", elem_id="refresh-btn", scale=0)
    overview = gr.Markdown(elem_id="overview")
    with gr.Accordion("Review queue: strong votes the reward model disagreed with", open=False):
        queue_btn = gr.Button("Show the queue", elem_id="queue-btn")
        queue = gr.Markdown(elem_id="queue")
        with gr.Row():
            review_id = gr.Number(label="Vote number", precision=0, elem_id="review-id")
            keep_btn = gr.Button("Keep vote", elem_id="keep-btn")
            reject_btn = gr.Button("Reject vote (left out of exports)", elem_id="reject-btn")
        review_msg = gr.Markdown(elem_id="review-msg")
    with gr.Accordion("Add prompts", open=False):
        new_prompts = gr.Textbox(label="One prompt per line", lines=4, elem_id="new-prompts",
                                 max_length=ADMIN_PROMPTS_MAX * (ADMIN_PROMPT_MAX + 1))
        new_split = gr.Dropdown(["train", "test"], value="train", label="Split")
        add_prompts_btn = gr.Button("Store prompts", elem_id="add-prompts-btn")
        add_prompts_msg = gr.Markdown(elem_id="add-prompts-msg")
    with gr.Accordion("Add an annotator", open=False):
        with gr.Row():
            new_name = gr.Textbox(label="Name", elem_id="new-name", max_length=NAME_MAX)
            new_admin = gr.Checkbox(label="Admin", elem_id="new-admin")
        add_annotator_btn = gr.Button("Create account", elem_id="add-annotator-btn")
        add_annotator_msg = gr.Markdown(elem_id="add-annotator-msg")
    gr.Markdown("**Export the preference data** (TRL format: train, test, ties; the lossless tasks dump; "
                "export.json), as `rlhf data export` writes it:")
    # A plain link: the server answers it to an admin's own request (guard.Guard), never on the event stream.
    gr.HTML(f'<a id="export-download" class="download-link" href="{EXPORT_PATH}" download>'
            "Download it (zip)</a>")
    with gr.Row():
        out = gr.Textbox(value="runs/export", label="Or write it to a directory on the server", scale=3)
        export_btn = gr.Button("Export to the server", elem_id="export-btn", scale=1)
    export_msg = gr.Markdown(elem_id="export-msg")

    def as_admin(fn, request: gr.Request, *args) -> str:
        try:
            return fn(store, request.username, *args)
        except PermissionError:
            return "Admins only."
        except UserError as e:
            return f"Failed: {plain(e)}"

    def on_overview(request: gr.Request):
        return as_admin(admin_overview, request)

    def on_queue(request: gr.Request):
        return as_admin(admin_queue, request)

    def on_keep(vote_id, request: gr.Request):
        return as_admin(admin_review, request, vote_id, "kept")

    def on_reject(vote_id, request: gr.Request):
        return as_admin(admin_review, request, vote_id, "rejected")

    def on_add_prompts(text, split, request: gr.Request):
        return as_admin(admin_add_prompts, request, text, split)

    def on_add_annotator(name, admin, request: gr.Request):
        # The event stream carries only a one-time ticket: static/secrets.js fetches the credential with the
        # admin's own cookie (guard.Secrets), so another user reading this session's stream learns nothing.
        def reveal(credential: str) -> str:
            return f"[reveal it (once)]({SECRET_PATH}{secrets.put(request.username, credential)})"
        return as_admin(admin_add_annotator, request, name, admin, reveal)

    def on_export(out_dir, request: gr.Request):
        return as_admin(admin_export, request, out_dir)

    refresh.click(on_overview, None, overview, **PRIVATE)
    queue_btn.click(on_queue, None, queue, **PRIVATE)
    keep_btn.click(on_keep, [review_id], review_msg, **PRIVATE)
    reject_btn.click(on_reject, [review_id], review_msg, **PRIVATE)
    add_prompts_btn.click(on_add_prompts, [new_prompts, new_split], add_prompts_msg, **PRIVATE)
    add_annotator_btn.click(on_add_annotator, [new_name, new_admin], add_annotator_msg, **PRIVATE)
    export_btn.click(on_export, [out], export_msg, **PRIVATE)
    return overview, on_overview


def rounds_page(store: Store):
    """The "Rounds" tab (admins): every loop run on this store, round by round, and the plots across rounds.
    Returns its components and the handler that fills them (on load and on the timer)."""
    gr.Markdown(f"Every round of the loop runs on this store: labeling progress, the reward model's held-out accuracy "
                f"beside the ceiling (how often the labels themselves agree with the gold function, or with each "
                f"other), and the aligned models' win-rates. Refreshes every {REFRESH_S:.0f} s.")
    summary = gr.Markdown(elem_id="rounds")
    with gr.Row():
        accuracy = gr.Plot(elem_id="rounds-accuracy", show_label=False)
        wins = gr.Plot(elem_id="rounds-wins", show_label=False)

    def on_rounds(request: gr.Request):
        try:
            runs = labeling.rounds(store, request.username)
        except PermissionError:
            return "Admins only.", None, None
        return (rounds_markdown(runs), *rounds_plots(runs))

    return [summary, accuracy, wins], on_rounds


def public_api(store: Store, config: LabelConfig, rng: random.Random, round_: int | None) -> None:
    """The two public endpoints (scripts, the load test): stateless, the user still comes from the login."""

    def api_next_task(request: gr.Request) -> dict:
        """The next pair for the signed-in user: task_id (None when done), prompt, left, right, left_is_a."""
        task = labeling.next_pair(store, request.username, round_, rng)
        shown = {**task, **render_pair(task)}
        return {k: shown.get(k) for k in ("task_id", "left_is_a", "prompt", "left", "right", "status")}

    def api_vote(task_id: int, left_is_a: bool, choice: str, strength: str, rationale: str,
                 request: gr.Request) -> str:
        """Vote on a pair: choice left/right/tie/both_bad as shown (left_is_a: A was on the left), strength
        slight/clear/strong. Returns the message the page would show."""
        if not isinstance(left_is_a, bool):
            return "left_is_a must be true or false, as /next_task returned it."
        return labeling.vote(store, request.username, {"task_id": task_id, "left_is_a": left_is_a}, choice, strength,
                             rationale or "", config.guideline_version)[0]

    gr.api(api_next_task, api_name="next_task")
    gr.api(api_vote, api_name="vote")


def build_app(config: LabelConfig, store: Store | None = None, scorer=None, arena: Arena | None = None):
    """The Gradio page. `scorer` (a RewardModel) and `arena` are loaded from the config when not given."""
    store = store or Store(config.db or None)
    try:
        guidelines = Path(config.guidelines).read_text() if config.guidelines else DEFAULT_GUIDELINES
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the guidelines file {config.guidelines!r}: {e}") from None
    round_ = None if config.round < 0 else config.round
    rng = random.Random()
    if scorer is None and config.reward_model:
        from rlhf.reward import RewardModel

        scorer = RewardModel.load(config.reward_model, device=config.device, precision=config.precision)
    contestants = parse_contestants(config.arena_models)
    if arena is None and len(contestants) >= 2:
        arena = Arena(contestants, config.device, config.precision, config.arena_max_new_tokens,
                      config.arena_temperature)

    with GuardedBlocks(store, config.session_hours, title="rlhf · labeling") as app:
        with gr.Row():
            gr.Markdown("## rlhf · labeling")
            who = gr.Markdown(elem_id="who")
        with gr.Tab("Compare pairs"):
            pair_screen, show_pair = pairs_page(store, config, scorer, rng, round_, guidelines)
        with gr.Tab("Rank several"):
            rank_screen, show_ranking = rank_page(store, config, rng, round_)
        with gr.Tab("Rate"):
            rate_screen, show_rating = rate_page(store, config, round_, guidelines)
        with gr.Tab("Arena", visible=arena is not None):
            board = arena_page(store, arena, rng)
        with gr.Tab("Admin", visible=False) as admin_tab:
            overview, show_overview = admin_page(store, app.secrets)
        with gr.Tab("Rounds", visible=False) as rounds_tab:
            rounds_screen, show_rounds = rounds_page(store)
        # Ticks only on an admin's page (on_load starts it); each tick's handlers check the role again anyway.
        timer = gr.Timer(REFRESH_S, active=False)
        admin_screen = [overview, *rounds_screen]

        def admin_figures(request: gr.Request):
            return (show_overview(request), *show_rounds(request))

        def on_load(request: gr.Request):
            user = request.username
            is_admin = labeling.is_admin(store, user)
            figures = admin_figures(request) if is_admin else (gr.skip(),) * len(admin_screen)
            return (*show_pair(user), *show_ranking(user), *show_rating(user), gr.update(visible=is_admin),
                    gr.update(visible=is_admin), gr.Timer(active=is_admin), *figures, f"Signed in as **{plain(user)}**")

        app.load(on_load, None, pair_screen + rank_screen + rate_screen +
                 [admin_tab, rounds_tab, timer, *admin_screen, who], **PRIVATE)
        timer.tick(admin_figures, None, admin_screen, show_progress="hidden", **PRIVATE)
        if arena is not None:
            app.load(lambda: leaderboard(store, arena), None, board, **PRIVATE)
        public_api(store, config, rng, round_)
    # Many annotators at once: the store is safe across threads, so events need not queue behind each other.
    app.queue(default_concurrency_limit=16)
    return app


def masked_url(url: str) -> str:
    """A database URL fit to print: its password, if any, as ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: show none of it rather than a secret
        return "(a database URL)"


def check_launch(config: LabelConfig) -> None:
    """The launch's own failures as one-line errors before anything starts: the guidelines file, the host and the
    port (bound and released at once: Gradio would otherwise try other ports or fail with a traceback)."""
    if config.guidelines and not Path(config.guidelines).is_file():
        raise UserError(f"guidelines file {config.guidelines!r} not found")
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"cannot listen on --host {config.host!r}: not an address of this machine ({e})") from None
    family, _, _, _, address = infos[0]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
    except OSError as e:
        reason = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror})"
        raise UserError(f"port {config.port} on {config.host} {reason}: choose another with --port") from None


def launch(config: LabelConfig, block: bool = True):
    check_launch(config)
    store = Store(config.db or None)
    shown_url = masked_url(store.url)
    if not any(a.active and not a.simulated for a in store.list_annotators()):
        raise UserError(f"no annotator accounts in {shown_url}: create one with `rlhf annotators add NAME` "
                        "(add --admin for the admin page)")
    app = build_app(config, store)
    print(f"labeling app for {shown_url} on http://{config.host}:{config.port}")
    try:
        app.launch(server_name=config.host, server_port=config.port, prevent_thread_lock=not block,
                   auth_message="Sign in with your annotator name and the credential `rlhf annotators add` printed.",
                   show_error=False, footer_links=[], **page_assets())
    except OSError as e:  # taken between the check above and the start
        raise UserError(f"cannot listen on {config.host}:{config.port}: {e}") from None
    return app
