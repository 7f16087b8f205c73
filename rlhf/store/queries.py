"""Reading the store back: a task's view, the next task for an annotator, progress, the votes and tasks
listings (what exports, statistics and the admin page read, edits included), an annotator's edits, and the review
queue."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import BigInteger, Integer, cast, exists, func, select
from sqlalchemy.orm import Session

from rlhf.store.schema import (
    LABELED,
    REVIEWS,
    Annotator,
    Edit,
    Meta,
    Prompt,
    Response,
    Skip,
    StoreError,
    Task,
    TaskItem,
    Vote,
    _iso,
)


@dataclass(frozen=True)
class TaskView:
    """What an annotator may see of a task: the prompt and responses, never anyone's votes."""

    id: int
    round: int
    how: str
    prompt: list[dict]
    responses: list[str]
    response_ids: list[int]
    models: list[str]


def _view(s: Session, task: Task) -> TaskView:
    prompt = s.get(Prompt, task.prompt_id)
    return TaskView(id=task.id, round=task.round, how=task.how, prompt=prompt.messages,
                    responses=[i.response.text for i in task.items], response_ids=[i.response_id for i in task.items],
                    models=[i.response.model for i in task.items])


def _response_row(r: Response) -> dict:
    return {"id": r.id, "text": r.text, "model": r.model, "model_revision": r.model_revision, "params": r.params,
            "created_at": _iso(r.created_at)}


def _vote_row(v: Vote, a: Annotator) -> dict:
    return {"annotator": a.name, "role": a.role, "simulated": a.simulated, "choice": v.choice, "strength": v.strength,
            "margin": v.margin, "rationale": v.rationale, "left": v.left, "guideline_version": v.guideline_version,
            "seconds": v.seconds, "created_at": _iso(v.created_at), "ranking": v.ranking, "shown": v.shown,
            "model_p_a": v.model_p_a, "review": v.review, "likert": v.likert}


class Queries:
    """Store's reads; each is one read-only transaction (`self.session(write=False)`, from Store)."""

    def counts(self) -> dict[str, int]:
        """Rows per table (prompts, responses, tasks, task_items, votes, skips, annotators, edits): what an import
        added, and what a refused one must leave as it was."""
        tables = {"prompts": Prompt, "responses": Response, "tasks": Task, "task_items": TaskItem, "votes": Vote,
                  "skips": Skip, "annotators": Annotator, "edits": Edit}
        with self.session(write=False) as s:
            return {name: s.scalar(select(func.count()).select_from(t)) for name, t in tables.items()}

    def records(self, prefix: str) -> dict[str, dict]:
        """The records (Writes.put_record) whose keys start with `prefix`, by key."""
        with self.session(write=False) as s:
            rows = s.execute(select(Meta.key, Meta.value).where(Meta.key.startswith(prefix, autoescape=True),
                                                                 Meta.key != "schema_version").order_by(Meta.key))
            return {key: json.loads(value) for key, value in rows}

    def task(self, task_id: int) -> TaskView:
        with self.session(write=False) as s:
            task = s.get(Task, task_id)
            if task is None:
                raise StoreError(f"no task {task_id}")
            return _view(s, task)

    def next_task(self, annotator: str, round: int | None = None, kind: str = "pair") -> TaskView | None:
        """A task this annotator has neither voted on nor skipped, with a free slot, in a per-annotator order.

        It is a suggestion, not a reservation: `submit` may still find the task full (TaskFull) when others took
        its last slot meanwhile; the caller then asks again.
        """
        with self.session(write=False) as s:
            who = s.scalar(select(Annotator.id).where(Annotator.name == annotator))
            if who is None:
                raise StoreError(f"no annotator named {annotator!r}")
            # A fixed pseudo-random order per annotator: two multiplicative-hash rounds mod the prime 2^31 - 1
            # with a per-annotator offset between them (64-bit arithmetic on both SQLite and PostgreSQL).
            p = 2147483647
            seed = (who * 2654435761) % p
            order = (((cast(Task.id, BigInteger) * 1103515245 + seed) % p) * 48271) % p
            query = (select(Task).where(
                Task.vote_count < Task.overlap, Task.kind == kind, Task.how != "repeat",
                ~exists().where(Vote.task_id == Task.id, Vote.annotator_id == who),
                ~exists().where(Skip.task_id == Task.id, Skip.annotator_id == who)).order_by(order).limit(1))
            if round is not None:
                query = query.where(Task.round == round)
            task = s.scalar(query)
            return _view(s, task) if task else None

    def edit_of(self, annotator: str, task_id: int, position: int) -> str | None:
        """This annotator's saved rewrite of the response at `position` of a task, or None."""
        with self.session(write=False) as s:
            return s.scalar(select(Edit.text).join(Annotator, Annotator.id == Edit.annotator_id)
                            .join(TaskItem, TaskItem.response_id == Edit.response_id)
                            .where(Annotator.name == annotator, TaskItem.task_id == task_id,
                                   TaskItem.position == position))

    def review_queue(self, state: str = "queued") -> list[dict]:
        """Votes in a review state ("queued" by default) with their task's prompt and responses, oldest first."""
        if state not in REVIEWS:
            raise StoreError(f"review state must be one of {', '.join(REVIEWS)}")
        with self.session(write=False) as s:
            rows = []
            for vote, task, who in s.execute(select(Vote, Task, Annotator).join(Task, Task.id == Vote.task_id)
                                             .join(Annotator, Annotator.id == Vote.annotator_id)
                                             .where(Vote.review == state).order_by(Vote.id)):
                rows.append({"vote_id": vote.id, "task_id": task.id, "annotator": who.name, "choice": vote.choice,
                             "strength": vote.strength, "rationale": vote.rationale, "model_p_a": vote.model_p_a,
                             "prompt": s.get(Prompt, task.prompt_id).messages,
                             "responses": [i.response.text for i in task.items]})
            return rows

    def random_prompt(self, split: str | None = None) -> list[dict] | None:
        """One stored prompt (of `split`, if given) at random, as messages; None when there is none."""
        with self.session(write=False) as s:
            query = select(Prompt.messages).order_by(func.random()).limit(1)
            if split:
                query = query.where(Prompt.split == split)
            return s.scalar(query)

    def prompts_with_tasks(self, round: int) -> set[int]:
        with self.session(write=False) as s:
            return set(s.scalars(select(Task.prompt_id).where(Task.round == round).distinct()))

    def progress(self, annotator: str | None = None, round: int | None = None, kind: str = "pair") -> dict:
        """Counts for a progress bar: tasks, slots (sum of overlaps), votes, complete tasks; with an annotator also
        `done` (their votes), `skipped`, and `open` (tasks that next_task could still give them). Swapped repeats
        are not counted: they are extra work for the bias audit, not part of the round."""
        with self.session(write=False) as s:
            tasks = select(Task).where(Task.kind == kind, Task.how != "repeat")
            if round is not None:
                tasks = tasks.where(Task.round == round)
            sub = tasks.subquery()
            total, slots, filled, complete = s.execute(select(
                func.count(), func.coalesce(func.sum(sub.c.overlap), 0), func.coalesce(func.sum(sub.c.vote_count), 0),
                func.coalesce(func.sum(cast(sub.c.vote_count >= sub.c.overlap, Integer)), 0))).one()
            result = {"tasks": total, "slots": int(slots), "votes": int(filled), "complete_tasks": int(complete)}
            if annotator is not None:
                who = s.scalar(select(Annotator.id).where(Annotator.name == annotator))
                if who is None:
                    raise StoreError(f"no annotator named {annotator!r}")
                voted = select(Vote.task_id).where(Vote.annotator_id == who)
                skipped = select(Skip.task_id).where(Skip.annotator_id == who)
                result["done"] = s.scalar(select(func.count()).select_from(sub).where(sub.c.id.in_(voted)))
                result["skipped"] = s.scalar(select(func.count()).select_from(sub).where(sub.c.id.in_(skipped)))
                result["open"] = s.scalar(select(func.count()).select_from(sub).where(
                    sub.c.vote_count < sub.c.overlap, sub.c.id.not_in(voted), sub.c.id.not_in(skipped)))
            return result

    def progress_by_annotator(self, round: int | None = None) -> list[dict]:
        """One row per annotator and round: votes, skips, mean seconds per vote, last vote (for the admin page)."""
        with self.session(write=False) as s:
            rows: dict[tuple[str, int], dict] = {}
            votes = (select(Annotator.name, Task.round, func.count(), func.avg(Vote.seconds), func.max(Vote.created_at))
                     .join(Vote, Vote.annotator_id == Annotator.id).join(Task, Task.id == Vote.task_id)
                     .where(Task.kind.in_(LABELED)).group_by(Annotator.name, Task.round))
            skips = (select(Annotator.name, Task.round, func.count()).join(Skip, Skip.annotator_id == Annotator.id)
                     .join(Task, Task.id == Skip.task_id).where(Task.kind.in_(LABELED))
                     .group_by(Annotator.name, Task.round))
            if round is not None:
                votes, skips = votes.where(Task.round == round), skips.where(Task.round == round)
            for name, rd, n, mean_s, last in s.execute(votes):
                rows[(name, rd)] = {"annotator": name, "round": rd, "done": n, "skipped": 0,
                                    "mean_seconds": None if mean_s is None else float(mean_s), "last_vote": _iso(last)}
            for name, rd, n in s.execute(skips):
                rows.setdefault((name, rd), {"annotator": name, "round": rd, "done": 0, "mean_seconds": None,
                                             "last_vote": None})["skipped"] = n
            return [rows[k] for k in sorted(rows)]

    def votes(self, round: int | None = None, kind: str = "pair") -> list[dict]:
        """Every vote with its task's responses and the annotator's name (for export, statistics, the admin page)."""
        with self.session(write=False) as s:
            query = (select(Vote, Task, Annotator).join(Task, Task.id == Vote.task_id)
                     .join(Annotator, Annotator.id == Vote.annotator_id).where(Task.kind == kind).order_by(Vote.id))
            if round is not None:
                query = query.where(Task.round == round)
            rows = []
            for vote, task, who in s.execute(query):
                rows.append({"vote_id": vote.id, "task_id": task.id, "round": task.round, "how": task.how,
                             "repeat_of": task.repeat_of, "annotator": who.name, "simulated": who.simulated,
                             "choice": vote.choice, "strength": vote.strength, "margin": vote.margin, "left": vote.left,
                             "rationale": vote.rationale, "guideline_version": vote.guideline_version,
                             "seconds": vote.seconds, "created_at": vote.created_at.isoformat(),
                             "ranking": vote.ranking, "shown": vote.shown, "model_p_a": vote.model_p_a,
                             "review": vote.review, "likert": vote.likert,
                             "response_ids": [i.response_id for i in task.items],
                             "responses": [i.response.text for i in task.items]})
            return rows

    def tasks(self, round: int | None = None, kind: str | tuple[str, ...] | None = "pair") -> list[dict]:
        """Every task with its prompt, responses (id, text, model, parameters), votes, skips and edits (annotator,
        the response's position, the rewritten text), in id order.

        Also the task rows of the lossless dump (`dump`). `kind` is one kind, several (LABELED: what people label
        and trainers read), or None for every kind.
        """
        with self.session(write=False) as s:
            query = select(Task).order_by(Task.id)
            if kind is not None:
                query = query.where(Task.kind.in_((kind,) if isinstance(kind, str) else kind))
            if round is not None:
                query = query.where(Task.round == round)
            tasks = list(s.scalars(query))
            chosen = query.with_only_columns(Task.id).order_by(None).subquery()
            # Three bulk reads for all the tasks rather than three per task.
            prompts = {p.id: p for p in s.scalars(select(Prompt).where(Prompt.id.in_(
                select(Task.prompt_id).where(Task.id.in_(select(chosen.c.id))))))}
            votes: dict[int, list] = defaultdict(list)
            for v, a in s.execute(select(Vote, Annotator).join(Annotator, Annotator.id == Vote.annotator_id)
                                  .where(Vote.task_id.in_(select(chosen.c.id))).order_by(Vote.id)):
                votes[v.task_id].append(_vote_row(v, a))
            skips: dict[int, list] = defaultdict(list)
            for task_id, name in s.execute(select(Skip.task_id, Annotator.name).join(
                    Annotator, Annotator.id == Skip.annotator_id).where(Skip.task_id.in_(select(chosen.c.id)))
                    .order_by(Skip.created_at, Annotator.name)):
                skips[task_id].append(name)
            edits: dict[int, list] = defaultdict(list)
            for e, name, position in s.execute(
                    select(Edit, Annotator.name, TaskItem.position).join(Annotator, Annotator.id == Edit.annotator_id)
                    .join(TaskItem, (TaskItem.task_id == Edit.task_id) & (TaskItem.response_id == Edit.response_id))
                    .where(Edit.task_id.in_(select(chosen.c.id))).order_by(Edit.id)):
                edits[e.task_id].append({"annotator": name, "position": position, "text": e.text,
                                         "created_at": _iso(e.created_at)})
            out = []
            for task in tasks:
                prompt = prompts[task.prompt_id]
                out.append({
                    "task_id": task.id, "round": task.round, "how": task.how, "kind": task.kind,
                    "overlap": task.overlap, "repeat_of": task.repeat_of, "created_at": _iso(task.created_at),
                    "prompt": prompt.messages, "prompt_source": prompt.source, "prompt_split": prompt.split,
                    "prompt_created_at": _iso(prompt.created_at),
                    "responses": [_response_row(i.response) for i in task.items],
                    "votes": votes.get(task.id, []), "skips": skips.get(task.id, []),
                    "edits": edits.get(task.id, []),
                })
            return out

