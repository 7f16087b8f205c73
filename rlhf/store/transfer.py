"""The store as records and back: `Store.dump()` writes everything it holds as JSON-able records, and
`import_tasks` reads such records (or plain task rows) into a store in one transaction."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from contextlib import suppress
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError

from rlhf.store.queries import _response_row
from rlhf.store.schema import (
    CHOICES,
    KINDS,
    NAME_MAX,
    RANK_CHOICES,
    RATE_CHOICES,
    REVIEWS,
    Annotator,
    Edit,
    Prompt,
    Response,
    Skip,
    StoreError,
    Task,
    TaskItem,
    Vote,
    _iso,
    _now,
    _short,
)
from rlhf.store.writes import (
    _as_messages,
    _get_or_add_prompt,
    check_edit_text,
    check_likert,
    check_vote_text,
    task_size_ok,
    valid_ranking,
)

if TYPE_CHECKING:
    from rlhf.store import Store


def _when(value) -> datetime:
    return datetime.fromisoformat(value) if value else _now()


class Transfer:
    """Store's lossless dump (read by `import_tasks`)."""

    def dump(self) -> list[dict]:
        """Everything the store holds as JSON-able records, which `import_tasks` reads back into an equal store.

        Records: every annotator ({"record": "annotator"}, without credential hashes: an imported account signs
        in after `reset_credential`), every task ({"record": "task"}, as `tasks(kind=None)`), and each prompt
        with the responses no task uses ({"record": "prompt"}: prompts waiting for generation, unpaired samples).
        """
        records: list[dict] = []
        with self.session(write=False) as s:
            for a in s.scalars(select(Annotator).order_by(Annotator.id)):
                records.append({"record": "annotator", "name": a.name, "role": a.role, "active": a.active,
                                "simulated": a.simulated, "created_at": _iso(a.created_at)})
        records += [{"record": "task", **t} for t in self.tasks(kind=None)]
        with self.session(write=False) as s:
            used = select(TaskItem.response_id)
            loose: dict[int, list] = defaultdict(list)
            for r in s.scalars(select(Response).where(Response.id.not_in(used)).order_by(Response.id)):
                loose[r.prompt_id].append(_response_row(r))
            with_tasks = set(s.scalars(select(Task.prompt_id).distinct()))
            for p in s.scalars(select(Prompt).order_by(Prompt.id)):
                if p.id in loose or p.id not in with_tasks:
                    records.append({"record": "prompt", "prompt": p.messages, "prompt_source": p.source,
                                    "prompt_split": p.split, "prompt_created_at": _iso(p.created_at),
                                    "responses": loose.get(p.id, [])})
        return records


def _number(value, name: str, low: float | None = None, high: float | None = None, whole: bool = False):
    """A finite number (int with `whole`) within [low, high], else a ValueError naming the field."""
    if isinstance(value, str) and not whole:
        with suppress(ValueError):
            value = float(value)
    if isinstance(value, str) and whole and value.strip().lstrip("-").isdigit():
        value = int(value)
    ok = isinstance(value, int) if whole else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or (low is not None and value < low) or (
            high is not None and value > high):
        span = f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a {'whole' if whole else 'finite'} number{span}, not {value!r}")
    return value


def _vote_fields(v: dict, kind: str, k: int) -> dict:
    """A vote record checked against its task (the kind decides the choices, K the ranking): the Vote's fields."""
    if not isinstance(v, dict):
        raise ValueError("a vote is an object")
    choices = {"rank": RANK_CHOICES, "rate": RATE_CHOICES}.get(kind, CHOICES)
    if v.get("choice") not in choices:
        raise ValueError(f"bad vote: a {kind} task takes choice {', '.join(choices)}, not {v.get('choice')!r}")
    strength = v.get("strength", 2)
    if isinstance(strength, bool) or strength not in (1, 2, 3):
        raise ValueError(f"bad vote: strength must be 1, 2 or 3, not {strength!r}")
    if v.get("role", "annotator") not in ("annotator", "admin"):
        raise ValueError(f"bad vote: role must be annotator or admin, not {v.get('role')!r}")
    if v.get("left", "A") not in ("A", "B"):
        raise ValueError(f"bad vote: left must be A or B, not {v.get('left')!r}")
    if v.get("review") not in (None, *REVIEWS):
        raise ValueError(f"bad vote: review must be one of {', '.join(REVIEWS)}")
    ranking, shown = v.get("ranking"), v.get("shown")
    if (v["choice"] == "ranked") != (ranking is not None) or (ranking is not None and not valid_ranking(ranking, k)):
        raise ValueError(f"bad vote: a ranked vote needs a ranking placing each of the positions 0-{k - 1} exactly "
                         "once (and only a ranked vote has one)")
    if shown is not None and not valid_ranking([[p] for p in shown] if isinstance(shown, list) else None, k):
        raise ValueError(f"bad vote: shown must list the positions 0-{k - 1} once each")
    rationale, guideline = v.get("rationale") or "", v.get("guideline_version") or ""
    seconds, margin, p_a, likert = v.get("seconds"), v.get("margin"), v.get("model_p_a"), v.get("likert")
    try:
        check_vote_text(rationale, guideline, None if seconds is None else _number(seconds, "seconds", 0))
        check_likert(likert)
    except StoreError as e:
        raise ValueError(f"bad vote: {e}") from None
    if likert is not None and kind != "rate":
        raise ValueError("bad vote: only a rating carries a Likert score")
    return dict(choice=v["choice"], strength=strength, rationale=rationale, left=v.get("left", "A"),
                guideline_version=guideline, seconds=None if seconds is None else float(seconds),
                margin=None if margin is None else float(_number(margin, "margin")), ranking=ranking, shown=shown,
                model_p_a=None if p_a is None else float(_number(p_a, "model_p_a", 0, 1)), review=v.get("review"),
                likert=likert, created_at=_when(v.get("created_at")))


def _task_key(kind: str, how: str, texts) -> tuple:
    """What makes two tasks the same data (an import of a file already imported): not their ids, rounds or dates."""
    return kind, how, tuple(texts)


def import_tasks(store: Store, rows: list[dict], source: str = "", where: list[str] | None = None) -> dict:
    """Write dump records (`Store.dump()`, or task rows without a "record" key) in ONE transaction: all or nothing.

    A task row: prompt (text or messages), responses [{text, model, ..., optional id}], optional votes
    [{annotator, choice, strength, margin, left, likert, ...}], skips [names], edits [{annotator, position, text}],
    round, how, kind, overlap, repeat_of.
    Response ids and task ids are the dump's own: the same id is one response (shared by several tasks), and
    repeat_of points at a task of the same dump. Annotators that do not exist are created without a credential.
    Each row is checked whole before its rows are added (a vote must fit its task's kind, a ranking order every
    response), and one bad row rolls the whole import back. A task the store already holds (same prompt, kind,
    how and response texts) is skipped with its votes: a file imported twice adds nothing the second time
    ("skipped" counts them).
    `where` names each row's origin ("file:line") for error messages. Returns counts of what was added.
    """
    counts: Counter = Counter()
    where = where or [f"row {i}" for i in range(1, len(rows) + 1)]
    at = ""
    try:
        with store.session() as s:
            annotators = {a.name: a for a in s.scalars(select(Annotator))}
            responses: dict = {}  # dump response id -> stored Response
            tasks: dict = {}  # dump task id -> stored task id
            repeats: list[tuple[int, object, str]] = []
            existing: dict[int, dict] = {}  # prompt id -> task key -> stored task ids not yet matched by a row

            # Prompts made by this import hold nothing from before it: only older ones are searched for duplicates.
            newest_before = s.scalar(select(func.max(Prompt.id))) or 0

            def already(prompt: Prompt) -> dict:
                # What the store held before this import, per prompt, read at the prompt's first row (before any of
                # this import's additions to it).
                if prompt.id not in existing:
                    found: dict = defaultdict(list)
                    if prompt.id <= newest_before:
                        for t in s.scalars(select(Task).where(Task.prompt_id == prompt.id).order_by(Task.id)):
                            found[_task_key(t.kind, t.how, [i.response.text for i in t.items])].append(t.id)
                        found["loose"] = [(r.text, r.model) for r in s.scalars(select(Response).where(
                            Response.prompt_id == prompt.id, Response.id.not_in(select(TaskItem.response_id))))]
                    existing[prompt.id] = found
                return existing[prompt.id]

            def annotator(name: str, **fields) -> Annotator:
                if name not in annotators:
                    if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX:
                        raise ValueError(f"bad annotator name {name!r}")
                    row = Annotator(name=name, credential_hash="", **fields)
                    s.add(row)
                    s.flush()
                    annotators[name] = row
                    counts["annotators"] += 1
                return annotators[name]

            def add_responses(prompt: Prompt, items: list[dict], loose: list | None = None) -> list[Response]:
                out = []
                if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
                    raise ValueError("responses must be a list of {text, model, ...} objects")
                for r in items:
                    if r.get("id") is not None and r["id"] in responses:
                        out.append(responses[r["id"]])
                        continue
                    if not isinstance(r.get("text"), str) or not r["text"].strip():
                        raise ValueError("empty response text")
                    if loose is not None and (r["text"], r.get("model") or "") in loose:
                        loose.remove((r["text"], r.get("model") or ""))  # a prompt record imported before
                        counts["skipped"] += 1
                        continue
                    row = Response(prompt_id=prompt.id, text=r["text"], model=r.get("model") or "",
                                   model_revision=r.get("model_revision") or "", params=r.get("params") or {},
                                   created_at=_when(r.get("created_at")))
                    s.add(row)
                    counts["responses"] += 1
                    if r.get("id") is not None:
                        responses[r["id"]] = row
                    out.append(row)
                s.flush()
                return out

            for row, at in zip(rows, where):
                try:
                    if not isinstance(row, dict):
                        raise ValueError("a row is an object")
                    record = row.get("record", "task")
                    if record == "annotator":
                        if row.get("role", "annotator") not in ("annotator", "admin"):
                            raise ValueError(f"role must be annotator or admin, not {row.get('role')!r}")
                        annotator(row["name"], role=row.get("role", "annotator"), active=bool(row.get("active", True)),
                                  simulated=bool(row.get("simulated", False)), created_at=_when(row.get("created_at")))
                        continue
                    if record not in ("task", "prompt"):
                        raise ValueError(f"unknown record type {record!r}")
                    split = row.get("prompt_split", "train")
                    if not isinstance(split, str) or len(split) > 32:
                        raise ValueError(f"prompt_split must be a name of at most 32 characters, not {split!r}")
                    prompt = _get_or_add_prompt(s, _as_messages(row["prompt"]), row.get("prompt_source", source),
                                                split, _when(row.get("prompt_created_at")))
                    if record == "prompt":
                        add_responses(prompt, row.get("responses") or [], already(prompt).get("loose"))
                        continue
                    _import_task(s, row, prompt, at, add_responses, annotator, already, tasks, repeats, counts)
                except StoreError as e:
                    raise StoreError(f"{at}: {e}") from None
                except (KeyError, TypeError, ValueError, OverflowError) as e:
                    what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                    raise StoreError(f"{at}: {what}") from None
            for task_id, original, at in repeats:
                if original not in tasks:
                    raise StoreError(f"{at}: repeat_of {original} names no task of this import")
                s.execute(update(Task).where(Task.id == task_id).values(repeat_of=tasks[original]))
    except DBAPIError as e:  # a duplicate vote, a value out of range or too long: nothing was written
        raise StoreError(f"{at}: import rolled back: {_short(e, store.url)}") from None
    return dict(counts)


def _import_task(s, row: dict, prompt: Prompt, at: str, add_responses, annotator, already, tasks: dict,
                 repeats: list, counts: Counter) -> None:
    """One task row of `import_tasks`: checked whole (kind, responses, every vote) before its rows are added."""
    kind, how = row.get("kind") or "pair", row.get("how") or "import"
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not isinstance(how, str) or len(how) > 32:
        raise ValueError(f"how must be a name of at most 32 characters, not {how!r}")
    items = row["responses"]
    if not isinstance(items, list) or not task_size_ok(kind, len(items)):
        wanted = {"rate": "one response", "rank": "two or more responses"}.get(kind, "two responses")
        raise ValueError(f"a {kind} task takes {wanted}")
    votes = row.get("votes") or []
    if not isinstance(votes, list):
        raise ValueError("votes must be a list")
    fields = [_vote_fields(v, kind, len(items)) for v in votes]
    names = [v.get("annotator") for v in votes]
    if len(set(map(str, names))) != len(names):
        raise ValueError("two votes by the same annotator on one task")
    overlap = _number(row.get("overlap", 1), "overlap", 1, whole=True)
    if overlap < max(len(votes), 1):
        raise ValueError(f"overlap {overlap} is less than the {len(votes)} votes given")
    round_ = _number(row.get("round", 0), "round", whole=True)
    texts = [r.get("text") if isinstance(r, dict) else None for r in items]
    # The same task as one stored before this import (the file imported again): skip it and its votes.
    match = already(prompt).get(_task_key(kind, how, texts))
    if match:
        if row.get("task_id") is not None:
            tasks[row["task_id"]] = match[0]
        match.pop(0)
        counts["skipped"] += 1
        return
    edits = row.get("edits") or []
    if not isinstance(edits, list) or not all(isinstance(e, dict) for e in edits):
        raise ValueError("edits must be a list of {annotator, position, text} objects")
    for e in edits:
        position = e.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(items):
            raise ValueError(f"an edit's position must name one of the task's {len(items)} responses")
        try:
            check_edit_text(e.get("text"), str((items[position] or {}).get("text") or ""))
        except StoreError as err:
            raise ValueError(f"bad edit: {err}") from None
    if len({(str(e.get("annotator")), e["position"]) for e in edits}) != len(edits):
        raise ValueError("two edits of one response by the same annotator")
    items = add_responses(prompt, items)
    if not task_size_ok(kind, len(items)) or len({r.id for r in items}) != len(items):
        raise ValueError("a task needs distinct responses")
    if any(r.prompt_id != prompt.id for r in items):
        raise ValueError("a response id of another prompt")
    task = Task(prompt_id=prompt.id, round=round_, how=how, kind=kind, overlap=overlap, vote_count=len(votes),
                created_at=_when(row.get("created_at")))
    s.add(task)
    s.flush()
    if row.get("task_id") is not None:
        tasks[row["task_id"]] = task.id
    if row.get("repeat_of") is not None:
        repeats.append((task.id, row["repeat_of"], at))
    s.add_all(TaskItem(task_id=task.id, position=i, response_id=r.id) for i, r in enumerate(items))
    for v, f in zip(votes, fields):
        who = annotator(v["annotator"], role=v.get("role", "annotator"), active=False,
                        simulated=bool(v.get("simulated", False)))
        s.add(Vote(task_id=task.id, annotator_id=who.id, **f))
        counts["votes"] += 1
    skips = row.get("skips") or []
    if not isinstance(skips, list):
        raise ValueError("skips must be a list of annotator names")
    for name in dict.fromkeys(skips):
        s.add(Skip(task_id=task.id, annotator_id=annotator(name, active=False).id))
    for e in edits:
        s.add(Edit(task_id=task.id, response_id=items[e["position"]].id, annotator_id=annotator(
            e["annotator"], active=False).id, text=e["text"].strip(), created_at=_when(e.get("created_at"))))
        counts["edits"] += 1
    s.flush()
    counts["tasks"] += 1
