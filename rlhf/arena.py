"""The arena: people compare two anonymous models' answers to their own prompt, and the votes rate the models.

  statistics       each vote an outcome (a tie or "both bad" counts half, as Chatbot Arena does), Bradley-Terry
                   ratings on the Elo scale fitted by minorization-maximization (Hunter 2004), human win-rates over
                   the base model with percentile-bootstrap intervals over votes (Efron & Tibshirani 1993, ch. 13)
  contestants      `LABEL=MODEL` or `LABEL=MODEL|SYSTEM PROMPT` (a prompt baseline), stored under `arena_name`
  Arena, ask_both  two different contestants, in random order, answer one prompt (or a conversation typed as
                   "User: ... / Assistant: ..." turns); the pair is one arena task
  record_vote      the vote; `standings` are the figures of the leaderboard

The app imports this module at start-up and `rlhf evaluate --db` reads the same figures, so it needs numpy only:
the contestants' models (torch, transformers) load inside `Arena.answer`, on first use.
"""

from __future__ import annotations

import random
import re
import threading
import time

import numpy as np

from rlhf.store import AlreadyVoted, Store, StoreError, TaskFull

ARENA_CHOICES = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both bad"}
MAX_PROMPT_CHARS = 4000
FALLBACK_PROMPT = "Write a short review of your favourite film."

# ---------------------------------------------------------------- statistics (pure, numpy only)


def bootstrap_ci(values, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval of the mean, resampling the values (prompts) with replacement."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(values.mean()), float(lo), float(hi)


def arena_outcomes(tasks: list[dict]) -> list[tuple[str, str, float]]:
    """(model of A, model of B, score of A) per arena vote: 1 A won, 0 B won, 0.5 a tie or both bad (counted as a
    tie, as Chatbot Arena does). Votes on two responses of the same model say nothing about models: left out."""
    outcomes = []
    for task in tasks:
        a, b = (r["model"] for r in task["responses"][:2])
        if a == b:
            continue
        for v in task["votes"]:
            outcomes.append((a, b, {"A": 1.0, "B": 0.0}.get(v["choice"], 0.5)))
    return outcomes


def bradley_terry(outcomes: list[tuple[str, str, float]], prior: float = 0.5,
                  iterations: int = 300) -> dict[str, float]:
    """Bradley-Terry ratings on the Elo scale (400 * log10 strength, mean 1000), fitted by minorization-maximization
    (Hunter 2004, eq. 3: p_i <- W_i / sum_j n_ij / (p_i + p_j)); a tie counts as half a win for each side. A model
    that never won (or never lost) has no finite maximum-likelihood rating, so `prior` games against a virtual
    opponent of strength 1, half won and half lost, keep every rating finite (0: the plain maximum likelihood)."""
    models = sorted({m for a, b, _ in outcomes for m in (a, b)})
    index = {m: i for i, m in enumerate(models)}
    k = len(models)
    wins, games = np.full(k, prior / 2), np.zeros((k, k))
    for a, b, score in outcomes:
        i, j = index[a], index[b]
        wins[i] += score
        wins[j] += 1 - score
        games[i, j] += 1
        games[j, i] += 1
    strength = np.ones(k)
    for _ in range(iterations):
        strength = wins / ((games / (strength[:, None] + strength[None, :])).sum(1) + prior / (strength + 1.0))
        if not prior:  # without the virtual opponent the likelihood ignores the scale: pin it
            strength /= np.exp(np.log(strength).mean())
    ratings = 400 * np.log10(strength)
    return {m: float(1000 + r - ratings.mean()) for m, r in zip(models, ratings)}


def arena_name(spec: str, system: str = "") -> str:
    """The model name the arena stores for a contestant: its spec, and its system prompt for a prompt baseline."""
    return f"{spec} | system: {system}" if system else spec


def arena_figures(tasks: list[dict], base: str, aligned: list[str], resamples: int = 1000,
                  seed: int = 0, baselines: list[str] = ()) -> dict:
    """Human win-rate of each aligned model and prompt baseline over base, and of each aligned model over each
    prompt baseline (`win_rate_human_vs`; votes between those two only), and every voted model's Bradley-Terry
    rating, with 95 % percentile-bootstrap intervals over votes."""
    outcomes = arena_outcomes(tasks)
    figures: dict = {"votes": len(outcomes), "win_rate_human": {}, "win_rate_human_vs": {}, "ratings": {}}

    def win_rate(model: str, opponent: str) -> dict | None:
        scores = [s if a == model else 1 - s for a, b, s in outcomes if {a, b} == {model, opponent}]
        if not scores:
            return None
        mean, lo, hi = bootstrap_ci(scores, resamples, seed)
        return {"mean": mean, "ci": [lo, hi], "votes": len(scores)}

    for model in [*aligned, *baselines]:
        if (figure := win_rate(model, base)) is not None:
            figures["win_rate_human"][model] = figure
    for model in aligned:
        for baseline in baselines:
            if (figure := win_rate(model, baseline)) is not None:
                figures["win_rate_human_vs"].setdefault(model, {})[baseline] = figure
    if outcomes:
        point = bradley_terry(outcomes)
        rng = np.random.default_rng(seed)
        draws = [bradley_terry([outcomes[i] for i in rng.integers(0, len(outcomes), len(outcomes))], iterations=100)
                 for _ in range(min(resamples, 200))]  # 200 refits: intervals to a rating point or so
        for model, rating in point.items():
            values = [d[model] for d in draws if model in d]
            lo, hi = np.quantile(values, [0.025, 0.975])
            figures["ratings"][model] = {"rating": rating, "ci": [float(lo), float(hi)],
                                         "votes": sum(model in (a, b) for a, b, _ in outcomes)}
    return figures


# ---------------------------------------------------------------- contestants and their answers


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


TURN = re.compile(r"^(system|user|assistant):[ \t]*", re.IGNORECASE | re.MULTILINE)


def parse_conversation(text: str) -> list[dict]:
    """What a person typed as chat messages: one user turn, or, when the text starts with a "User:", "System:" or
    "Assistant:" line, one turn per such marker at a line's start (the text up to the next marker is that turn's).
    A conversation must end with the user's turn, every turn non-empty (ValueError with what to fix)."""
    text = text.strip()
    marks = list(TURN.finditer(text))
    if not marks or marks[0].start() != 0:
        return [{"role": "user", "content": text}]
    turns = [{"role": m.group(1).lower(), "content": text[m.end(): nxt.start() if nxt else len(text)].strip()}
             for m, nxt in zip(marks, [*marks[1:], None])]
    if any(not t["content"] for t in turns):
        raise ValueError("every turn of the conversation needs text after its 'User:' or 'Assistant:'")
    if turns[-1]["role"] != "user":
        raise ValueError("a conversation ends with the user's turn: add a last 'User:' line for the models to answer")
    return turns


def conversation_text(messages: list[dict]) -> str:
    """Chat messages as parse_conversation reads them back: a lone user turn as its text, else "Role: text" turns."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def draw_prompt(store: Store) -> str:
    """A stored prompt to try in the arena (a held-out one where there is one), as text; a conversation as its turns
    (conversation_text)."""
    messages = store.random_prompt(split="test") or store.random_prompt()
    return conversation_text(messages) if messages else FALLBACK_PROMPT


def ask_both(store: Store, arena: Arena, prompt_text: str, rng: random.Random) -> dict:
    """Two different contestants, in random order, answer the prompt; stored as one arena task (A left, B right).
    Returns the task on screen: task_id (None with a message when there is nothing to ask), the contestants' labels
    and their answers `a` and `b`, as text."""
    prompt_text = (prompt_text or "").strip()
    if not prompt_text:
        return {"task_id": None, "message": "Type a prompt or draw one first."}
    if len(prompt_text) > MAX_PROMPT_CHARS:
        return {"task_id": None, "message": "That prompt is too long for the arena (4,000 characters at most)."}
    try:
        messages = parse_conversation(prompt_text)
    except ValueError as e:
        return {"task_id": None, "message": f"Not asked: {e}."}
    first, second = rng.sample(arena.contestants, 2)
    seed = rng.randrange(2**31)
    texts = [arena.answer(c, messages, seed) for c in (first, second)]
    answers = [(t, c["name"], {"label": c["label"], "system": c["system"], "temperature": arena.temperature,
                               "seed": seed}) for c, t in zip((first, second), texts)]
    task_id = store.add_arena_task(messages, answers)
    return {"task_id": task_id, "labels": [first["label"], second["label"]], "shown_at": time.time(),
            "a": texts[0], "b": texts[1], "message": "Which answer is better?"}


def is_arena_task(store: Store, task_id) -> bool:
    """Whether `task_id` is an arena task (how "arena": only Store.add_arena_task writes those); False for anything
    else, a missing task included. The store takes A/B votes on pairs and arena tasks alike, so this tells the
    arena's votes from a pair's."""
    try:
        return store.task(task_id).how == "arena"
    except (StoreError, TypeError, ValueError):
        return False


def record_vote(store: Store, user: str, current: dict, choice: str) -> tuple[str, bool]:
    """The vote on the arena task on screen: a one-line message and whether it was saved (then the page may reveal
    the contestants)."""
    if not current or current.get("task_id") is None:
        return "Ask both models first.", False
    if not isinstance(choice, str) or choice not in ARENA_CHOICES:
        return "Choose A, B, tie or both bad.", False
    if not is_arena_task(store, current["task_id"]):
        return "Not saved: that is not an arena task; ask both models first.", False
    try:
        store.submit(user, int(current["task_id"]), choice, left="A",
                     seconds=round(time.time() - current["shown_at"], 2))
    except (AlreadyVoted, TaskFull):
        return "This one has its vote already; ask again.", False
    return f"Saved: {ARENA_CHOICES[choice]}.", True


def standings(store: Store, arena: Arena) -> dict:
    """The leaderboard's figures (arena_figures): the first contestant is the base the others' win-rates are
    against."""
    names = [c["name"] for c in arena.contestants]
    return arena_figures(store.tasks(kind="arena"), base=names[0] if names else "", aligned=names[1:], resamples=200)
