"""The preference store: prompts, responses, labeling tasks, votes and annotators, on SQLAlchemy 2.

Every vote from the app, every generated candidate and every simulated label goes through `Store`; every
trainer reads its export (rlhf.data). SQLite by default (`$RLHF_HOME/rlhf.db`, WAL mode), PostgreSQL by URL.

Guarantees that hold across threads and processes, enforced by the database rather than Python locks:
  - one vote per annotator per task (a unique constraint);
  - no task gets more than its `overlap` votes: a vote is stored only in the transaction whose conditional
    `UPDATE tasks SET vote_count = vote_count + 1 WHERE id = :id AND vote_count < overlap` matched a row, so two
    annotators racing for a task's last slot cannot both land (Argilla documents over-submission here);
  - nothing half-written: every public method is one transaction.
`next_task` hands out tasks in an order randomised per annotator and never returns other annotators' labels.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, cast, create_engine, event, func, select, update)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from rlhf.config import UserError, rlhf_home

SCHEMA_VERSION = 1
CHOICES = ("A", "B", "tie", "both_bad")


class StoreError(UserError):
    """A store operation that cannot be done as asked (the message says why)."""


class AlreadyVoted(StoreError):
    pass


class TaskFull(StoreError):
    pass


def default_url() -> str:
    return f"sqlite:///{rlhf_home() / 'rlhf.db'}"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def prompt_key(messages: list[dict]) -> str:
    """A stable identity for a prompt: the hash of its messages."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Annotator(Base):
    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    credential_hash: Mapped[str] = mapped_column(String(256), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    __table_args__ = (CheckConstraint("role in ('annotator', 'admin')", name="ck_annotator_role"),)


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    messages: Mapped[list] = mapped_column(JSON)  # chat messages ending with the user turn
    source: Mapped[str] = mapped_column(String(256), default="")
    split: Mapped[str] = mapped_column(String(32), default="train")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)


class Response(Base):
    __tablename__ = "responses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(512), default="")
    model_revision: Mapped[str] = mapped_column(String(128), default="")
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # generation parameters
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)


class Task(Base):
    """Responses to one prompt to compare: a pair (positions 0 = A, 1 = B); the schema allows K of them."""

    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    round: Mapped[int] = mapped_column(Integer, default=0, index=True)
    kind: Mapped[str] = mapped_column(String(16), default="pair")  # pair | arena
    how: Mapped[str] = mapped_column(String(32), default="random")  # random | across | active | import | repeat
    repeat_of: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), nullable=True)
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    vote_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    items: Mapped[list[TaskItem]] = relationship(order_by="TaskItem.position", lazy="selectin")
    __table_args__ = (CheckConstraint("vote_count >= 0 AND vote_count <= overlap", name="ck_task_overlap"),)


class TaskItem(Base):
    __tablename__ = "task_items"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    response: Mapped[Response] = relationship(lazy="joined")


class Vote(Base):
    __tablename__ = "votes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    choice: Mapped[str] = mapped_column(String(16))
    strength: Mapped[int] = mapped_column(Integer, default=2)
    rationale: Mapped[str] = mapped_column(Text, default="")
    left: Mapped[str] = mapped_column(String(1), default="A")  # which response was shown on the left
    guideline_version: Mapped[str] = mapped_column(String(64), default="")
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    __table_args__ = (
        UniqueConstraint("task_id", "annotator_id", name="uq_one_vote_per_annotator"),
        CheckConstraint("choice in ('A', 'B', 'tie', 'both_bad')", name="ck_vote_choice"),
        CheckConstraint("strength between 1 and 3", name="ck_vote_strength"),
        CheckConstraint("\"left\" in ('A', 'B')", name="ck_vote_left"),
    )


class Skip(Base):
    __tablename__ = "skips"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)


# ---------------------------------------------------------------- plain views handed to callers


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


def _hash_credential(credential: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(credential.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt$16384$8$1${salt.hex()}${digest.hex()}"


def _check_credential(credential: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    got = hashlib.scrypt(credential.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    return hmac.compare_digest(got.hex(), digest)


class Store:
    """The preference store over one database URL. Thread-safe: each call opens its own session."""

    def __init__(self, url: str | None = None, create: bool = True):
        self.url = url or default_url()
        kwargs: dict = {"future": True}
        if self.url.startswith("sqlite"):
            path = self.url.split("///", 1)[-1]
            if path and path != ":memory:":
                from pathlib import Path

                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        else:
            kwargs.update(pool_size=20, max_overflow=40, pool_pre_ping=True)
        try:
            self.engine = create_engine(self.url, **kwargs)
        except Exception as e:  # bad URL, missing driver: the user needs one line
            raise StoreError(f"cannot open database {self.url!r}: {str(e).splitlines()[0]}") from None
        self._writer = self.engine
        if self.url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # pysqlite's own transaction handling defers BEGIN; take it over so writes start with BEGIN IMMEDIATE
            # and waiting writers queue on busy_timeout instead of failing with "database is locked".
            event.listen(self.engine, "begin", _sqlite_begin)
        # Writers take SQLite's write lock when their transaction starts, readers don't (see _sqlite_begin).
        self._writer = self.engine.execution_options(rlhf_write=True)
        try:
            self._check_schema(create)
        except OperationalError as e:
            raise StoreError(f"cannot open database {self.url!r}: {str(e.orig).splitlines()[0]}") from None

    def _check_schema(self, create: bool) -> None:
        with self.engine.connect() as conn:
            has_meta = self.engine.dialect.has_table(conn, "meta")
        if not has_meta:
            if not create:
                raise StoreError(f"{self.url} holds no rlhf store")
            Base.metadata.create_all(self.engine)
            with self.session() as s:
                if s.get(Meta, "schema_version") is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        with self.session() as s:
            row = s.get(Meta, "schema_version")
            found = int(row.value) if row else None
        if found != SCHEMA_VERSION:
            raise StoreError(f"{self.url} has store schema version {found}, this rlhf needs {SCHEMA_VERSION}")

    @contextmanager
    def session(self, write: bool = True):
        """One transaction; `write=False` for reads, which then never wait for SQLite's write lock."""
        with Session(self._writer if write else self.engine, expire_on_commit=False) as s:
            with s.begin():
                yield s

    # ---------------------------------------------------------------- annotators

    def add_annotator(self, name: str, role: str = "annotator", simulated: bool = False) -> str:
        """Create an annotator; returns the credential (shown once: only its scrypt hash is stored)."""
        name = name.strip()
        if not name:
            raise StoreError("an annotator needs a name")
        if role not in ("annotator", "admin"):
            raise StoreError(f"role must be annotator or admin, not {role!r}")
        credential = secrets.token_urlsafe(12)
        try:
            with self.session() as s:
                s.add(Annotator(name=name, role=role, simulated=simulated, credential_hash=_hash_credential(credential)))
        except IntegrityError:
            raise StoreError(f"an annotator named {name!r} exists already") from None
        return credential

    def annotator(self, name: str, create_simulated: bool = False) -> Annotator:
        with self.session(write=False) as s:
            row = s.scalar(select(Annotator).where(Annotator.name == name))
        if row is None and create_simulated:
            try:
                self.add_annotator(name, simulated=True)
            except StoreError:
                pass  # created meanwhile by a concurrent caller
            return self.annotator(name)
        if row is None:
            raise StoreError(f"no annotator named {name!r}")
        return row

    def authenticate(self, name: str, credential: str) -> Annotator | None:
        with self.session(write=False) as s:
            row = s.scalar(select(Annotator).where(Annotator.name == name))
        if row is None or not row.active or row.simulated or not _check_credential(credential, row.credential_hash):
            return None
        return row

    def list_annotators(self) -> list[Annotator]:
        with self.session(write=False) as s:
            return list(s.scalars(select(Annotator).order_by(Annotator.name)))

    def set_active(self, name: str, active: bool) -> None:
        with self.session() as s:
            if s.execute(update(Annotator).where(Annotator.name == name).values(active=active)).rowcount == 0:
                raise StoreError(f"no annotator named {name!r}")

    # ---------------------------------------------------------------- prompts, responses, tasks

    def add_prompts(self, prompts: list, source: str = "", split: str = "train") -> list[int]:
        """Add prompts (text or chat messages); an existing identical prompt is reused. Returns their ids."""
        ids = []
        with self.session() as s:
            for prompt in prompts:
                messages = _as_messages(prompt)
                key = prompt_key(messages)
                row = s.scalar(select(Prompt).where(Prompt.key == key))
                if row is None:
                    row = Prompt(key=key, messages=messages, source=source, split=split)
                    s.add(row)
                    s.flush()
                ids.append(row.id)
        return ids

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
        """A task comparing responses to one prompt (position 0 is A, 1 is B)."""
        if len(response_ids) < 2 or len(set(response_ids)) != len(response_ids):
            raise StoreError("a task needs two or more distinct responses")
        if overlap < 1:
            raise StoreError("overlap must be at least 1")
        with self.session() as s:
            responses = [s.get(Response, r) for r in response_ids]
            if any(r is None for r in responses):
                raise StoreError(f"unknown response id in {response_ids}")
            if len({r.prompt_id for r in responses}) != 1:
                raise StoreError("the responses of a task must answer the same prompt")
            task = Task(prompt_id=responses[0].prompt_id, round=round, how=how, overlap=overlap, kind=kind,
                        repeat_of=repeat_of)
            s.add(task)
            s.flush()
            s.add_all(TaskItem(task_id=task.id, position=i, response_id=r) for i, r in enumerate(response_ids))
            return task.id

    def task(self, task_id: int) -> TaskView:
        with self.session(write=False) as s:
            task = s.get(Task, task_id)
            if task is None:
                raise StoreError(f"no task {task_id}")
            return _view(s, task)

    # ---------------------------------------------------------------- assignment and votes

    def next_task(self, annotator: str, round: int | None = None, kind: str = "pair") -> TaskView | None:
        """A task this annotator has neither voted on nor skipped, with a free slot, in a per-annotator order."""
        who = self.annotator(annotator)
        with self.session(write=False) as s:
            voted = select(Vote.task_id).where(Vote.annotator_id == who.id)
            skipped = select(Skip.task_id).where(Skip.annotator_id == who.id)
            # A fixed pseudo-random order per annotator: two multiplicative-hash rounds mod the prime 2^31 - 1
            # with a per-annotator offset between them (64-bit arithmetic on both SQLite and PostgreSQL).
            p = 2147483647
            seed = (who.id * 2654435761) % p
            order = (((cast(Task.id, BigInteger) * 1103515245 + seed) % p) * 48271) % p
            query = (select(Task).where(Task.vote_count < Task.overlap, Task.kind == kind, Task.id.not_in(voted),
                                        Task.id.not_in(skipped)).order_by(order).limit(1))
            if round is not None:
                query = query.where(Task.round == round)
            task = s.scalar(query)
            return _view(s, task) if task else None

    def submit(self, annotator: str, task_id: int, choice: str, strength: int = 2, rationale: str = "",
               left: str = "A", guideline_version: str = "", seconds: float | None = None) -> int:
        """Store one vote; raises AlreadyVoted or TaskFull instead of ever exceeding the guarantees."""
        if choice not in CHOICES:
            raise StoreError(f"choice must be one of {', '.join(CHOICES)}, not {choice!r}")
        if strength not in (1, 2, 3):
            raise StoreError("strength must be 1 (slight), 2 (clear) or 3 (strong)")
        if left not in ("A", "B"):
            raise StoreError("left must be A or B")
        try:
            # One transaction does it all (who, the claim, the vote): a vote costs one round of locking.
            with self.session() as s:
                who = s.execute(select(Annotator.id, Annotator.active).where(Annotator.name == annotator)).first()
                if who is None:
                    raise StoreError(f"no annotator named {annotator!r}")
                if not who.active:
                    raise StoreError(f"annotator {annotator!r} is deactivated")
                if s.scalar(select(Vote.id).where(Vote.task_id == task_id, Vote.annotator_id == who.id)):
                    raise AlreadyVoted(f"{annotator} has already voted on task {task_id}")
                claimed = s.execute(update(Task).where(Task.id == task_id, Task.vote_count < Task.overlap)
                                    .values(vote_count=Task.vote_count + 1)).rowcount
                if claimed == 0:
                    if s.get(Task, task_id) is None:
                        raise StoreError(f"no task {task_id}")
                    raise TaskFull(f"task {task_id} has all the votes it needs")
                vote = Vote(task_id=task_id, annotator_id=who.id, choice=choice, strength=strength,
                            rationale=rationale, left=left, guideline_version=guideline_version, seconds=seconds)
                s.add(vote)
                s.flush()
                return vote.id
        except IntegrityError:
            # The unique constraint caught a concurrent double submit by the same annotator; the claim rolled back.
            raise AlreadyVoted(f"{annotator} has already voted on task {task_id}") from None

    def skip(self, annotator: str, task_id: int) -> None:
        who = self.annotator(annotator)
        try:
            with self.session() as s:
                s.add(Skip(task_id=task_id, annotator_id=who.id))
        except IntegrityError:
            pass  # skipped twice, or an unknown task: nothing to record

    def undo_last(self, annotator: str, window_s: float = 300.0) -> int | None:
        """Delete this annotator's own most recent vote if it is younger than `window_s`; returns its task id."""
        who = self.annotator(annotator)
        with self.session() as s:
            vote = s.scalar(select(Vote).where(Vote.annotator_id == who.id).order_by(Vote.id.desc()).limit(1))
            if vote is None or vote.created_at < _now() - timedelta(seconds=window_s):
                return None
            s.execute(update(Task).where(Task.id == vote.task_id).values(vote_count=Task.vote_count - 1))
            s.delete(vote)
            return vote.task_id

    # ---------------------------------------------------------------- reading back

    def prompts_with_tasks(self, round: int) -> set[int]:
        with self.session(write=False) as s:
            return set(s.scalars(select(Task.prompt_id).where(Task.round == round).distinct()))

    def progress(self, annotator: str | None = None, round: int | None = None) -> dict:
        """Counts for a progress bar: tasks, slots filled, and (for an annotator) their own votes and what is open."""
        with self.session(write=False) as s:
            tasks = select(Task).where(Task.kind == "pair")
            if round is not None:
                tasks = tasks.where(Task.round == round)
            sub = tasks.subquery()
            total, slots, filled = s.execute(select(func.count(), func.coalesce(func.sum(sub.c.overlap), 0),
                                                    func.coalesce(func.sum(sub.c.vote_count), 0))).one()
            result = {"tasks": total, "slots": int(slots), "votes": int(filled),
                      "complete_tasks": s.scalar(select(func.count()).select_from(sub)
                                                 .where(sub.c.vote_count >= sub.c.overlap))}
            if annotator is not None:
                who = s.scalar(select(Annotator).where(Annotator.name == annotator))
                if who is None:
                    raise StoreError(f"no annotator named {annotator!r}")
                mine = select(func.count()).select_from(Vote).join(Task, Task.id == Vote.task_id).where(
                    Vote.annotator_id == who.id, Task.kind == "pair")
                if round is not None:
                    mine = mine.where(Task.round == round)
                result["done"] = s.scalar(mine)
            return result

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
                             "choice": vote.choice, "strength": vote.strength, "left": vote.left,
                             "rationale": vote.rationale, "guideline_version": vote.guideline_version,
                             "seconds": vote.seconds, "created_at": vote.created_at.isoformat(),
                             "response_ids": [i.response_id for i in task.items],
                             "responses": [i.response.text for i in task.items]})
            return rows

    def tasks(self, round: int | None = None, kind: str = "pair") -> list[dict]:
        """Every task with its prompt, responses (text, model, parameters) and votes: the lossless dump."""
        with self.session(write=False) as s:
            query = select(Task).where(Task.kind == kind).order_by(Task.id)
            if round is not None:
                query = query.where(Task.round == round)
            out = []
            for task in s.scalars(query):
                prompt = s.get(Prompt, task.prompt_id)
                votes = s.execute(select(Vote, Annotator).join(Annotator, Annotator.id == Vote.annotator_id)
                                  .where(Vote.task_id == task.id).order_by(Vote.id)).all()
                out.append({
                    "task_id": task.id, "round": task.round, "how": task.how, "kind": task.kind,
                    "overlap": task.overlap, "repeat_of": task.repeat_of,
                    "prompt": prompt.messages, "prompt_source": prompt.source, "prompt_split": prompt.split,
                    "responses": [{"text": i.response.text, "model": i.response.model,
                                   "model_revision": i.response.model_revision, "params": i.response.params}
                                  for i in task.items],
                    "votes": [{"annotator": a.name, "role": a.role, "simulated": a.simulated, "choice": v.choice,
                               "strength": v.strength, "rationale": v.rationale, "left": v.left,
                               "guideline_version": v.guideline_version, "seconds": v.seconds,
                               "created_at": v.created_at.isoformat()} for v, a in votes],
                })
            return out


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise StoreError("empty prompt text")
        return [{"role": "user", "content": prompt}]
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if not messages or not all(isinstance(m["content"], str) and m["content"].strip() for m in messages):
        raise StoreError("a prompt needs at least one message, each with non-empty text")
    return messages


def _view(s: Session, task: Task) -> TaskView:
    prompt = s.get(Prompt, task.prompt_id)
    return TaskView(id=task.id, round=task.round, how=task.how, prompt=prompt.messages,
                    responses=[i.response.text for i in task.items], response_ids=[i.response_id for i in task.items],
                    models=[i.response.model for i in task.items])


def _sqlite_begin(conn) -> None:
    # BEGIN IMMEDIATE takes the write lock up front, so a writer queues on busy_timeout rather than failing
    # with "database is locked" when it upgrades a read lock; plain BEGIN lets readers run beside writers (WAL).
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("rlhf_write") else "BEGIN")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of pysqlite's implicit deferred BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def import_tasks(store: Store, rows: list[dict], source: str = "") -> dict:
    """Write tasks in the lossless dump format (`Store.tasks()` rows) in ONE transaction: all or nothing.

    Each row: prompt (messages), responses [{text, model, ...}], optional votes [{annotator, choice, ...}],
    round, how, overlap. Missing annotators are created inactive and without a usable credential.
    """
    counts: Counter = Counter()
    try:
        return _import_tasks(store, rows, source, counts)
    except IntegrityError as e:
        raise StoreError(f"import rolled back: {str(e.orig).splitlines()[0]}") from None


def _import_tasks(store: Store, rows: list[dict], source: str, counts: Counter) -> dict:
    with store.session() as s:
        annotators = {a.name: a for a in s.scalars(select(Annotator))}
        for row in rows:
            messages = _as_messages(row["prompt"])
            key = prompt_key(messages)
            prompt = s.scalar(select(Prompt).where(Prompt.key == key))
            if prompt is None:
                prompt = Prompt(key=key, messages=messages, source=row.get("prompt_source", source),
                                split=row.get("prompt_split", "train"))
                s.add(prompt)
                s.flush()
                counts["prompts"] += 1
            responses = [Response(prompt_id=prompt.id, text=r["text"], model=r.get("model", ""),
                                  model_revision=r.get("model_revision", ""), params=r.get("params") or {})
                         for r in row["responses"]]
            if len(responses) < 2 or any(not r.text.strip() for r in responses):
                raise StoreError("a task needs two or more responses with non-empty text")
            s.add_all(responses)
            votes = row.get("votes", [])
            overlap = max(int(row.get("overlap", 1)), len(votes), 1)
            task = Task(prompt_id=prompt.id, round=int(row.get("round", 0)), how=row.get("how", "import"),
                        kind=row.get("kind", "pair"), overlap=overlap, vote_count=len(votes))
            s.add(task)
            s.flush()
            s.add_all(TaskItem(task_id=task.id, position=i, response_id=r.id) for i, r in enumerate(responses))
            for v in votes:
                who = annotators.get(v["annotator"])
                if who is None:
                    who = Annotator(name=v["annotator"], role=v.get("role", "annotator"), active=False,
                                    simulated=bool(v.get("simulated", False)))
                    s.add(who)
                    s.flush()
                    annotators[who.name] = who
                    counts["annotators"] += 1
                if v["choice"] not in CHOICES or int(v.get("strength", 2)) not in (1, 2, 3):
                    raise StoreError(f"bad vote {v}: choice must be one of {CHOICES}, strength 1-3")
                created = v.get("created_at")
                s.add(Vote(task_id=task.id, annotator_id=who.id, choice=v["choice"], strength=int(v.get("strength", 2)),
                           rationale=v.get("rationale", ""), left=v.get("left", "A"),
                           guideline_version=v.get("guideline_version", ""), seconds=v.get("seconds"),
                           created_at=datetime.fromisoformat(created) if created else _now()))
                counts["votes"] += 1
            counts["tasks"] += 1
        s.flush()
    return dict(counts)
