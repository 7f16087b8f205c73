"""The store as records and back: `Store.dump()` writes everything it holds as JSON-able records, and
`import_tasks` reads such records (or plain task rows) into a store in one transaction."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from rlhf.store.queries import _response_row
from rlhf.store.schema import (
    CHOICES,
    NAME_MAX,
    RANK_CHOICES,
    REVIEWS,
    Annotator,
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
from rlhf.store.writes import _as_messages, _get_or_add_prompt

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


def import_tasks(store: Store, rows: list[dict], source: str = "", where: list[str] | None = None) -> dict:
    """Write dump records (`Store.dump()`, or task rows without a "record" key) in ONE transaction: all or nothing.

    A task row: prompt (text or messages), responses [{text, model, ..., optional id}], optional votes
    [{annotator, choice, strength, margin, left, ...}], skips [names], round, how, kind, overlap, repeat_of.
    Response ids and task ids are the dump's own: the same id is one response (shared by several tasks), and
    repeat_of points at a task of the same dump. Annotators that do not exist are created without a credential.
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

            def add_responses(prompt: Prompt, items: list[dict]) -> list[Response]:
                out = []
                for r in items:
                    if r.get("id") is not None and r["id"] in responses:
                        out.append(responses[r["id"]])
                        continue
                    if not isinstance(r.get("text"), str) or not r["text"].strip():
                        raise ValueError("empty response text")
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
                record = row.get("record", "task")
                try:
                    if record == "annotator":
                        if row.get("role", "annotator") not in ("annotator", "admin"):
                            raise ValueError(f"role must be annotator or admin, not {row.get('role')!r}")
                        annotator(row["name"], role=row.get("role", "annotator"), active=bool(row.get("active", True)),
                                  simulated=bool(row.get("simulated", False)), created_at=_when(row.get("created_at")))
                        continue
                    prompt = _get_or_add_prompt(s, _as_messages(row["prompt"]), row.get("prompt_source", source),
                                                row.get("prompt_split", "train"), _when(row.get("prompt_created_at")))
                    if record == "prompt":
                        add_responses(prompt, row.get("responses") or [])
                        continue
                    if record != "task":
                        raise ValueError(f"unknown record type {record!r}")
                    items = add_responses(prompt, row["responses"])
                    if len(items) < 2 or len({r.id for r in items}) != len(items):
                        raise ValueError("a task needs two or more distinct responses")
                    if any(r.prompt_id != prompt.id for r in items):
                        raise ValueError("a response id of another prompt")
                    votes = row.get("votes") or []
                    overlap = int(row.get("overlap", 1))
                    if overlap < max(len(votes), 1):
                        raise ValueError(f"overlap {overlap} is less than the {len(votes)} votes given")
                    task = Task(prompt_id=prompt.id, round=int(row.get("round", 0)), how=row.get("how") or "import",
                                kind=row.get("kind") or "pair", overlap=overlap, vote_count=len(votes),
                                created_at=_when(row.get("created_at")))
                    s.add(task)
                    s.flush()
                    if row.get("task_id") is not None:
                        tasks[row["task_id"]] = task.id
                    if row.get("repeat_of") is not None:
                        repeats.append((task.id, row["repeat_of"], at))
                    s.add_all(TaskItem(task_id=task.id, position=i, response_id=r.id) for i, r in enumerate(items))
                    for v in votes:
                        who = annotator(v["annotator"], role=v.get("role", "annotator"), active=False,
                                        simulated=bool(v.get("simulated", False)))
                        strength = v.get("strength", 2)
                        if v.get("choice") not in CHOICES + RANK_CHOICES or strength not in (1, 2, 3):
                            raise ValueError(f"bad vote: choice must be one of {', '.join(CHOICES + RANK_CHOICES)}, "
                                             "strength 1-3")
                        if v.get("review") not in (None, *REVIEWS):
                            raise ValueError(f"bad vote: review must be one of {', '.join(REVIEWS)}")
                        margin = v.get("margin")
                        s.add(Vote(task_id=task.id, annotator_id=who.id, choice=v["choice"], strength=strength,
                                   margin=None if margin is None else float(margin), rationale=v.get("rationale") or "",
                                   left=v.get("left", "A"), guideline_version=v.get("guideline_version") or "",
                                   seconds=v.get("seconds"), created_at=_when(v.get("created_at")),
                                   ranking=v.get("ranking"), shown=v.get("shown"), model_p_a=v.get("model_p_a"),
                                   review=v.get("review")))
                        counts["votes"] += 1
                    for name in row.get("skips") or []:
                        s.add(Skip(task_id=task.id, annotator_id=annotator(name, active=False).id))
                    s.flush()
                    counts["tasks"] += 1
                except StoreError as e:
                    raise StoreError(f"{at}: {e}") from None
                except (KeyError, TypeError, ValueError) as e:
                    what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                    raise StoreError(f"{at}: {what}") from None
            for task_id, original, at in repeats:
                if original not in tasks:
                    raise StoreError(f"{at}: repeat_of {original} names no task of this import")
                s.execute(update(Task).where(Task.id == task_id).values(repeat_of=tasks[original]))
    except DBAPIError as e:  # a duplicate vote, a value out of range or too long: nothing was written
        raise StoreError(f"{at}: import rolled back: {_short(e)}") from None
    return dict(counts)

