"""The preference store: prompts, responses, labeling tasks, votes and annotators, on SQLAlchemy 2.

Every vote from the app, every generated candidate and every simulated label goes through `Store`; every
trainer reads its export (rlhf.data). SQLite by default (`$RLHF_HOME/rlhf.db`, WAL mode), PostgreSQL by URL
(`postgresql+psycopg2://user:pw@host/db`), the same code for both.

Guarantees that hold across threads and processes, enforced by the database rather than Python locks:
  - one vote per annotator per task (a unique constraint);
  - no task gets more than its `overlap` votes: a vote is stored only in the transaction whose conditional
    `UPDATE tasks SET vote_count = vote_count + 1 WHERE id = :id AND vote_count < overlap` matched a row, so two
    annotators racing for a task's last slot cannot both land (Argilla documents over-submission here); a CHECK
    constraint backs it up;
  - nothing half-written: every public method is one transaction (SQLite: BEGIN IMMEDIATE for writers).
`next_task` hands out tasks in an order randomised per annotator and never returns other annotators' labels.

Durability: by default a commit does not wait for the disk (SQLite `synchronous=NORMAL` in WAL mode, PostgreSQL
`synchronous_commit=off`): a crash of the machine may lose the last fraction of a second of votes, never
corrupt the store or break a guarantee. `Store(url, durable=True)` waits for the disk on every commit; on this
machine that turns a 2 ms PostgreSQL vote into 8 ms.

A task holds K >= 2 responses at positions 0 (A), 1 (B), ...: a pair (kind "pair" or "arena") gets a choice, K >= 3
responses (kind "rank") get a ranking (`submit_ranking`), kept as given (groups of tied positions, best first).
Swapped repeats (how "repeat", `repeat_task`) show an annotator a pair they judged again, sides swapped, for the
position-bias audit; they are kept out of progress counts and of the training export. Schema changes are numbered (SCHEMA_VERSION); an older store is upgraded when opened, a
newer one is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, String,
                        Text, UniqueConstraint, cast, create_engine, delete, event, exists, func, inspect, or_, select,
                        text, update)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from rlhf.config import UserError, rlhf_home

SCHEMA_VERSION = 3


def _migrate_2_to_3(conn, postgres: bool) -> None:
    """Version 3: votes gain ranking, shown, model_p_a and review, and the choice check allows "ranked"."""
    if postgres:
        for statement in ["ALTER TABLE votes ADD COLUMN ranking JSON", "ALTER TABLE votes ADD COLUMN shown JSON",
                          "ALTER TABLE votes ADD COLUMN model_p_a FLOAT", "ALTER TABLE votes ADD COLUMN review VARCHAR(16)",
                          "ALTER TABLE votes DROP CONSTRAINT ck_vote_choice",
                          "ALTER TABLE votes ADD CONSTRAINT ck_vote_choice "
                          "CHECK (choice in ('A', 'B', 'tie', 'both_bad', 'ranked'))",
                          "ALTER TABLE votes ADD CONSTRAINT ck_vote_review "
                          "CHECK (review is null or review in ('queued', 'kept', 'rejected'))"]:
            conn.execute(text(statement))
        return
    # SQLite cannot change a CHECK constraint in place: rebuild the table (its documented recipe), copying every
    # row with its id. Nothing references votes, so the rename and drop touch no other table.
    old = ["id", "task_id", "annotator_id", "choice", "strength", "rationale", '"left"', "guideline_version", "seconds",
           "created_at", "margin"]
    conn.execute(text("ALTER TABLE votes RENAME TO votes_v2"))
    for index in ("ix_votes_task_id", "ix_votes_annotator_id"):
        conn.execute(text(f"DROP INDEX IF EXISTS {index}"))
    Vote.__table__.create(conn)
    conn.execute(text(f"INSERT INTO votes ({', '.join(old)}) SELECT {', '.join(old)} FROM votes_v2"))
    conn.execute(text("DROP TABLE votes_v2"))

# What takes a store from version k to k + 1 (run in one transaction when an older store is opened): statements, or
# a function of (connection, is_postgres) where the dialects differ.
MIGRATIONS = {1: ["ALTER TABLE votes ADD COLUMN margin FLOAT",
                  "CREATE INDEX ix_tasks_open ON tasks (kind, round) WHERE vote_count < overlap",
                  "CREATE INDEX ix_task_items_response_id ON task_items (response_id)"],
              2: _migrate_2_to_3}
CHOICES = ("A", "B", "tie", "both_bad")
RANK_CHOICES = ("ranked", "both_bad")  # a ranking task: an order, or "all of them are bad"
REVIEWS = ("queued", "kept", "rejected")  # a vote the reward model strongly disagreed with, and an admin's decision
LABELED = ("pair", "rank")  # task kinds that become training data (arena votes are evaluation)
NAME_MAX = 128
SOURCE_MAX = 256


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


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


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
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    credential_hash: Mapped[str] = mapped_column(String(256), default="")  # "" = cannot sign in
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    __table_args__ = (CheckConstraint("role in ('annotator', 'admin')", name="ck_annotator_role"),)


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    messages: Mapped[list] = mapped_column(JSON)  # chat messages ending with the user turn
    source: Mapped[str] = mapped_column(String(SOURCE_MAX), default="")
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
    __table_args__ = (
        CheckConstraint("vote_count >= 0 AND vote_count <= overlap", name="ck_task_overlap"),
        # next_task scans only tasks with a free slot: a partial index keeps finished tasks out of that scan.
        Index("ix_tasks_open", "kind", "round", sqlite_where=text("vote_count < overlap"),
              postgresql_where=text("vote_count < overlap")),
    )


class TaskItem(Base):
    __tablename__ = "task_items"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), index=True)
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
    # An explicit margin (imported preference data that came with one); None: export maps `strength` to a margin.
    margin: Mapped[float | None] = mapped_column(Float, nullable=True)
    # A ranking (choice "ranked"): groups of tied positions, best first, e.g. [[2], [0, 3], [1]]; and the order the
    # positions were shown in (top first), for the position-bias audit of rankings.
    ranking: Mapped[list | None] = mapped_column(JSON, nullable=True)
    shown: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # The reward model's probability that A beats B, computed after the vote (the app shows it only then), and the
    # review state of a vote it strongly disagreed with (None: not queued). Rejected votes are left out of exports.
    model_p_a: Mapped[float | None] = mapped_column(Float, nullable=True)
    review: Mapped[str | None] = mapped_column(String(16), nullable=True)
    __table_args__ = (
        UniqueConstraint("task_id", "annotator_id", name="uq_one_vote_per_annotator"),
        CheckConstraint("choice in ('A', 'B', 'tie', 'both_bad', 'ranked')", name="ck_vote_choice"),
        CheckConstraint("review is null or review in ('queued', 'kept', 'rejected')", name="ck_vote_review"),
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
        got = hashlib.scrypt(credential.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except ValueError:  # "" (no credential set) or a malformed hash: nobody signs in with it
        return False
    return hmac.compare_digest(got.hex(), digest)


def _short(e: Exception) -> str:
    return str(getattr(e, "orig", None) or e).strip().splitlines()[0]


class Store:
    """The preference store over one database URL. Thread-safe: each call opens its own session (transaction).

    Processes share a store through the database: open one `Store` per process (or per app worker).
    """

    def __init__(self, url: str | None = None, create: bool = True, durable: bool = False):
        self.url = url or default_url()
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise StoreError(f"cannot open database {self.url!r}: not a database URL "
                             "(e.g. sqlite:///path/rlhf.db or postgresql+psycopg2://user:pw@host/db)") from None
        self.sqlite = parsed.get_backend_name() == "sqlite"
        self.postgres = parsed.get_backend_name() == "postgresql"
        kwargs: dict = {}
        if self.sqlite:
            if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
                try:
                    Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StoreError(f"cannot open database {self.url!r}: {e}") from None
            kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        else:
            kwargs.update(pool_size=20, max_overflow=40, pool_pre_ping=True)
            if not durable and self.postgres and parsed.get_driver_name() in ("psycopg2", "psycopg"):
                # Commit without waiting for the WAL flush (see the module docstring): the same bargain as SQLite's
                # WAL + synchronous=NORMAL, about 4x faster votes here. Set per connection; the server is untouched.
                kwargs["connect_args"] = {"options": "-c synchronous_commit=off"}
        try:
            self.engine = create_engine(self.url, **kwargs)
        except (NoSuchModuleError, ImportError, ArgumentError, ValueError) as e:
            hint = " (pip install 'rlhf[postgres]')" if self.postgres else ""
            raise StoreError(f"cannot open database {self.url!r}: {_short(e)}{hint}") from None
        if self.sqlite:
            event.listen(self.engine, "connect",
                         lambda conn, _record: _sqlite_pragmas(conn, "FULL" if durable else "NORMAL"))
            # pysqlite's own transaction handling defers BEGIN; take it over so writes start with BEGIN IMMEDIATE
            # and waiting writers queue on busy_timeout instead of failing with "database is locked".
            event.listen(self.engine, "begin", _sqlite_begin)
        # Writers take SQLite's write lock when their transaction starts, readers don't (see _sqlite_begin).
        self._writer = self.engine.execution_options(rlhf_write=True)
        try:
            self._open_schema(create)
        except DBAPIError as e:
            self.engine.dispose()
            raise StoreError(f"cannot open database {self.url!r}: {_short(e)}") from None
        except StoreError:
            self.engine.dispose()
            raise

    def close(self) -> None:
        """Close the connection pool (a Store used again afterwards reconnects)."""
        self.engine.dispose()

    def _open_schema(self, create: bool) -> None:
        with self.engine.connect() as conn:
            version = self._schema_version(conn)
            conn.rollback()
        if version == SCHEMA_VERSION:
            return
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(f"{self.url} has store schema version {version}, newer than this rlhf's "
                             f"{SCHEMA_VERSION}: upgrade rlhf to use it")
        if version is None and not create:
            raise StoreError(f"{self.url} holds no rlhf store")
        # Create or upgrade under the write lock, re-checking inside it: several processes may open a new store at
        # once (SQLite: BEGIN IMMEDIATE serialises them; PostgreSQL: a transaction-scoped advisory lock).
        with self._writer.begin() as conn:
            if self.postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(7351902)"))
            version = self._schema_version(conn)
            if version is None:
                Base.metadata.create_all(conn)
                conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            if version not in MIGRATIONS and version != SCHEMA_VERSION:
                raise StoreError(f"{self.url} has store schema version {version}; this rlhf needs {SCHEMA_VERSION} "
                                 "and cannot upgrade it")
            while version < SCHEMA_VERSION:
                step = MIGRATIONS[version]
                if callable(step):
                    step(conn, self.postgres)
                else:
                    for statement in step:
                        conn.execute(text(statement))
                version += 1
            conn.execute(update(Meta.__table__).where(Meta.key == "schema_version").values(value=str(version)))

    def _schema_version(self, conn) -> int | None:
        if not inspect(conn).has_table("meta"):
            return None
        value = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
        if value is None:
            raise StoreError(f"{self.url}: a 'meta' table without a schema version; not an rlhf store")
        return int(value)

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
        if not name or len(name) > NAME_MAX:
            raise StoreError(f"an annotator needs a name of 1 to {NAME_MAX} characters")
        if role not in ("annotator", "admin"):
            raise StoreError(f"role must be annotator or admin, not {role!r}")
        credential = secrets.token_urlsafe(12)
        try:
            with self.session() as s:
                s.add(Annotator(name=name, role=role, simulated=simulated, credential_hash=_hash_credential(credential)))
        except IntegrityError:
            raise StoreError(f"an annotator named {name!r} exists already") from None
        return credential

    def reset_credential(self, name: str) -> str:
        """A new credential for an existing annotator (a lost one, or an account brought in by an import)."""
        credential = secrets.token_urlsafe(12)
        with self.session() as s:
            changed = s.execute(update(Annotator).where(Annotator.name == name)
                                .values(credential_hash=_hash_credential(credential))).rowcount
        if not changed:
            raise StoreError(f"no annotator named {name!r}")
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
        """The active, non-simulated annotator with this name and credential, else None (constant-time compare)."""
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

    def add_prompts(self, prompts: list, source: str = "", split: str | list[str] = "train") -> list[int]:
        """Add prompts (text or chat messages) in one transaction; an identical prompt is reused. Returns ids.

        `split` is one split for all, or one per prompt.
        """
        splits = [split] * len(prompts) if isinstance(split, str) else list(split)
        if len(splits) != len(prompts):
            raise StoreError("give one split, or one per prompt")
        ids = []
        with self.session() as s:
            for prompt, split_ in zip(prompts, splits):
                ids.append(_get_or_add_prompt(s, _as_messages(prompt), source, split_).id)
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
            if repeat_of is not None and s.get(Task, repeat_of) is None:
                raise StoreError(f"no task {repeat_of} to repeat")
            task = Task(prompt_id=responses[0].prompt_id, round=round, how=how, overlap=overlap, kind=kind,
                        repeat_of=repeat_of)
            s.add(task)
            s.flush()
            s.add_all(TaskItem(task_id=task.id, position=i, response_id=r) for i, r in enumerate(response_ids))
            return task.id

    def add_arena_task(self, messages: list[dict], answers: list[tuple[str, str, dict]], round: int = 0) -> int:
        """An arena task in one transaction: the prompt (source and split "arena"; an identical prompt is reused),
        one response per answer (text, model name, generation parameters) at positions 0 (A) and 1 (B), and the
        task (kind and how "arena", overlap 1). Returns the task id; on any failure nothing is stored."""
        if len(answers) != 2:
            raise StoreError(f"an arena task compares two answers, not {len(answers)}")
        with self.session() as s:
            prompt = _get_or_add_prompt(s, _as_messages(messages), "arena", "arena")
            rows = [Response(prompt_id=prompt.id, text=text_, model=model, model_revision="", params=params or {})
                    for text_, model, params in answers]
            s.add_all(rows)
            s.flush()
            task = Task(prompt_id=prompt.id, round=round, how="arena", overlap=1, kind="arena", repeat_of=None)
            s.add(task)
            s.flush()
            s.add_all(TaskItem(task_id=task.id, position=i, response_id=r.id) for i, r in enumerate(rows))
            return task.id

    def task(self, task_id: int) -> TaskView:
        with self.session(write=False) as s:
            task = s.get(Task, task_id)
            if task is None:
                raise StoreError(f"no task {task_id}")
            return _view(s, task)

    # ---------------------------------------------------------------- assignment and votes

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

    def submit(self, annotator: str, task_id: int, choice: str, strength: int = 2, rationale: str = "",
               left: str = "A", guideline_version: str = "", seconds: float | None = None) -> int:
        """Store one vote; raises AlreadyVoted or TaskFull instead of ever breaking the guarantees. Returns its id.

        choice: A, B (the response at that position), tie or both_bad; strength 1 (slight) to 3 (strong);
        left: which response the annotator saw on the left; seconds: time spent on the task.
        """
        if choice not in CHOICES:
            raise StoreError(f"choice must be one of {', '.join(CHOICES)}, not {choice!r}")
        if strength not in (1, 2, 3):
            raise StoreError("strength must be 1 (slight), 2 (clear) or 3 (strong)")
        if left not in ("A", "B"):
            raise StoreError("left must be A or B")
        return self._add_vote(annotator, task_id, dict(choice=choice, strength=strength, rationale=rationale, left=left,
                                                       guideline_version=guideline_version, seconds=seconds))

    def _add_vote(self, annotator: str, task_id: int, fields: dict) -> int:
        if fields["seconds"] is not None and not fields["seconds"] >= 0:
            raise StoreError("seconds must be >= 0")
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
                claimed = s.execute(update(Task).where(Task.id == task_id, Task.vote_count < Task.overlap)
                                    .values(vote_count=Task.vote_count + 1)).rowcount
                if claimed == 0:
                    if s.get(Task, task_id) is None:
                        raise StoreError(f"no task {task_id}")
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
        with self.session(write=False) as s:
            task = s.get(Task, task_id)
            k = len(task.items) if task is not None else 0
        if task is None:
            raise StoreError(f"no task {task_id}")
        if sorted(shown or []) != list(range(k)):
            raise StoreError(f"shown must list the positions 0-{k - 1} once each")
        if ranking is not None:
            flat = [p for group in ranking for p in group]
            if sorted(flat) != list(range(k)) or any(not group for group in ranking):
                raise StoreError(f"a ranking must place each of the positions 0-{k - 1} exactly once")
            ranking = [sorted(int(p) for p in group) for group in ranking]
        return self._add_vote(annotator, task_id, dict(
            choice="ranked" if ranking is not None else "both_bad", strength=2, rationale=rationale, left="A",
            guideline_version=guideline_version, seconds=seconds, ranking=ranking, shown=[int(p) for p in shown]))

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
        with self.session() as s:
            who = s.scalar(select(Annotator.id).where(Annotator.name == annotator))
            if who is None:
                raise StoreError(f"no annotator named {annotator!r}")
            if s.get(Task, task_id) is None:
                raise StoreError(f"no task {task_id}")
            if s.get(Skip, (task_id, who)) is None:
                s.add(Skip(task_id=task_id, annotator_id=who))
                try:
                    s.flush()
                except IntegrityError:  # a concurrent skip of the same task by the same annotator
                    pass

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

    # ---------------------------------------------------------------- reading back

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
                             "review": vote.review,
                             "response_ids": [i.response_id for i in task.items],
                             "responses": [i.response.text for i in task.items]})
            return rows

    def tasks(self, round: int | None = None, kind: str | tuple[str, ...] | None = "pair") -> list[dict]:
        """Every task with its prompt, responses (id, text, model, parameters), votes and skips, in id order.

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
            # Three bulk reads rather than three per task: exporting 10,000 tasks stays a matter of seconds.
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
                })
            return out

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


def _response_row(r: Response) -> dict:
    return {"id": r.id, "text": r.text, "model": r.model, "model_revision": r.model_revision, "params": r.params,
            "created_at": _iso(r.created_at)}


def _vote_row(v: Vote, a: Annotator) -> dict:
    return {"annotator": a.name, "role": a.role, "simulated": a.simulated, "choice": v.choice, "strength": v.strength,
            "margin": v.margin, "rationale": v.rationale, "left": v.left, "guideline_version": v.guideline_version,
            "seconds": v.seconds, "created_at": _iso(v.created_at), "ranking": v.ranking, "shown": v.shown,
            "model_p_a": v.model_p_a, "review": v.review}


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
    return messages


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


def _view(s: Session, task: Task) -> TaskView:
    prompt = s.get(Prompt, task.prompt_id)
    return TaskView(id=task.id, round=task.round, how=task.how, prompt=prompt.messages,
                    responses=[i.response.text for i in task.items], response_ids=[i.response_id for i in task.items],
                    models=[i.response.model for i in task.items])


def _sqlite_begin(conn) -> None:
    # BEGIN IMMEDIATE takes the write lock up front, so a writer queues on busy_timeout rather than failing
    # with "database is locked" when it upgrades a read lock; plain BEGIN lets readers run beside writers (WAL).
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("rlhf_write") else "BEGIN")


def _sqlite_pragmas(dbapi_conn, synchronous: str) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of pysqlite's implicit deferred BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.close()


# ---------------------------------------------------------------- bulk import (one transaction)


def _when(value) -> datetime:
    return datetime.fromisoformat(value) if value else _now()


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
