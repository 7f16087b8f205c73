"""The labeling app: annotators compare pairs or rank several responses, anyone signed in can try the arena, and
admins watch progress, agreement and bias, review disagreements, add prompts and accounts, and export.

Thin over rlhf.store: every handler below is a plain function of (store, user, ...) that the tests call without
a browser, and the Gradio page only wires them to buttons. Who the user is comes from Gradio's login (checked
against the store's hashed credentials), never from anything the page sends; admin handlers check the role on
the server, so hiding the admin tab is a convenience, not the protection. Two endpoints are public API
(`/next_task`, `/vote`: what a script or the load test needs); every other event is private to the page.

    rlhf annotators add alice          # prints alice's credential once
    rlhf label --db sqlite:///runs/demo/store.db --reward_model runs/demo/round-1/reward \\
        --arena_models base=smollm2-135m-instruct aligned=runs/demo/round-1/dpo \\
                       "prompted=smollm2-135m-instruct|Write a positive film review."
"""

from __future__ import annotations

import html
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from rlhf.config import UserError, field
from rlhf.evaluate import arena_name
from rlhf.store import LABELED, AlreadyVoted, Store, StoreError, TaskFull

MAX_SHOWN_CHARS = 20_000
MAX_RANK = 9
CHOICE_TO_LABEL = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "both_bad": "Both bad"}
ARENA_CHOICES = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both bad"}
STRENGTHS = {"slight": 1, "clear": 2, "strong": 3}

DEFAULT_GUIDELINES = """**Which response answers the prompt better?** Judge helpfulness, honesty and harmlessness first,
then clarity. Ignore which side a response is on, and do not reward length for its own sake.

* **Left / Right is better**: pick the better one; say how sure you are (slight, clear, strong).
* **Tie**: both are about equally good. **Both bad**: neither is acceptable.
* Keys: `1`/`A` left, `2`/`B` right, `3`/`T` tie, `4`/`X` both bad, `Enter` submit, `S` skip, `U` or `Ctrl+Z` undo.
* **Ranking several**: press the response numbers from best to worst (`=` before a number ties it with the one
  before), `Backspace` takes the last one back, `X` marks all of them bad, `Enter` submits.
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

    def __post_init__(self):
        if not 0 < self.port < 65536 or self.undo_window_s < 0:
            raise ValueError("port must be in 1-65535 and undo_window_s >= 0")
        if not 0 <= self.repeat_share <= 0.5 or not 0 < self.disagree_below < 0.5:
            raise ValueError("repeat_share must be in [0, 0.5] and disagree_below in (0, 0.5)")
        if self.arena_max_new_tokens < 1 or self.arena_temperature <= 0:
            raise ValueError("arena_max_new_tokens must be >= 1 and arena_temperature > 0")
        parse_contestants(self.arena_models)  # a malformed entry fails here, before the app starts


def parse_contestants(entries: list[str]) -> list[dict]:
    """Arena entries as [{label, model, system, name}]: `name` is what the store records as the response's model
    (the model spec, plus its system prompt for a prompt baseline), so `rlhf evaluate --db` finds the votes."""
    out = []
    for entry in entries:
        label, sep, rest = entry.partition("=")
        spec, _, system = rest.partition("|")
        label, spec, system = label.strip(), spec.strip(), system.strip()
        if not sep or not label or not spec:
            raise ValueError(f"arena entry {entry!r}: write LABEL=MODEL or LABEL=MODEL|SYSTEM PROMPT")
        out.append({"label": label, "model": spec, "system": system, "name": arena_name(spec, system)})
    if len({c["label"] for c in out}) != len(out) or len({c["name"] for c in out}) != len(out):
        raise ValueError("arena labels and models must be distinct")
    return out


def render_text(text: str) -> str:
    """Model output as safe Markdown: HTML escaped (so it shows as text, never runs), very long text cut."""
    cut = len(text) > MAX_SHOWN_CHARS
    shown = html.escape(text[:MAX_SHOWN_CHARS])
    return shown + (f"\n\n*… {len(text) - MAX_SHOWN_CHARS:,} more characters not shown*" if cut else "")


def render_prompt_messages(messages: list[dict]) -> str:
    return "\n\n".join(f"**{html.escape(m['role'])}:** {render_text(m['content'])}" for m in messages)


# ---------------------------------------------------------------- annotate: pairs (no Gradio in here)


def next_for(store: Store, user: str, round_: int | None, rng: random.Random, repeat_share: float = 0.0) -> dict:
    """The next pair for `user` as the page shows it: prompt, left and right text, and the hidden order. A
    `repeat_share` of the time it is a pair they judged before, with the sides swapped (the bias audit)."""
    task, left = None, None
    if repeat_share and rng.random() < repeat_share:
        repeat = store.repeat_task(user, round=round_)
        if repeat is not None:
            task, left = repeat
    if task is None:
        task = store.next_task(user, round=round_)
    progress = store.progress(annotator=user, round=round_)
    status = (f"{progress['done']} done by you · {progress['open']} left for you · "
              f"{progress['votes']}/{progress['slots']} votes on {progress['tasks']} pairs")
    if task is None:
        return {"task_id": None, "status": status + " · nothing left to label — thank you!"}
    left_is_a = (left == "A") if left else rng.random() < 0.5  # the order is random per task and stored with the vote
    a, b = task.responses[0], task.responses[1]
    return {"task_id": task.id, "left_is_a": left_is_a, "shown_at": time.time(), "status": status,
            "messages": task.prompt, "a": a, "b": b, "prompt": render_prompt_messages(task.prompt),
            "left": render_text(a if left_is_a else b), "right": render_text(b if left_is_a else a)}


def vote(store: Store, user: str, current: dict, choice: str, strength: str, rationale: str,
         guideline_version: str) -> tuple[str, int | None]:
    """Store the vote for the pair on screen; returns a one-line message for the page and the vote's id."""
    if not current or current.get("task_id") is None:
        return "No task on screen.", None
    if choice not in CHOICE_TO_LABEL:
        return "Choose first: left, right, tie or both bad (keys 1-4).", None
    if strength not in STRENGTHS:
        return "Choose how sure you are: slight, clear or strong.", None
    left_is_a = bool(current["left_is_a"])
    stored = {"left": "A" if left_is_a else "B", "right": "B" if left_is_a else "A"}.get(choice, choice)
    shown_at = current.get("shown_at")
    try:
        vote_id = store.submit(user, int(current["task_id"]), stored, strength=STRENGTHS[strength],
                               rationale=(rationale or "").strip(), left="A" if left_is_a else "B",
                               guideline_version=guideline_version,
                               seconds=round(time.time() - shown_at, 2) if shown_at else None)
    except AlreadyVoted:
        return "You had already voted on that one.", None
    except TaskFull:
        return "That task got all its votes meanwhile; here is another.", None
    return f"Saved: {CHOICE_TO_LABEL[choice].lower()} ({strength}).", vote_id


def model_verdict(store: Store, scorer, current: dict, vote_id: int, choice: str, strength: str,
                  disagree_below: float) -> str:
    """After a vote: the reward model's probability that the left response is better (Bradley-Terry, sigmoid of the
    reward difference); a strong A/B vote the model gives less than `disagree_below` goes on the review queue."""
    r_a, r_b = scorer.score([current["messages"]] * 2, [current["a"], current["b"]]).tolist()
    p_a = 1.0 / (1.0 + math.exp(r_b - r_a))
    p_left = p_a if current["left_is_a"] else 1.0 - p_a
    chosen_p = {"left": p_left, "right": 1.0 - p_left}.get(choice)
    queue = chosen_p is not None and strength == "strong" and chosen_p < disagree_below
    store.set_model_verdict(vote_id, p_a, queue=queue)
    verdict = f"The reward model gives the left response {100 * p_left:.0f} %"
    if chosen_p is None:
        return verdict + "."
    agrees = "agrees" if chosen_p >= 0.5 else "disagrees"
    return verdict + f": it {agrees} with you" + (" — queued for review." if queue else ".")


def undo(store: Store, user: str, window_s: float) -> str:
    task_id = store.undo_last(user, window_s=window_s)
    return "Your last vote was undone; it is back in your queue." if task_id else "Nothing to undo."


# ---------------------------------------------------------------- annotate: rankings of K responses


def next_ranking(store: Store, user: str, round_: int | None, rng: random.Random) -> dict:
    """The next K-response task for `user`: its responses in a random order, numbered 1..K as shown."""
    task = store.next_task(user, round=round_, kind="rank")
    progress = store.progress(annotator=user, round=round_, kind="rank")
    status = (f"{progress['done']} ranked by you · {progress['open']} left for you · "
              f"{progress['votes']}/{progress['slots']} rankings on {progress['tasks']} tasks")
    if task is None:
        return {"task_id": None, "status": status + " · nothing left to rank — thank you!"}
    shown = list(range(len(task.responses)))
    rng.shuffle(shown)  # shown[i] = the task position displayed as number i + 1
    return {"task_id": task.id, "shown": shown, "shown_at": time.time(), "status": status,
            "prompt": render_prompt_messages(task.prompt),
            "cards": [render_text(task.responses[p]) for p in shown]}


def parse_order(text: str, k: int) -> list[list[int]]:
    """'3 1 = 4 2' (numbers as shown, best first; '=' ties a number with the one before) as groups of numbers,
    [[3], [1, 4], [2]]. Every number 1..k exactly once, else a ValueError that says what is wrong."""
    tokens = re.findall(r"\d+|=|>|,|\S", text or "")
    groups: list[list[int]] = []
    tie = False
    for t in tokens:
        if t == "=":
            if not groups:
                raise ValueError("'=' ties a response with the one before it; start with a number")
            tie = True
        elif t in (">", ","):
            tie = False
        elif t.isdigit():
            n = int(t)
            if not 1 <= n <= k:
                raise ValueError(f"there are responses 1 to {k}, not {n}")
            if tie:
                groups[-1].append(n)
            else:
                groups.append([n])
            tie = False
        else:
            raise ValueError(f"unexpected {t!r}: use the numbers 1-{k}, '=' for a tie")
    seen = [n for g in groups for n in g]
    if len(set(seen)) != len(seen):
        raise ValueError("each response may appear only once")
    missing = sorted(set(range(1, k + 1)) - set(seen))
    if missing:
        raise ValueError(f"still to place: {', '.join(map(str, missing))}")
    return groups


def describe_order(text: str, k: int) -> str:
    """The typed order as HTML: a strip of numbered chips, placed ones first in order (they can be dragged to
    reorder), and a line that reads the order out ('#3 > #1 = #4 > #2') or says what is still missing. Only numbers
    and escaped text go into it."""
    groups: list[list[int]] = []
    if not (text or "").strip():
        note = f"Press the numbers 1-{k} from best to worst, or drag them into order."
    else:
        try:
            groups = parse_order(text, k)
            note = "Your order: " + " > ".join(" = ".join(f"#{n}" for n in g) for g in groups) + " — Enter submits."
        except ValueError as e:
            note = html.escape(str(e))
    # An order still being typed puts what it has placed so far first.
    placed = list(dict.fromkeys([n for g in groups for n in g] or
                                [int(n) for n in re.findall(r"\d+", text or "") if 1 <= int(n) <= k]))
    chips = "".join(f'<span class="rank-chip" draggable="true" data-n="{n}">#{n}</span>'
                    for n in placed + [n for n in range(1, k + 1) if n not in placed])
    return f'<div id="rank-strip">{chips}</div><div class="rank-note">{note}</div>'


def submit_ranking(store: Store, user: str, current: dict, order: str, all_bad: bool, rationale: str,
                   guideline_version: str) -> tuple[str, int | None]:
    """Store the ranking of the task on screen (numbers as shown, mapped back to task positions)."""
    if not current or current.get("task_id") is None:
        return "No task on screen.", None
    shown = current["shown"]
    ranking = None
    if not all_bad:
        try:
            groups = parse_order(order, len(shown))
        except ValueError as e:
            return f"Not yet: {e}.", None
        ranking = [[shown[n - 1] for n in g] for g in groups]
    shown_at = current.get("shown_at")
    try:
        vote_id = store.submit_ranking(user, int(current["task_id"]), ranking, shown=shown,
                                       rationale=(rationale or "").strip(), guideline_version=guideline_version,
                                       seconds=round(time.time() - shown_at, 2) if shown_at else None)
    except AlreadyVoted:
        return "You had already ranked that one.", None
    except TaskFull:
        return "That task got all its rankings meanwhile; here is another.", None
    return ("Saved: all of them bad." if all_bad else "Saved your ranking."), vote_id


# ---------------------------------------------------------------- arena


class Arena:
    """Two anonymous contestants answer one prompt; the models are loaded on first use and kept."""

    def __init__(self, contestants: list[dict], device: str = "auto", precision: str = "auto",
                 max_new_tokens: int = 96, temperature: float = 0.7):
        self.contestants = contestants
        self.by_name = {c["name"]: c for c in contestants}
        self.device, self.precision = device, precision
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self._loaded: dict = {}
        self._lock = threading.Lock()  # one generation at a time: they would only share the same cores

    def answer(self, contestant: dict, messages: list[dict], seed: int) -> str:
        from rlhf.models import load
        from rlhf.sample import generate_batch, render_prompt

        with self._lock:
            if contestant["model"] not in self._loaded:
                self._loaded[contestant["model"]] = load(contestant["model"], device=self.device,
                                                         precision=self.precision)
            loaded = self._loaded[contestant["model"]]
            text = render_prompt(loaded.tokenizer, messages, contestant["system"])
            [out] = generate_batch(loaded.model, loaded.tokenizer, [text], max_new_tokens=self.max_new_tokens,
                                   temperature=self.temperature, top_p=0.95, generator_seed=seed)
        return out["text"] or "(no answer)"


def arena_ask(store: Store, arena: Arena, prompt_text: str, rng: random.Random) -> dict:
    """Two different contestants, in random order, answer the prompt; stored as an arena task (A left, B right)."""
    prompt_text = (prompt_text or "").strip()
    if not prompt_text:
        return {"task_id": None, "message": "Type a prompt or draw one first."}
    if len(prompt_text) > 4000:
        return {"task_id": None, "message": "That prompt is too long for the arena (4,000 characters at most)."}
    messages = [{"role": "user", "content": prompt_text}]
    first, second = rng.sample(arena.contestants, 2)
    seed = rng.randrange(2**31)
    texts = [arena.answer(c, messages, seed) for c in (first, second)]
    [pid] = store.add_prompts([messages], source="arena", split="arena")
    ids = [store.add_responses(pid, [t], model=c["name"], params={"label": c["label"], "system": c["system"],
                                                                  "temperature": arena.temperature, "seed": seed})[0]
           for c, t in zip((first, second), texts)]
    task_id = store.add_task(ids, kind="arena", how="arena", overlap=1)
    return {"task_id": task_id, "labels": [first["label"], second["label"]], "shown_at": time.time(),
            "a": render_text(texts[0]), "b": render_text(texts[1]), "message": "Which answer is better?"}


def arena_vote(store: Store, user: str, current: dict, choice: str) -> str:
    if not current or current.get("task_id") is None:
        return "Ask both models first."
    if choice not in ARENA_CHOICES:
        return "Choose A, B, tie or both bad."
    try:
        store.submit(user, int(current["task_id"]), choice, left="A",
                     seconds=round(time.time() - current["shown_at"], 2))
    except (AlreadyVoted, TaskFull):
        return "This one has its vote already; ask again."
    a, b = (html.escape(label) for label in current["labels"])
    return f"Saved: {ARENA_CHOICES[choice]}. **A** was **{a}**, **B** was **{b}**."


def leaderboard(store: Store, arena: Arena) -> str:
    """Bradley-Terry ratings of every contestant voted on, with 95 % bootstrap intervals, as a Markdown table."""
    from rlhf.evaluate import arena_figures

    names = [c["name"] for c in arena.contestants]
    figures = arena_figures(store.tasks(kind="arena"), base=names[0] if names else "", aligned=names[1:], resamples=200)
    if not figures["ratings"]:
        return "*No arena votes yet.*"
    rows = ["| # | model | rating | 95 % interval | votes |", "|---:|---|---:|---|---:|"]
    ranked = sorted(figures["ratings"].items(), key=lambda kv: -kv[1]["rating"])
    for i, (name, r) in enumerate(ranked, 1):
        label = arena.by_name[name]["label"] if name in arena.by_name else name
        rows.append(f"| {i} | {html.escape(label)} | {r['rating']:.0f} | {r['ci'][0]:.0f} – {r['ci'][1]:.0f} | "
                    f"{r['votes']} |")
    note = f"\n\n{figures['votes']} votes; Bradley-Terry on the Elo scale (mean 1000), ties count half."
    if arena.contestants and figures["win_rate_human"]:
        base = html.escape(arena.contestants[0]["label"])
        parts = [f"{html.escape(arena.by_name[n]['label'])} {100 * w['mean']:.0f} % "
                 f"[{100 * w['ci'][0]:.0f}, {100 * w['ci'][1]:.0f}] ({w['votes']} votes)"
                 for n, w in figures["win_rate_human"].items()]
        note += f" Win-rate against {base}: " + "; ".join(parts) + "."
    return "\n".join(rows) + note


# ---------------------------------------------------------------- admin (every handler checks the role)


def require_admin(store: Store, user: str) -> None:
    if store.annotator(user).role != "admin":
        raise PermissionError(f"{user} is not an admin")


def admin_overview(store: Store, user: str) -> str:
    """Progress per round and annotator, agreement and bias figures, as Markdown (admins only)."""
    from rlhf.data import format_stats, quality_stats

    require_admin(store, user)
    p, r = store.progress(), store.progress(kind="rank")
    lines = [f"**Pairs: {p['complete_tasks']}/{p['tasks']} tasks complete, {p['votes']}/{p['slots']} votes · "
             f"rankings: {r['complete_tasks']}/{r['tasks']} complete · {len(store.review_queue())} votes await review**",
             "", "| annotator | round | done | skipped | s/vote | last vote |", "|---|---:|---:|---:|---:|---|"]
    rows = store.progress_by_annotator()
    if not rows:
        lines[-2:] = ["*No votes yet.*"]
    for row in rows:
        secs = "—" if row["mean_seconds"] is None else f"{row['mean_seconds']:.1f}"
        lines.append(f"| {html.escape(row['annotator'])} | {row['round']} | {row['done']} | {row['skipped']} | {secs} | "
                     f"{(row['last_vote'] or '—')[:19]} |")
    stats = format_stats(quality_stats(store.tasks(kind=LABELED)))
    lines += ["", "**Agreement and bias** (left: position bias, 50 % is none; repeat ok: the same choice on a swapped "
              "repeat)", "", f"```\n{stats}\n```"]
    return "\n".join(lines)


def admin_queue(store: Store, user: str) -> str:
    """The votes the reward model strongly disagreed with, for review (admins only)."""
    require_admin(store, user)
    rows = store.review_queue()
    if not rows:
        return "*Nothing to review.*"
    out = []
    for row in rows[:50]:
        p_chosen = row["model_p_a"] if row["choice"] == "A" else 1 - row["model_p_a"]
        out.append(f"**Vote {row['vote_id']}** by {html.escape(row['annotator'])}: response {row['choice']} "
                   f"(strong); the reward model gave it {100 * p_chosen:.0f} %."
                   + (f" Rationale: {render_text(row['rationale'])}" if row["rationale"] else "")
                   + f"\n\n{render_prompt_messages(row['prompt'])}\n\n**A:** {render_text(row['responses'][0])}\n\n"
                   f"**B:** {render_text(row['responses'][1])}")
    return f"{len(rows)} votes to review (oldest first):\n\n" + "\n\n---\n\n".join(out)


def admin_review(store: Store, user: str, vote_id, decision: str) -> str:
    require_admin(store, user)
    try:
        store.review(int(vote_id), decision)
    except (TypeError, ValueError):
        return "Give the vote's number."
    except StoreError as e:
        return html.escape(str(e))
    return f"Vote {int(vote_id)}: {decision}" + (" (left out of exports)." if decision == "rejected" else ".")


def admin_add_prompts(store: Store, user: str, text: str, split: str) -> str:
    """One prompt per non-empty line into the store (admins only)."""
    require_admin(store, user)
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        return "Write one prompt per line."
    try:
        ids = store.add_prompts(prompts, source=f"app:{user}", split=split or "train")
    except StoreError as e:
        return html.escape(str(e))
    return f"Stored {len(ids)} prompts (split {html.escape(split or 'train')}); `rlhf generate` samples responses."


def admin_add_annotator(store: Store, user: str, name: str, admin: bool) -> str:
    """A new account; its credential is shown this once (admins only)."""
    require_admin(store, user)
    name = (name or "").strip()
    if not name:
        return "Give a name."
    try:
        credential = store.add_annotator(name, role="admin" if admin else "annotator")
    except StoreError as e:
        return html.escape(str(e))
    return (f"Created **{html.escape(name)}**{' (admin)' if admin else ''}. Credential, shown only now: "
            f"`{credential}`")


def admin_export(store: Store, user: str, out: str) -> str:
    from rlhf.data import ExportConfig, run_export

    require_admin(store, user)
    counts = run_export(ExportConfig(db=store.url, out=out))
    return f"Exported {counts['train']} train, {counts['test']} test, {counts['ties']} ties to `{html.escape(out)}`."


# ---------------------------------------------------------------- the page

KEYS_JS = """
<script>
const rankBox = () => document.querySelector('#rank-order textarea, #rank-order input');
// Set the order textbox as typing would (Gradio listens for input events).
const setRankOrder = (v) => {
  const box = rankBox();
  Object.getOwnPropertyDescriptor(Object.getPrototypeOf(box), 'value').set.call(box, v);
  box.dispatchEvent(new Event('input', {bubbles: true}));
};
// Drag a numbered chip onto another to reorder; the whole strip then becomes the order (best first).
const chipAt = (e) => e.target.closest ? e.target.closest('.rank-chip') : null;
document.addEventListener('dragstart', (e) => { const c = chipAt(e); if (c) e.dataTransfer.setData('text/plain', c.dataset.n); });
document.addEventListener('dragover', (e) => { if (chipAt(e)) e.preventDefault(); });
document.addEventListener('drop', (e) => {
  const target = chipAt(e);
  if (!target) return;
  e.preventDefault();
  const strip = target.parentElement, moved = strip.querySelector(`.rank-chip[data-n="${e.dataTransfer.getData('text/plain')}"]`);
  if (!moved || moved === target) return;
  const box = target.getBoundingClientRect();
  strip.insertBefore(moved, e.clientX > box.left + box.width / 2 ? target.nextSibling : target);
  setRankOrder([...strip.querySelectorAll('.rank-chip')].map((c) => c.dataset.n).join(' '));
});
document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (t && (t.tagName === 'TEXTAREA' || (t.tagName === 'INPUT' && t.type !== 'radio' && t.type !== 'checkbox'))) return;
  const visible = (sel) => { const el = document.querySelector(sel); return el && el.offsetParent !== null; };
  const click = (id) => document.querySelector(`#${id}`)?.click();
  const k = e.key.toLowerCase();
  const onRank = visible('#rank-submit-btn'), onPairs = visible('#submit-btn'), onArena = visible('#arena-ask-btn');
  if ((e.ctrlKey || e.metaKey) && k === 'z' && (onPairs || onRank)) {
    e.preventDefault(); click(onRank ? 'rank-undo-btn' : 'undo-btn'); return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (onPairs) {
    const choices = {'1': 'left', 'a': 'left', '2': 'right', 'b': 'right', '3': 'tie', 't': 'tie', '4': 'both_bad', 'x': 'both_bad'};
    if (k in choices) { e.preventDefault(); document.querySelector(`#choice input[value="${choices[k]}"]`)?.click(); }
    else if (k === 'enter') { e.preventDefault(); click('submit-btn'); }
    else if (k === 's') { e.preventDefault(); click('skip-btn'); }
    else if (k === 'u') { e.preventDefault(); click('undo-btn'); }
  } else if (onRank) {
    const box = rankBox();
    const set = setRankOrder;
    if (/^[1-9]$/.test(k)) { e.preventDefault(); set((box.value.trim() + (box.value.trim().endsWith('=') || !box.value.trim() ? '' : ' ') + k).trim()); }
    else if (k === '=') { e.preventDefault(); set(box.value.trim() + ' ='); }
    else if (k === 'backspace') { e.preventDefault(); set(box.value.trim().replace(/\\s*=?\\s*\\d*$/, '').trim()); }
    else if (k === 'x') { e.preventDefault(); click('rank-bad-btn'); }
    else if (k === 'enter') { e.preventDefault(); click('rank-submit-btn'); }
    else if (k === 's') { e.preventDefault(); click('rank-skip-btn'); }
    else if (k === 'u') { e.preventDefault(); click('rank-undo-btn'); }
  } else if (onArena) {
    const votes = {'1': 'arena-a-btn', 'a': 'arena-a-btn', '2': 'arena-b-btn', 'b': 'arena-b-btn', '3': 'arena-tie-btn', 't': 'arena-tie-btn', '4': 'arena-bad-btn', 'x': 'arena-bad-btn'};
    if (k in votes && visible('#' + votes[k])) { e.preventDefault(); click(votes[k]); }
  }
});
</script>
"""

CSS = """
.gradio-container { max-width: 1400px !important; }
/* elem_classes land on the block and on the Markdown inside it: style the block only. */
.block.response { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 4px 14px;
                  max-height: 42vh; overflow-y: auto; overflow-wrap: anywhere; }
.block.card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 2px 12px;
              max-height: 34vh; overflow-y: auto; overflow-wrap: anywhere; }
.prose.response, .prose.card { border: none; padding: 0; }
.response p, .card p { font-size: 1.02rem; line-height: 1.55; }
#prompt, #rank-prompt { background: var(--background-fill-secondary); border-radius: 10px; padding: 4px 14px; }
#status, #rank-status, #verdict { color: var(--body-text-color-subdued); }
#rank-strip { display: flex; gap: 8px; margin: 6px 0; }
.rank-chip { cursor: grab; user-select: none; padding: 4px 14px; border-radius: 999px; font-weight: 600;
             border: 1px solid var(--border-color-primary); background: var(--background-fill-secondary); }
.rank-note { font-weight: 600; }
"""


def side_by_side(*panes: tuple[str, str]) -> list:
    """Responses next to each other, each under its heading: the Markdown components, in order."""
    out = []
    with gr.Row(equal_height=False):
        for heading, elem_id in panes:
            with gr.Column():
                gr.Markdown(heading)
                out.append(gr.Markdown(elem_classes="response", elem_id=elem_id))
    return out


def build_app(config: LabelConfig, store: Store | None = None, scorer=None, arena: Arena | None = None):
    """The Gradio page. `scorer` (a RewardModel) and `arena` are loaded from the config when not given."""
    store = store or Store(config.db or None)
    guidelines = Path(config.guidelines).read_text() if config.guidelines else DEFAULT_GUIDELINES
    round_ = None if config.round < 0 else config.round
    rng = random.Random()
    if scorer is None and config.reward_model:
        from rlhf.reward import RewardModel

        scorer = RewardModel.load(config.reward_model, device=config.device, precision=config.precision)
    contestants = parse_contestants(config.arena_models)
    if arena is None and len(contestants) >= 2:
        arena = Arena(contestants, config.device, config.precision, config.arena_max_new_tokens,
                      config.arena_temperature)
    empty = {"task_id": None}
    nothing = (gr.skip(),) * 8

    # ---- pairs
    def show(task: dict, message: str = ""):
        has = task.get("task_id") is not None
        return (task, task["status"] + (f" · {message}" if message else ""),
                task.get("prompt", "*Nothing left to label.*"), task.get("left", ""), task.get("right", ""),
                gr.update(value=None, interactive=has), gr.update(value=""), gr.update(interactive=has))

    def on_load(request: gr.Request):
        user = request.username
        is_admin = store.annotator(user).role == "admin"
        return (*show(next_for(store, user, round_, rng, config.repeat_share)),
                *show_rank(next_ranking(store, user, round_, rng)), gr.update(visible=is_admin),
                f"Signed in as **{html.escape(user)}**")

    def on_submit(current, choice, strength, rationale, request: gr.Request):
        message, vote_id = vote(store, request.username, current, choice, strength, rationale or "",
                                config.guideline_version)
        if vote_id is None and (message.startswith("Choose") or message.startswith("No task")):
            return (current, message, *nothing[2:], gr.skip())
        verdict = ""
        if vote_id is not None and scorer is not None:
            try:
                verdict = model_verdict(store, scorer, current, vote_id, choice, strength, config.disagree_below)
            except Exception as e:  # noqa: BLE001 - the vote is saved; a failing model must not stall the page
                verdict = f"(The reward model could not score this pair: {html.escape(type(e).__name__)}.)"
        return (*show(next_for(store, request.username, round_, rng, config.repeat_share), message), verdict)

    def on_skip(current, request: gr.Request):
        if current and current.get("task_id") is not None:
            store.skip(request.username, current["task_id"])
        return show(next_for(store, request.username, round_, rng, config.repeat_share), "Skipped.")

    def on_undo(request: gr.Request):
        message = undo(store, request.username, config.undo_window_s)
        return show(next_for(store, request.username, round_, rng, config.repeat_share), message)

    # ---- rankings
    def show_rank(task: dict, message: str = ""):
        cards = task.get("cards", [])
        updates = [gr.update(value=f"#### {i + 1}\n\n{cards[i]}" if i < len(cards) else "", visible=i < len(cards))
                   for i in range(MAX_RANK)]
        k = len(cards)
        return (task, task["status"] + (f" · {message}" if message else ""),
                task.get("prompt", "*Nothing left to rank.*"), *updates, gr.update(value="", interactive=k > 0),
                describe_order("", k) if k else "")

    def on_rank_submit(current, order, rationale, request: gr.Request, all_bad: bool = False):
        message, vote_id = submit_ranking(store, request.username, current, order, all_bad, rationale or "",
                                          config.guideline_version)
        if vote_id is None and (message.startswith("Not yet") or message.startswith("No task")):
            return (current, current.get("status", "") + f" · {message}", *(gr.skip(),) * (MAX_RANK + 3))
        return show_rank(next_ranking(store, request.username, round_, rng), message)

    def on_rank_bad(current, rationale, request: gr.Request):
        return on_rank_submit(current, "", rationale, request, all_bad=True)

    def on_rank_skip(current, request: gr.Request):
        if current and current.get("task_id") is not None:
            store.skip(request.username, current["task_id"])
        return show_rank(next_ranking(store, request.username, round_, rng), "Skipped.")

    def on_rank_undo(request: gr.Request):
        message = undo(store, request.username, config.undo_window_s)
        return show_rank(next_ranking(store, request.username, round_, rng), message)

    def on_order(current, order):
        return describe_order(order, len(current.get("shown") or []))

    # ---- arena
    def on_draw():
        messages = store.random_prompt(split="test") or store.random_prompt()
        return messages[-1]["content"] if messages else "Write a short review of your favourite film."

    def on_ask(prompt_text):
        try:
            current = arena_ask(store, arena, prompt_text, rng)
        except UserError as e:  # e.g. a contestant's model cannot be loaded: say which, keep the page usable
            current = {"task_id": None, "message": f"The arena cannot answer: {html.escape(str(e))}"}
        has = current["task_id"] is not None
        vote_buttons = [gr.update(visible=has)] * 4
        return (current, current["message"], current.get("a", ""), current.get("b", ""), *vote_buttons)

    def on_arena_vote(choice):
        def handler(current, request: gr.Request):
            message = arena_vote(store, request.username, current, choice)
            return (empty, message, leaderboard(store, arena), *[gr.update(visible=False)] * 4)
        return handler

    # ---- admin (each handler checks the role on the server)
    def as_admin(fn, request: gr.Request, *args) -> str:
        try:
            return fn(store, request.username, *args)
        except PermissionError:
            return "Admins only."
        except UserError as e:
            return f"Failed: {html.escape(str(e))}"

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
        return as_admin(admin_add_annotator, request, name, admin)

    def on_export(out_dir, request: gr.Request):
        return as_admin(admin_export, request, out_dir)

    # ---- the public API (scripts, the load test): stateless, the user still comes from the login
    def api_next_task(request: gr.Request) -> dict:
        """The next pair for the signed-in user: task_id (None when done), prompt, left, right, left_is_a."""
        task = next_for(store, request.username, round_, rng)
        return {k: task.get(k) for k in ("task_id", "left_is_a", "prompt", "left", "right", "status")}

    def api_vote(task_id: int, left_is_a: bool, choice: str, strength: str, rationale: str,
                 request: gr.Request) -> str:
        """Vote on a pair: choice left/right/tie/both_bad as shown (left_is_a: A was on the left), strength
        slight/clear/strong. Returns the message the page would show."""
        return vote(store, request.username, {"task_id": task_id, "left_is_a": left_is_a}, choice, strength,
                    rationale or "", config.guideline_version)[0]

    with gr.Blocks(title="rlhf · labeling") as app:
        current = gr.State(empty)
        rank_current = gr.State(empty)
        arena_current = gr.State(empty)
        with gr.Row():
            gr.Markdown("## rlhf · labeling")
            who = gr.Markdown(elem_id="who")
        with gr.Tab("Compare pairs"):
            status = gr.Markdown(elem_id="status")
            with gr.Accordion(f"Guidelines ({config.guideline_version})", open=False):
                gr.Markdown(guidelines)
            prompt = gr.Markdown(elem_id="prompt")
            left, right = side_by_side(("**Left** · key `1`", "left"), ("**Right** · key `2`", "right"))
            with gr.Row():
                choice = gr.Radio([(label, value) for value, label in CHOICE_TO_LABEL.items()], label="Your choice",
                                  elem_id="choice", scale=3)
                strength = gr.Radio(list(STRENGTHS), value="clear", label="How sure?", elem_id="strength", scale=2)
            rationale = gr.Textbox(label="Why? (optional)", lines=1, elem_id="rationale")
            with gr.Row():
                submit = gr.Button("Submit (Enter)", variant="primary", elem_id="submit-btn")
                skip = gr.Button("Skip (S)", elem_id="skip-btn")
                undo_btn = gr.Button("Undo last vote (U)", elem_id="undo-btn")
            verdict = gr.Markdown(elem_id="verdict")
        with gr.Tab("Rank several"):
            rank_status = gr.Markdown(elem_id="rank-status")
            rank_prompt = gr.Markdown(elem_id="rank-prompt")
            cards = []
            for row_start in range(0, MAX_RANK, 3):
                with gr.Row(equal_height=False):
                    for i in range(row_start, row_start + 3):
                        cards.append(gr.Markdown(elem_classes="card", elem_id=f"card-{i + 1}", visible=False))
            rank_preview = gr.HTML(elem_id="rank-preview")
            with gr.Row():
                rank_order = gr.Textbox(label="Your order, best first (keys: numbers; '=' ties; Backspace)",
                                        elem_id="rank-order", scale=3)
                rank_rationale = gr.Textbox(label="Why? (optional)", lines=1, elem_id="rank-rationale", scale=2)
            with gr.Row():
                rank_submit = gr.Button("Submit ranking (Enter)", variant="primary", elem_id="rank-submit-btn")
                rank_bad = gr.Button("All of them bad (X)", elem_id="rank-bad-btn")
                rank_skip = gr.Button("Skip (S)", elem_id="rank-skip-btn")
                rank_undo = gr.Button("Undo last vote (U)", elem_id="rank-undo-btn")
        with gr.Tab("Arena", visible=arena is not None):
            gr.Markdown("Two anonymous models answer your prompt; vote for the better answer, then see who they were.")
            with gr.Row():
                arena_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="arena-prompt", scale=4)
                with gr.Column(scale=1):
                    arena_draw = gr.Button("Draw a prompt", elem_id="arena-draw-btn")
                    arena_ask_btn = gr.Button("Ask both models", variant="primary", elem_id="arena-ask-btn")
            arena_msg = gr.Markdown(elem_id="arena-msg")
            arena_a, arena_b = side_by_side(("**Model A** · key `1`", "arena-a"), ("**Model B** · key `2`", "arena-b"))
            with gr.Row():
                arena_buttons = [gr.Button(label, visible=False, elem_id=f"arena-{key}-btn",
                                           variant="primary" if choice_ in ("A", "B") else "secondary")
                                 for choice_, label, key in (("A", "A is better", "a"), ("B", "B is better", "b"),
                                                             ("tie", "Tie", "tie"), ("both_bad", "Both bad", "bad"))]
            board = gr.Markdown(elem_id="leaderboard")
        with gr.Tab("Admin", visible=False) as admin_tab:
            refresh = gr.Button("Refresh progress, agreement and bias", elem_id="refresh-btn")
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
                new_prompts = gr.Textbox(label="One prompt per line", lines=4, elem_id="new-prompts")
                new_split = gr.Dropdown(["train", "test"], value="train", label="Split")
                add_prompts_btn = gr.Button("Store prompts", elem_id="add-prompts-btn")
                add_prompts_msg = gr.Markdown(elem_id="add-prompts-msg")
            with gr.Accordion("Add an annotator", open=False):
                with gr.Row():
                    new_name = gr.Textbox(label="Name", elem_id="new-name")
                    new_admin = gr.Checkbox(label="Admin", elem_id="new-admin")
                add_annotator_btn = gr.Button("Create account", elem_id="add-annotator-btn")
                add_annotator_msg = gr.Markdown(elem_id="add-annotator-msg")
            out = gr.Textbox(value="runs/export", label="Export directory")
            export_btn = gr.Button("Export preference data (TRL format)", elem_id="export-btn")
            export_msg = gr.Markdown(elem_id="export-msg")

        private = {"api_visibility": "private"}
        screen = [current, status, prompt, left, right, choice, rationale, submit]
        rank_screen = [rank_current, rank_status, rank_prompt, *cards, rank_order, rank_preview]
        app.load(on_load, None, screen + rank_screen + [admin_tab, who], **private)
        submit.click(on_submit, [current, choice, strength, rationale], screen + [verdict], **private)
        skip.click(on_skip, [current], screen, **private)
        undo_btn.click(on_undo, None, screen, **private)
        rank_submit.click(on_rank_submit, [rank_current, rank_order, rank_rationale], rank_screen, **private)
        rank_bad.click(on_rank_bad, [rank_current, rank_rationale], rank_screen, **private)
        rank_skip.click(on_rank_skip, [rank_current], rank_screen, **private)
        rank_undo.click(on_rank_undo, None, rank_screen, **private)
        rank_order.change(on_order, [rank_current, rank_order], rank_preview, queue=False, **private)
        if arena is not None:
            arena_draw.click(on_draw, None, arena_prompt, **private)
            arena_ask_btn.click(on_ask, [arena_prompt], [arena_current, arena_msg, arena_a, arena_b, *arena_buttons],
                                **private)
            for button, choice_ in zip(arena_buttons, ARENA_CHOICES):
                button.click(on_arena_vote(choice_), [arena_current],
                             [arena_current, arena_msg, board, *arena_buttons], **private)
            app.load(lambda: leaderboard(store, arena), None, board, **private)
        refresh.click(on_overview, None, overview, **private)
        queue_btn.click(on_queue, None, queue, **private)
        keep_btn.click(on_keep, [review_id], review_msg, **private)
        reject_btn.click(on_reject, [review_id], review_msg, **private)
        add_prompts_btn.click(on_add_prompts, [new_prompts, new_split], add_prompts_msg, **private)
        add_annotator_btn.click(on_add_annotator, [new_name, new_admin], add_annotator_msg, **private)
        export_btn.click(on_export, [out], export_msg, **private)
        gr.api(api_next_task, api_name="next_task")
        gr.api(api_vote, api_name="vote")
    # Many annotators at once: the store is safe across threads, so events need not queue behind each other.
    app.queue(default_concurrency_limit=16)
    return app


def launch(config: LabelConfig, block: bool = True):
    store = Store(config.db or None)
    if not any(a.active and not a.simulated for a in store.list_annotators()):
        raise UserError(f"no annotator accounts in {store.url}: create one with `rlhf annotators add NAME` "
                        "(add --admin for the admin page)")
    app = build_app(config, store)

    def check(username: str, password: str) -> bool:
        return store.authenticate(username, password) is not None

    print(f"labeling app for {store.url} on http://{config.host}:{config.port}")
    app.launch(server_name=config.host, server_port=config.port, auth=check, prevent_thread_lock=not block,
               auth_message="Sign in with your annotator name and the credential `rlhf annotators add` printed.",
               css=CSS, head=KEYS_JS, show_error=False, footer_links=[])
    return app
