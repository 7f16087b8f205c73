"""The rules of annotation, as plain functions on a Store: the labeling app's buttons call them, and so do the tests.

  next_pair, vote      which pair to serve next (now and then a swapped repeat: the position-bias audit), in which
                       order, and the vote on it: its checks and the mapping from the sides shown to responses A/B
  model_verdict        after a vote, the reward model's probability that the left response is better; a strong vote
                       it gives less than `disagree_below` goes on the review queue
  next_ranking, ...    K-response tasks: a random order shown, the typed order read and mapped back to positions
  next_rating, rate    one response at a time: thumbs up or down, an optional Likert score 1-5
  save_edit, edit_of   "Improve this answer": an annotator's rewrite of a response on screen, kept beside it
  undo, skip           the annotator's last vote taken back, a task put aside
  require_admin, ...   the admin's functions, each checking the role first: progress, the review queue, prompts and
                       accounts, the export (to a server directory, or as a zip to download), the loop's rounds

What the functions return is text for the page (messages, the task's prompt and responses as stored); turning it
into Markdown or HTML, and escaping what people or models wrote, is the app's part.
"""

from __future__ import annotations

import io
import math
import random
import re
import tempfile
import time
import zipfile
from pathlib import Path

from rlhf.arena import is_arena_task
from rlhf.data import ExportConfig, format_stats, quality_stats, run_export
from rlhf.store import EDIT_MAX, LABELED, LIKERT, RATIONALE_MAX, AlreadyVoted, Store, StoreError, TaskFull

CHOICE_TO_LABEL = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "both_bad": "Both bad"}
STRENGTHS = {"slight": 1, "clear": 2, "strong": 3}
# Text people type into the app: longer is refused with a message, before the store is touched (the rationale's
# bound is the store's own, RATIONALE_MAX, which the CLI's imports get too).
ADMIN_PROMPT_MAX = 4000
ADMIN_PROMPTS_MAX = 500

# ---------------------------------------------------------------- pairs


def next_pair(store: Store, user: str, round_: int | None, rng: random.Random, repeat_share: float = 0.0) -> dict:
    """The next pair for `user`: task_id (None when there is nothing left), the prompt's messages, responses `a` and
    `b`, which one is on the left (`left_is_a`), when it was shown, and a status line. A `repeat_share` of the time
    it is a pair they judged before, with the sides swapped (the bias audit)."""
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
    return {"task_id": task.id, "left_is_a": left_is_a, "shown_at": time.time(), "status": status,
            "messages": task.prompt, "a": task.responses[0], "b": task.responses[1]}


def sides(pair: dict) -> tuple[str, str]:
    """The (left, right) responses of a pair from next_pair, as shown."""
    return (pair["a"], pair["b"]) if pair["left_is_a"] else (pair["b"], pair["a"])


def stored_choice(choice: str, left_is_a: bool) -> str:
    """A choice as the annotator saw it (left, right, tie, both_bad) as the store records it (A, B, tie, both_bad)."""
    return {"left": "A" if left_is_a else "B", "right": "B" if left_is_a else "A"}.get(choice, choice)


def vote(store: Store, user: str, current: dict, choice: str, strength: str, rationale: str,
         guideline_version: str) -> tuple[str, int | None]:
    """Store the vote for the pair on screen; returns a one-line message for the page and the vote's id."""
    if not current or current.get("task_id") is None:
        return "No task on screen.", None
    if not isinstance(current["task_id"], int) or isinstance(current["task_id"], bool):
        return "No such task: give the task_id /next_task returned.", None
    if is_arena_task(store, current["task_id"]):
        return "Not saved: that is an arena task; its votes come from the Arena tab.", None
    if not isinstance(rationale or "", str):
        return "The rationale must be text.", None
    if not isinstance(choice, str) or choice not in CHOICE_TO_LABEL:
        return "Choose first: left, right, tie or both bad (keys 1-4).", None
    if not isinstance(strength, str) or strength not in STRENGTHS:
        return "Choose how sure you are: slight, clear or strong.", None
    if len(rationale or "") > RATIONALE_MAX:
        return f"Not saved: {rationale_too_long(rationale)}", None
    left_is_a = bool(current["left_is_a"])
    shown_at = current.get("shown_at")
    try:
        vote_id = store.submit(user, int(current["task_id"]), stored_choice(choice, left_is_a),
                               strength=STRENGTHS[strength], rationale=(rationale or "").strip(),
                               left="A" if left_is_a else "B", guideline_version=guideline_version,
                               seconds=round(time.time() - shown_at, 2) if shown_at else None)
    except AlreadyVoted:
        return "You had already voted on that one.", None
    except TaskFull:
        return "That task got all its votes meanwhile; here is another.", None
    except StoreError as e:  # e.g. not a pair task, or no such task: the store refused it whole
        return f"Not saved: {e}.", None
    return f"Saved: {CHOICE_TO_LABEL[choice].lower()} ({strength}).", vote_id


def rationale_too_long(rationale: str) -> str:
    return f"the rationale has {len(rationale):,} characters; at most {RATIONALE_MAX:,}, please."


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


def skip(store: Store, user: str, current: dict) -> None:
    """Put the task on screen (pair or ranking) aside for this annotator."""
    if current and current.get("task_id") is not None:
        store.skip(user, current["task_id"])


# ---------------------------------------------------------------- rankings of K responses


def next_ranking(store: Store, user: str, round_: int | None, rng: random.Random) -> dict:
    """The next K-response task for `user`: its responses in a random order (`shown[i]` is the task position shown
    as number i + 1, `responses` are in that order), the prompt's messages and a status line."""
    task = store.next_task(user, round=round_, kind="rank")
    progress = store.progress(annotator=user, round=round_, kind="rank")
    status = (f"{progress['done']} ranked by you · {progress['open']} left for you · "
              f"{progress['votes']}/{progress['slots']} rankings on {progress['tasks']} tasks")
    if task is None:
        return {"task_id": None, "status": status + " · nothing left to rank — thank you!"}
    shown = list(range(len(task.responses)))
    rng.shuffle(shown)
    return {"task_id": task.id, "shown": shown, "shown_at": time.time(), "status": status,
            "messages": task.prompt, "responses": [task.responses[p] for p in shown]}


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


def read_order(groups: list[list[int]]) -> str:
    """A parsed order read out: [[3], [1, 4], [2]] is '#3 > #1 = #4 > #2'."""
    return " > ".join(" = ".join(f"#{n}" for n in g) for g in groups)


def placed_first(text: str, k: int) -> list[int]:
    """The numbers 1..k, those an order being typed has placed so far first (in its order), then the others."""
    try:
        groups = parse_order(text, k) if (text or "").strip() else []
    except ValueError:
        groups = []
    placed = list(dict.fromkeys([n for g in groups for n in g] or
                                [int(n) for n in re.findall(r"\d+", text or "") if 1 <= int(n) <= k]))
    return placed + [n for n in range(1, k + 1) if n not in placed]


def submit_ranking(store: Store, user: str, current: dict, order: str, all_bad: bool, rationale: str,
                   guideline_version: str) -> tuple[str, int | None]:
    """Store the ranking of the task on screen (numbers as shown, mapped back to task positions)."""
    if not current or current.get("task_id") is None:
        return "No task on screen.", None
    if len(rationale or "") > RATIONALE_MAX:
        return f"Not yet: {rationale_too_long(rationale)}", None
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
    except StoreError as e:
        return f"Not yet: {e}.", None
    return ("Saved: all of them bad." if all_bad else "Saved your ranking."), vote_id


# ---------------------------------------------------------------- ratings of one response, and edits

THUMBS = {"up": "thumbs up", "down": "thumbs down"}


def next_rating(store: Store, user: str, round_: int | None) -> dict:
    """The next response for `user` to rate: task_id (None when there is nothing left), the prompt's messages (a
    whole conversation where there is one), the response, when it was shown, and a status line."""
    task = store.next_task(user, round=round_, kind="rate")
    progress = store.progress(annotator=user, round=round_, kind="rate")
    status = (f"{progress['done']} rated by you · {progress['open']} left for you · "
              f"{progress['votes']}/{progress['slots']} ratings on {progress['tasks']} responses")
    if task is None:
        return {"task_id": None, "status": status + " · nothing left to rate — thank you!"}
    return {"task_id": task.id, "shown_at": time.time(), "status": status, "messages": task.prompt,
            "response": task.responses[0]}


def parse_likert(value) -> int | None:
    """A Likert score from the page: None or '' for none given, else a whole number 1-5 (ValueError otherwise)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        score = int(str(value).strip())
    except ValueError:
        raise ValueError(f"a score is a whole number from {LIKERT[0]} to {LIKERT[1]}") from None
    if not LIKERT[0] <= score <= LIKERT[1] or str(score) != str(value).strip():
        raise ValueError(f"a score is a whole number from {LIKERT[0]} to {LIKERT[1]}")
    return score


def rate(store: Store, user: str, current: dict, thumb: str, likert, rationale: str,
         guideline_version: str) -> tuple[str, int | None]:
    """Store the rating of the response on screen; returns a one-line message for the page and the vote's id."""
    if not current or current.get("task_id") is None:
        return "No response on screen.", None
    if not isinstance(current["task_id"], int) or isinstance(current["task_id"], bool):
        return "No such task: give the task_id the page showed.", None
    if not isinstance(thumb, str) or thumb not in THUMBS:
        return "Choose first: thumbs up or down (keys 1 and 2).", None
    if not isinstance(rationale or "", str):
        return "The rationale must be text.", None
    if len(rationale or "") > RATIONALE_MAX:
        return f"Not saved: {rationale_too_long(rationale)}", None
    try:
        score = parse_likert(likert)
    except ValueError as e:
        return f"Not saved: {e}.", None
    shown_at = current.get("shown_at")
    try:
        vote_id = store.submit_rating(user, current["task_id"], thumb, likert=score,
                                      rationale=(rationale or "").strip(), guideline_version=guideline_version,
                                      seconds=round(time.time() - shown_at, 2) if shown_at else None)
    except AlreadyVoted:
        return "You had already rated that one.", None
    except TaskFull:
        return "That response got all its ratings meanwhile; here is another.", None
    except StoreError as e:
        return f"Not saved: {e}.", None
    return f"Saved: {THUMBS[thumb]}" + (f", {score} of 5." if score else "."), vote_id


def _edited_position(current: dict, which: str) -> int | None:
    """The stored position of the answer `which` on screen: "left"/"right" on the Compare page (by the side shown),
    "response" on the Rate page; None when that is not an answer of the task on screen."""
    if not current or current.get("task_id") is None:
        return None
    if which == "response" and "response" in current:
        return 0
    if which in ("left", "right") and "left_is_a" in current:
        return 0 if (which == "left") == bool(current["left_is_a"]) else 1
    return None


def save_edit(store: Store, user: str, current: dict, which: str, text: str) -> str:
    """Keep the annotator's improved version of a response on screen: `which` is "left" or "right" on the Compare
    page (mapped to the stored position), "response" on the Rate page. Returns a one-line message."""
    if not current or current.get("task_id") is None:
        return "No task on screen."
    if not isinstance(text, str):
        return "The edit must be text."
    if len(text) > EDIT_MAX:
        return f"Not saved: the edit has {len(text):,} characters; at most {EDIT_MAX:,}, please."
    position = _edited_position(current, which)
    if position is None:
        return "Not saved: choose the answer to improve."
    try:
        store.save_edit(user, current["task_id"], position, text)
    except StoreError as e:
        return f"Not saved: {e}."
    return "Saved your improved answer (the original stays as it was; saving again replaces your edit)."


def edit_of(store: Store, user: str, current: dict, which: str) -> str | None:
    """The edit `user` has stored for the answer `which` on screen (as save_edit names it), or None."""
    position = _edited_position(current, which)
    return None if position is None else store.edit_of(user, current["task_id"], position)


# ---------------------------------------------------------------- admin (every function checks the role first)


def is_admin(store: Store, user: str) -> bool:
    """An active admin: a deactivated one loses the role's rights at once, even while signed in."""
    row = store.annotator(user)
    return row.role == "admin" and bool(row.active)


def require_admin(store: Store, user: str) -> None:
    if not is_admin(store, user):
        raise PermissionError(f"{user} is not an admin")


def overview(store: Store, user: str) -> dict:
    """Progress of pairs, rankings and ratings, the review queue's length, progress per annotator and round, and
    the agreement and bias figures (as text)."""
    require_admin(store, user)
    return {"pairs": store.progress(), "rankings": store.progress(kind="rank"), "ratings": store.progress(kind="rate"),
            "awaiting_review": len(store.review_queue()), "annotators": store.progress_by_annotator(),
            "stats": format_stats(quality_stats(store.tasks(kind=LABELED)))}


def review_queue(store: Store, user: str) -> list[dict]:
    """The votes the reward model strongly disagreed with, oldest first, each with `p_chosen`: the model's
    probability for the response the annotator chose."""
    require_admin(store, user)
    rows = store.review_queue()
    for row in rows:
        row["p_chosen"] = row["model_p_a"] if row["choice"] == "A" else 1 - row["model_p_a"]
    return rows


def review(store: Store, user: str, vote_id, decision: str) -> None:
    """Keep or reject a queued vote; a vote number that is not one raises TypeError or ValueError."""
    require_admin(store, user)
    store.review(int(vote_id), decision)


def add_prompts(store: Store, user: str, text: str, split: str) -> list[int]:
    """One prompt per non-empty line into the store, with the admin as their source; [] when there is none. Too
    many or too long lines raise a StoreError before anything is stored."""
    require_admin(store, user)
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        return []
    if len(prompts) > ADMIN_PROMPTS_MAX or max(map(len, prompts)) > ADMIN_PROMPT_MAX:
        raise StoreError(f"at most {ADMIN_PROMPTS_MAX} prompts at a time, each of at most {ADMIN_PROMPT_MAX:,} "
                         "characters; nothing was stored")
    return store.add_prompts(prompts, source=f"app:{user}", split=split or "train")


def add_annotator(store: Store, user: str, name: str, admin: bool) -> str | None:
    """A new account; returns its credential (to be shown this once), None without a name."""
    require_admin(store, user)
    name = (name or "").strip()
    if not name:
        return None
    return store.add_annotator(name, role="admin" if admin else "annotator")


def export(store: Store, user: str, out: str) -> dict:
    """The preference data as `rlhf data export` writes it; returns its counts."""
    require_admin(store, user)
    return run_export(ExportConfig(db=store.url, out=out))


def export_zip(store: Store, user: str) -> bytes:
    """The files `rlhf data export` writes (train/test/ties, the lossless tasks dump, export.json), as one zip."""
    require_admin(store, user)
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="rlhf-export-") as tmp:
        export(store, user, tmp)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(Path(tmp).iterdir()):
                archive.write(path, path.name)
    return buffer.getvalue()


def rounds(store: Store, user: str) -> list[dict]:
    """Every loop run recorded in the store, round by round (rlhf.rounds.rounds)."""
    from rlhf.rounds import rounds as recorded_rounds

    require_admin(store, user)
    return recorded_rounds(store)


def round_report(store: Store, user: str, run_id: str, round_: int) -> Path | None:
    """The report file of a recorded run's round (run_id: its key without the prefix), None if there is none."""
    from rlhf.rounds import PREFIX, report_path

    require_admin(store, user)
    return report_path(store, PREFIX + run_id, round_)
