"""Writing to the store: prompts, responses and tasks (arena tasks too), votes, rankings and ratings, annotators'
edits, swapped repeats, the reward model's verdict and an admin's review, skips and undo, records (JSON documents
such as a loop run's rounds). Every method is one transaction."""

from __future__ import annotations

import json
import math
from contextlib import suppress
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf.store.queries import TaskView, _view
from rlhf.store.schema import (
    CHOICES,
    EDIT_MAX,
    GUIDELINE_MAX,
    KINDS,
    LIKERT,
    PROMPT_MAX,
    RATE_CHOICES,
    RATIONALE_MAX,
    SOURCE_MAX,
    AlreadyVoted,
    Annotator,
    Edit,
    Meta,
    Prompt,
    Response,
    Skip,
    StoreError,
    Task,
    TaskFull,
    TaskItem,
    Vote,
    _now,
    prompt_key,
)


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise StoreError("empty prompt text")
        return [{"role": "user", "content": prompt}]
    try:
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    except (KeyError, TypeError):
        raise StoreError("a prompt is text or a list of {role, content} messages") from None
    if not messages or not all(isinstance(m["content"], str) and m["content"].strip() for m in messages):
        raise StoreError("a prompt needs at least one message, each with non-empty text")
    if not all(isinstance(m["role"], str) and m["role"] in ROLES for m in messages):
        raise StoreError(f"a message's role is one of {', '.join(ROLES)}")
    return messages


ROLES = ("system", "user", "assistant")  # what chat templates know
# What a vote on each kind of task is (the message when one is sent to the wrong kind).
TAKES = {"pair": "a choice (A, B, tie, both_bad)", "arena": "a choice (A, B, tie, both_bad)",
         "rank": "a ranking (submit_ranking)", "rate": "a rating, up or down (submit_rating)"}


def check_vote_text(rationale, guideline_version, seconds) -> None:
    """An annotator's free text and timing, bounded (RATIONALE_MAX, GUIDELINE_MAX) and typed, or a StoreError."""
    if not isinstance(rationale, str) or len(rationale) > RATIONALE_MAX:
        raise StoreError(f"a rationale is text of at most {RATIONALE_MAX} characters")
    if not isinstance(guideline_version, str) or len(guideline_version) > GUIDELINE_MAX:
        raise StoreError(f"guideline_version is text of at most {GUIDELINE_MAX} characters")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not math.isfinite(seconds) or seconds < 0):
        raise StoreError(f"seconds must be a number >= 0, not {seconds!r}")


def check_ids(annotator, task_id) -> None:
    """A name and a task id of the right types (what an endpoint passes on may be anything), or a StoreError."""
    if not isinstance(annotator, str):
        raise StoreError("an annotator is named by text")
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 < task_id < 2**63:
        raise StoreError(f"no task {task_id!r}")


def valid_ranking(ranking, k: int) -> bool:
    """Whether `ranking` is non-empty groups of positions 0..k-1, best first, every position exactly once."""
    if not isinstance(ranking, (list, tuple)) or not all(isinstance(g, (list, tuple)) and g for g in ranking):
        return False
    flat = [p for group in ranking for p in group]
    return all(isinstance(p, int) and not isinstance(p, bool) for p in flat) and sorted(flat) == list(range(k))


def task_size_ok(kind: str, size: int) -> bool:
    """Whether a task of `kind` may hold `size` responses: one to rate, two to compare, two or more to rank."""
    return size == 1 if kind == "rate" else size >= 2 if kind == "rank" else size == 2


def check_likert(likert) -> None:
    if likert is not None and (isinstance(likert, bool) or not isinstance(likert, int)
                               or not LIKERT[0] <= likert <= LIKERT[1]):
        raise StoreError(f"a Likert score is a whole number from {LIKERT[0]} to {LIKERT[1]}, not {likert!r}")


def check_edit_text(text, original: str) -> str:
    """An annotator's rewrite: text, not blank, within EDIT_MAX, and not the original unchanged. Returns it stripped
    of surrounding whitespace."""
    if not isinstance(text, str) or not text.strip():
        raise StoreError("an edit is the improved answer's text, not empty")
    if len(text) > EDIT_MAX:
        raise StoreError(f"an edit is at most {EDIT_MAX:,} characters, not {len(text):,}")
    if text.strip() == original.strip():
        raise StoreError("the edit is the same as the answer: change something first")
    return text.strip()


def _get_or_add_prompt(s: Session, messages: list[dict], source: str, split: str,
                       created_at: datetime | None = None) -> Prompt:
    key = prompt_key(messages)
    row = s.scalar(select(Prompt).where(Prompt.key == key))
    if row is None:
        row = Prompt(key=key, messages=messages, source=(source or "")[:SOURCE_MAX], split=split or "train",
                     created_at=created_at or _now())
        s.add(row)
        s.flush()
    return row


class Writes:
    """Store's writes; each is one transaction (`self.session()`, from Store: SQLite's write lock up front)."""

    def add_prompts(self, prompts: list, source: str = "", split: str | list[str] = "train") -> list[int]:
        """Add prompts (text or chat messages) in one transaction; an identical prompt is reused. Returns ids.

        `split` is one split for all, or one per prompt.
        """
        splits = [split] * len(prompts) if isinstance(split, str) else list(split)
        if len(splits) != len(prompts):
            raise StoreError("give one split, or one per prompt")
        if not all(isinstance(x, str) and len(x) <= 32 for x in splits) or not isinstance(source, str):
            raise StoreError("a split is a name of at most 32 characters, and the source is text")
        messages = [_as_messages(p) for p in prompts]
        keys = [prompt_key(m) for m in messages]
        with self.session() as s:
            # Looked up and inserted in bulk, not one query and flush per prompt: a large import holds the write
            # lock (which the app's votes wait for) as briefly as it can.
            ids: dict[str, int] = {}
            distinct = list(dict.fromkeys(keys))
            for start in range(0, len(distinct), 500):
                chunk = distinct[start : start + 500]
                ids.update((k, i) for k, i in s.execute(select(Prompt.key, Prompt.id).where(Prompt.key.in_(chunk))))
            rows: dict[str, Prompt] = {}
            for key, m, split_ in zip(keys, messages, splits):
                if key not in ids and key not in rows:
                    rows[key] = Prompt(key=key, messages=m, source=source[:SOURCE_MAX], split=split_ or "train",
                                       created_at=_now())
            s.add_all(rows.values())
            s.flush()
            ids.update((key, row.id) for key, row in rows.items())
            return [ids[key] for key in keys]

    def add_responses(self, prompt_id: int, texts: list[str], model: str = "", params: dict | None = None,
                      model_revision: str = "") -> list[int]:
        with self.session() as s:
            if s.get(Prompt, prompt_id) is None:
                raise StoreError(f"no prompt {prompt_id}")
            rows = [Response(prompt_id=prompt_id, text=t, model=model, model_revision=model_revision,
                             params=params or {}) for t in texts]
            s.add_all(rows)
            s.flush()
            return [r.id for r in rows]

    def add_task(self, response_ids: list[int], round: int = 0, how: str = "random", overlap: int = 1,
                 kind: str = "pair", repeat_of: int | None = None) -> int:
        """A task on responses to one prompt: a pair to compare (position 0 is A, 1 is B), K to rank, one to rate."""
        if not response_ids or len(set(response_ids)) != len(response_ids):
            raise StoreError("a task needs distinct responses")
        if overlap < 1:
            raise StoreError("overlap must be at least 1")
        if kind not in KINDS:
            raise StoreError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not task_size_ok(kind, len(response_ids)):
            wanted = {"rate": "one response", "rank": "two or more responses"}.get(kind, "two responses")
            raise StoreError(f"a {kind} task takes {wanted}, not {len(response_ids)}")
        with self.session() as s:
            responses = [s.get(Response, r) for r in response_ids]
            if any(r is None for r in responses):
                raise StoreError(f"unknown response id in {response_ids}")
            if len({r.prompt_id for r in responses}) != 1:
                raise StoreError("the responses of a task must answer the same prompt")
            if repeat_of is not None and s.get(Task, repeat_of) is None:
                raise StoreError(f"no task {repeat_of} to repeat")
            task = Task(prompt_id=responses[0].prompt_id, round=round, how=how, overlap=overlap, kind=kind,
                        repeat_of=repeat_of)
            s.add(task)
            s.flush()
            s.add_all(TaskItem(task_id=task.id, position=i, response_id=r) for i, r in enumerate(response_ids))
            return task.id

    def add_candidates(self, prompt_id: int, answers: list[tuple[str, str, dict]], tasks: list[tuple[list[int], str]],
                       round: int = 0, overlap: int = 1, kind: str = "pair",
                       rate: bool = False) -> tuple[list[int], list[int]]:
        """One prompt's generated responses (text, model, generation parameters) and the tasks made of them
        (positions into `answers`, how) in ONE transaction, so an interrupted generation never leaves responses
        without their task. Every task is of `kind`; with `rate`, each answer also gets a rating task (how "each",
        after the others). Returns the response ids and the task ids."""
        if kind not in KINDS or overlap < 1:
            raise StoreError(f"kind must be one of {', '.join(KINDS)} and overlap at least 1")
        made = [(list(positions), how, kind) for positions, how in tasks]
        if rate:
            made += [([p], "each", "rate") for p in range(len(answers))]
        for positions, _, kind_ in made:
            inside = all(0 <= p < len(answers) for p in positions)
            if not task_size_ok(kind_, len(positions)) or not inside or len(set(positions)) != len(positions):
                raise StoreError(f"a {kind_} task needs distinct responses of this prompt, not {positions}")
        with self.session() as s:
            if s.get(Prompt, prompt_id) is None:
                raise StoreError(f"no prompt {prompt_id}")
            rows = [Response(prompt_id=prompt_id, text=text_, model=model, model_revision="", params=params or {})
                    for text_, model, params in answers]
            s.add_all(rows)
            s.flush()
            task_ids = []
            for positions, how, kind_ in made:
                task = Task(prompt_id=prompt_id, round=round, how=how, overlap=overlap, kind=kind_, repeat_of=None)
                s.add(task)
                s.flush()
                s.add_all(TaskItem(task_id=task.id, position=i, response_id=rows[p].id)
                          for i, p in enumerate(positions))
                task_ids.append(task.id)
            return [r.id for r in rows], task_ids

    def add_arena_task(self, messages: list[dict], answers: list[tuple[str, str, dict]], round: int = 0) -> int:
        """An arena task in one transaction: the prompt (source and split "arena"; an identical prompt is reused),
        one response per answer (text, model name, generation parameters) at positions 0 (A) and 1 (B), and the
        task (kind and how "arena", overlap 1). Returns the task id; on any failure nothing is stored."""
        if len(answers) != 2:
            raise StoreError(f"an arena task compares two answers, not {len(answers)}")
        messages = _as_messages(messages)
        # The prompt is typed by an annotator: bounded like their other free text.
        if sum(len(m["content"]) for m in messages) > PROMPT_MAX:
            raise StoreError(f"an arena prompt is at most {PROMPT_MAX} characters")
        with self.session() as s:
            prompt = _get_or_add_prompt(s, messages, "arena", "arena")
            rows = [Response(prompt_id=prompt.id, text=text_, model=model, model_revision="", params=params or {})
                    for text_, model, params in answers]
            s.add_all(rows)
            s.flush()
            task = Task(prompt_id=prompt.id, round=round, how="arena", overlap=1, kind="arena", repeat_of=None)
            s.add(task)
            s.flush()
            s.add_all(TaskItem(task_id=task.id, position=i, response_id=r.id) for i, r in enumerate(rows))
            return task.id

    def submit(self, annotator: str, task_id: int, choice: str, strength: int = 2, rationale: str = "",
               left: str = "A", guideline_version: str = "", seconds: float | None = None) -> int:
        """Store one vote; raises AlreadyVoted or TaskFull instead of ever breaking the guarantees. Returns its id.

        choice: A, B (the response at that position), tie or both_bad; strength 1 (slight) to 3 (strong);
        left: which response the annotator saw on the left; seconds: time spent on the task.
        """
        if choice not in CHOICES:
            raise StoreError(f"choice must be one of {', '.join(CHOICES)}, not {choice!r}")
        if isinstance(strength, bool) or strength not in (1, 2, 3):
            raise StoreError("strength must be 1 (slight), 2 (clear) or 3 (strong)")
        if left not in ("A", "B"):
            raise StoreError("left must be A or B")
        return self._add_vote(annotator, task_id, ("pair", "arena"), dict(
            choice=choice, strength=strength, rationale=rationale, left=left, guideline_version=guideline_version,
            seconds=seconds))

    def _add_vote(self, annotator: str, task_id: int, kinds: tuple[str, ...], fields: dict) -> int:
        """Store a vote on a task of one of `kinds` (a choice fits a pair, a ranking a rank task)."""
        check_ids(annotator, task_id)
        check_vote_text(fields["rationale"], fields["guideline_version"], fields["seconds"])
        try:
            # One transaction does it all (who, the claim, the vote): a vote costs one round of locking.
            with self.session() as s:
                who = s.execute(select(Annotator.id, Annotator.active, Vote.id.label("voted"))
                                .outerjoin(Vote, (Vote.annotator_id == Annotator.id) & (Vote.task_id == task_id))
                                .where(Annotator.name == annotator)).first()
                if who is None:
                    raise StoreError(f"no annotator named {annotator!r}")
                if not who.active:
                    raise StoreError(f"annotator {annotator!r} is deactivated")
                if who.voted is not None:
                    raise AlreadyVoted(f"{annotator} has already voted on task {task_id}")
                claimed = s.execute(update(Task).where(Task.id == task_id, Task.vote_count < Task.overlap,
                                                       Task.kind.in_(kinds))
                                    .values(vote_count=Task.vote_count + 1)).rowcount
                if claimed == 0:
                    task = s.get(Task, task_id)
                    if task is None:
                        raise StoreError(f"no task {task_id}")
                    if task.kind not in kinds:
                        raise StoreError(f"task {task_id} is a {task.kind} task: it takes {TAKES[task.kind]}")
                    raise TaskFull(f"task {task_id} has all the votes it needs")
                vote = Vote(task_id=task_id, annotator_id=who.id, **fields)
                s.add(vote)
                s.flush()
                return vote.id
        except IntegrityError:
            # The unique constraint caught a concurrent double submit by the same annotator; the claim rolled back.
            raise AlreadyVoted(f"{annotator} has already voted on task {task_id}") from None

    def submit_ranking(self, annotator: str, task_id: int, ranking: list[list[int]] | None, shown: list[int],
                       rationale: str = "", guideline_version: str = "", seconds: float | None = None) -> int:
        """Store one ranking of a K-response task: `ranking` lists groups of tied positions, best first (every
        position exactly once), or None for "all of them are bad"; `shown` is the order the positions were shown in.
        Same guarantees as `submit` (one vote per annotator, never more than `overlap`). Returns the vote id."""
        check_ids(annotator, task_id)
        with self.session(write=False) as s:
            task = s.get(Task, task_id)
            k = len(task.items) if task is not None else 0
        if task is None:
            raise StoreError(f"no task {task_id}")
        if task.kind != "rank":
            raise StoreError(f"task {task_id} is a {task.kind} task: it takes {TAKES[task.kind]}, not a ranking")
        if not valid_ranking([[p] for p in shown] if isinstance(shown, (list, tuple)) else None, k):
            raise StoreError(f"shown must list the positions 0-{k - 1} once each")
        if ranking is not None:
            if not valid_ranking(ranking, k):
                raise StoreError(f"a ranking must place each of the positions 0-{k - 1} exactly once")
            ranking = [sorted(int(p) for p in group) for group in ranking]
        return self._add_vote(annotator, task_id, ("rank",), dict(
            choice="ranked" if ranking is not None else "both_bad", strength=2, rationale=rationale, left="A",
            guideline_version=guideline_version, seconds=seconds, ranking=ranking, shown=[int(p) for p in shown]))

    def submit_rating(self, annotator: str, task_id: int, choice: str, likert: int | None = None,
                      rationale: str = "", guideline_version: str = "", seconds: float | None = None) -> int:
        """Store one rating of a rate task's response: choice "up" or "down", and an optional Likert score 1-5.
        Same guarantees as `submit`. Returns the vote id."""
        if choice not in RATE_CHOICES:
            raise StoreError(f"a rating is one of {', '.join(RATE_CHOICES)}, not {choice!r}")
        check_likert(likert)
        return self._add_vote(annotator, task_id, ("rate",), dict(
            choice=choice, likert=likert, strength=2, rationale=rationale, left="A",
            guideline_version=guideline_version, seconds=seconds))

    def save_edit(self, annotator: str, task_id: int, position: int, text: str) -> int:
        """Keep an annotator's rewrite of the response at `position` of a pair, ranking or rating task (the
        response itself stays as it was); a second edit of the same response by the same annotator replaces the
        first. Returns the edit's id."""
        check_ids(annotator, task_id)
        if isinstance(position, bool) or not isinstance(position, int):
            raise StoreError(f"no response at position {position!r}")
        with self.session() as s:
            who = s.scalar(select(Annotator).where(Annotator.name == annotator))
            if who is None or not who.active:
                raise StoreError(f"no active annotator named {annotator!r}")
            task = s.get(Task, task_id)
            if task is None or task.kind not in ("pair", "rank", "rate"):
                raise StoreError(f"no task {task_id} to edit" if task is None else
                                 f"task {task_id} is an {task.kind} task: its answers are evaluated, not edited")
            item = next((i for i in task.items if i.position == position), None)
            if item is None:
                raise StoreError(f"task {task_id} has no response at position {position}")
            text = check_edit_text(text, item.response.text)
            edit = s.scalar(select(Edit).where(Edit.response_id == item.response_id, Edit.annotator_id == who.id))
            if edit is None:
                edit = Edit(task_id=task_id, response_id=item.response_id, annotator_id=who.id, text=text)
                s.add(edit)
            else:
                edit.text, edit.task_id, edit.created_at = text, task_id, _now()
            s.flush()
            return edit.id

    def repeat_task(self, annotator: str, round: int | None = None) -> tuple[TaskView, str] | None:
        """A pair this annotator already judged, as a swapped repeat: the repeat task (how "repeat", repeat_of the
        original, overlap 1, the same positions) and the side ("A" or "B") to show on the left, which is the other
        one than last time. None when they have judged nothing that is not yet repeated for them."""
        with self.session() as s:
            who = s.scalar(select(Annotator.id).where(Annotator.name == annotator))
            if who is None:
                raise StoreError(f"no annotator named {annotator!r}")
            # Originals already repeated for them: a repeat they voted on or skipped.
            repeats = select(Task.repeat_of).where(Task.how == "repeat", or_(
                exists().where(Vote.task_id == Task.id, Vote.annotator_id == who),
                exists().where(Skip.task_id == Task.id, Skip.annotator_id == who)))
            query = (select(Task.id, Vote.left).join(Vote, Vote.task_id == Task.id)
                     .where(Vote.annotator_id == who, Task.kind == "pair", Task.how != "repeat",
                            Vote.choice.in_(("A", "B")), Task.id.not_in(repeats))
                     .order_by(func.random()).limit(1))
            if round is not None:
                query = query.where(Task.round == round)
            row = s.execute(query).first()
            if row is None:
                return None
            original = s.get(Task, row.id)
            # Reuse an open repeat of this task that this annotator has neither voted on nor skipped.
            task = s.scalar(select(Task).where(
                Task.repeat_of == original.id, Task.how == "repeat", Task.vote_count < Task.overlap,
                ~exists().where(Skip.task_id == Task.id, Skip.annotator_id == who)).limit(1))
            if task is None:
                task = Task(prompt_id=original.prompt_id, round=original.round, how="repeat", kind="pair", overlap=1,
                            repeat_of=original.id)
                s.add(task)
                s.flush()
                s.add_all(TaskItem(task_id=task.id, position=i.position, response_id=i.response_id)
                          for i in original.items)
                s.flush()
                s.refresh(task)
            return _view(s, task), "B" if row.left == "A" else "A"

    def set_model_verdict(self, vote_id: int, p_a: float, queue: bool) -> None:
        """Record the reward model's P(A beats B) for a vote; `queue` puts it on the admins' review queue."""
        if not 0.0 <= p_a <= 1.0:
            raise StoreError("p_a must be a probability")
        with self.session() as s:
            values: dict = {"model_p_a": float(p_a)}
            if queue:
                values["review"] = "queued"
            if s.execute(update(Vote).where(Vote.id == vote_id).values(**values)).rowcount != 1:
                raise StoreError(f"no vote {vote_id}")

    def review(self, vote_id: int, decision: str) -> None:
        """An admin's decision on a queued vote: "kept" (it stands) or "rejected" (left out of every export)."""
        if decision not in ("kept", "rejected"):
            raise StoreError("decision must be kept or rejected")
        with self.session() as s:
            if s.execute(update(Vote).where(Vote.id == vote_id, Vote.review.is_not(None))
                         .values(review=decision)).rowcount != 1:
                raise StoreError(f"vote {vote_id} is not on the review queue")

    def skip(self, annotator: str, task_id: int) -> None:
        """Never offer this task to this annotator again (skipping twice is harmless)."""
        check_ids(annotator, task_id)
        with self.session() as s:
            who = s.scalar(select(Annotator.id).where(Annotator.name == annotator))
            if who is None:
                raise StoreError(f"no annotator named {annotator!r}")
            if s.get(Task, task_id) is None:
                raise StoreError(f"no task {task_id}")
            if s.get(Skip, (task_id, who)) is None:
                s.add(Skip(task_id=task_id, annotator_id=who))
                with suppress(IntegrityError):  # a concurrent skip of the same task by the same annotator
                    s.flush()

    def undo_last(self, annotator: str, window_s: float = 300.0) -> int | None:
        """Delete this annotator's own most recent vote if it is younger than `window_s`; returns its task id."""
        with self.session() as s:
            who = s.scalar(select(Annotator.id).where(Annotator.name == annotator))
            if who is None:
                raise StoreError(f"no annotator named {annotator!r}")
            vote = s.execute(select(Vote.id, Vote.task_id, Vote.created_at).where(Vote.annotator_id == who)
                             .order_by(Vote.id.desc()).limit(1)).first()
            if vote is None or vote.created_at < _now() - timedelta(seconds=window_s):
                return None
            # Delete first and give the slot back only if this transaction did delete it: two undo clicks racing
            # (PostgreSQL runs them side by side) must not free the slot twice.
            if s.execute(delete(Vote).where(Vote.id == vote.id)).rowcount != 1:
                return None
            s.execute(update(Task).where(Task.id == vote.task_id).values(vote_count=Task.vote_count - 1))
            return vote.task_id

    def put_record(self, key: str, value: dict) -> None:
        """Keep a JSON document under `key` (at most 64 characters) in the meta table, replacing one there: what a
        loop run records about its rounds (rlhf.rounds). The schema's own key is not a record's."""
        if not key or len(key) > 64 or key == "schema_version":
            raise StoreError("a record's key has 1-64 characters and is not schema_version")
        text = json.dumps(value, ensure_ascii=False)
        with self.session() as s:
            row = s.get(Meta, key)
            if row is None:
                s.add(Meta(key=key, value=text))
            else:
                row.value = text
