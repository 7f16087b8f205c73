"""The store's tables and vocabulary, its numbered schema migrations, and opening a database (engine and schema).

Schema changes are numbered (SCHEMA_VERSION): an older store is upgraded in place when opened (MIGRATIONS), a
newer one is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from rlhf.config import UserError, rlhf_home

CHOICES = ("A", "B", "tie", "both_bad")
RANK_CHOICES = ("ranked", "both_bad")  # a ranking task: an order, or "all of them are bad"
RATE_CHOICES = ("up", "down")  # a rating task: thumbs up or down on one response (and an optional Likert score)
LIKERT = (1, 5)  # the Likert score's range (1 worst, 5 best)
REVIEWS = ("queued", "kept", "rejected")  # a vote the reward model strongly disagreed with, and an admin's decision
LABELED = ("pair", "rank", "rate")  # task kinds that become training data (arena votes are evaluation)
# A pair and an arena task get a choice (CHOICES), a rank task a ranking, a rate task (one response) a thumb.
KINDS = ("pair", "arena", "rank", "rate")
NAME_MAX = 128
SOURCE_MAX = 256
# Free text the store takes from annotators (a rationale, a typed arena prompt) is bounded here, so the app, the
# CLI and imports all refuse the same oversized input instead of storing megabytes from one text box.
RATIONALE_MAX = 4000
GUIDELINE_MAX = 64
PROMPT_MAX = 20000
EDIT_MAX = 20000  # an annotator's rewrite of a response


class StoreError(UserError):
    """A store operation that cannot be done as asked (the message says why)."""


class AlreadyVoted(StoreError):
    pass


class TaskFull(StoreError):
    pass


def masked_url(url: str) -> str:
    """A database URL fit to print: its password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL at all: it can still hold a password after "user:", so show only the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else url


def _short(e: Exception, url: str = "") -> str:
    """A database error's first line, for a StoreError message (the URL's password, if any, masked)."""
    line = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
    password = _password(url)
    return line.replace(password, "***") if password else line


def _password(url: str) -> str:
    try:
        return make_url(url).password or ""
    except ArgumentError:
        return ""


def default_url() -> str:
    return f"sqlite:///{rlhf_home() / 'rlhf.db'}"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def prompt_key(messages: list[dict]) -> str:
    """A stable identity for a prompt: the hash of its messages."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- tables


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
    """Responses to one prompt: a pair to compare (positions 0 = A, 1 = B), K of them to rank, or one to rate."""

    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    round: Mapped[int] = mapped_column(Integer, default=0, index=True)
    kind: Mapped[str] = mapped_column(String(16), default="pair")  # KINDS
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


VOTE_CHOICE_CHECK = "choice in ('A', 'B', 'tie', 'both_bad', 'ranked', 'up', 'down')"
LIKERT_CHECK = "likert is null or likert between 1 and 5"


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
    # A rating (choice "up" or "down") may carry a Likert score, 1 (worst) to 5 (best).
    likert: Mapped[int | None] = mapped_column(Integer, nullable=True)
    __table_args__ = (
        UniqueConstraint("task_id", "annotator_id", name="uq_one_vote_per_annotator"),
        CheckConstraint(VOTE_CHOICE_CHECK, name="ck_vote_choice"),
        CheckConstraint("review is null or review in ('queued', 'kept', 'rejected')", name="ck_vote_review"),
        CheckConstraint("strength between 1 and 3", name="ck_vote_strength"),
        CheckConstraint("\"left\" in ('A', 'B')", name="ck_vote_left"),
        CheckConstraint(LIKERT_CHECK, name="ck_vote_likert"),
    )


class Edit(Base):
    """An annotator's rewrite of one response of a task ("Improve this answer"): the source response stays as it
    was; the export turns the edit into an SFT demonstration and into pairs edited > original. One per annotator and
    response: saving again replaces the text."""

    __tablename__ = "edits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    __table_args__ = (UniqueConstraint("response_id", "annotator_id", name="uq_one_edit_per_annotator"),)


class Skip(Base):
    __tablename__ = "skips"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)


# ---------------------------------------------------------------- schema versions


SCHEMA_VERSION = 4


def _migrate_2_to_3(conn, postgres: bool) -> None:
    """Version 3: votes gain ranking, shown, model_p_a and review, and the choice check allows "ranked"."""
    if postgres:
        for statement in ["ALTER TABLE votes ADD COLUMN ranking JSON", "ALTER TABLE votes ADD COLUMN shown JSON",
                          "ALTER TABLE votes ADD COLUMN model_p_a FLOAT",
                          "ALTER TABLE votes ADD COLUMN review VARCHAR(16)",
                          "ALTER TABLE votes DROP CONSTRAINT ck_vote_choice",
                          "ALTER TABLE votes ADD CONSTRAINT ck_vote_choice "
                          "CHECK (choice in ('A', 'B', 'tie', 'both_bad', 'ranked'))",
                          "ALTER TABLE votes ADD CONSTRAINT ck_vote_review "
                          "CHECK (review is null or review in ('queued', 'kept', 'rejected'))"]:
            conn.execute(text(statement))
        return
    _rebuild_votes(conn, ["id", "task_id", "annotator_id", "choice", "strength", "rationale", '"left"',
                          "guideline_version", "seconds", "created_at", "margin"])


def _migrate_3_to_4(conn, postgres: bool) -> None:
    """Version 4: rating tasks (votes gain likert, the choice check allows "up" and "down") and the edits table."""
    if postgres:
        for statement in ["ALTER TABLE votes ADD COLUMN likert INTEGER",
                          "ALTER TABLE votes DROP CONSTRAINT ck_vote_choice",
                          f"ALTER TABLE votes ADD CONSTRAINT ck_vote_choice CHECK ({VOTE_CHOICE_CHECK})",
                          f"ALTER TABLE votes ADD CONSTRAINT ck_vote_likert CHECK ({LIKERT_CHECK})"]:
            conn.execute(text(statement))
    else:
        _rebuild_votes(conn, ["id", "task_id", "annotator_id", "choice", "strength", "rationale", '"left"',
                              "guideline_version", "seconds", "created_at", "margin", "ranking", "shown", "model_p_a",
                              "review"])
    Edit.__table__.create(conn)


def _rebuild_votes(conn, columns: list[str]) -> None:
    """SQLite cannot change a CHECK constraint in place: rebuild the votes table (its documented recipe), copying
    `columns` of every row with its id. Nothing references votes, so the rename and drop touch no other table."""
    conn.execute(text("ALTER TABLE votes RENAME TO votes_old"))
    for index in ("ix_votes_task_id", "ix_votes_annotator_id"):
        conn.execute(text(f"DROP INDEX IF EXISTS {index}"))
    Vote.__table__.create(conn)
    conn.execute(text(f"INSERT INTO votes ({', '.join(columns)}) SELECT {', '.join(columns)} FROM votes_old"))
    conn.execute(text("DROP TABLE votes_old"))


# What takes a store from version k to k + 1 (run in one transaction when an older store is opened): statements, or
# a function of (connection, is_postgres) where the dialects differ.
MIGRATIONS = {1: ["ALTER TABLE votes ADD COLUMN margin FLOAT",
                  "CREATE INDEX ix_tasks_open ON tasks (kind, round) WHERE vote_count < overlap",
                  "CREATE INDEX ix_task_items_response_id ON task_items (response_id)"],
              2: _migrate_2_to_3, 3: _migrate_3_to_4}


# ---------------------------------------------------------------- opening a database


def open_engine(url: str, durable: bool, create: bool = True) -> tuple[Engine, bool, bool]:
    """The engine for a database URL, and whether it is SQLite and whether PostgreSQL (the only dialect checks).
    Without `create`, a SQLite file that is not there is refused, not made (empty) as connecting would."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"cannot open database {masked_url(url)!r}: not a database URL "
                         "(e.g. sqlite:///path/rlhf.db or postgresql+psycopg2://user:pw@host/db)") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    postgres = parsed.get_backend_name() == "postgresql"
    kwargs: dict = {}
    if sqlite:
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            if not create and not Path(parsed.database).expanduser().is_file():
                raise StoreError(f"{masked_url(url)} holds no rlhf store (no such file)")
            try:
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot open database {masked_url(url)!r}: {e}") from None
        kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
    else:
        kwargs.update(pool_size=20, max_overflow=40, pool_pre_ping=True)
        if not durable and postgres and parsed.get_driver_name() in ("psycopg2", "psycopg"):
            # Commit without waiting for the WAL flush (see rlhf.store's docstring): the same bargain as SQLite's
            # WAL + synchronous=NORMAL. Set per connection; the server is untouched.
            kwargs["connect_args"] = {"options": "-c synchronous_commit=off"}
    try:
        engine = create_engine(url, **kwargs)
    except (NoSuchModuleError, ImportError, ArgumentError, ValueError) as e:
        hint = " (pip install 'rlhf[postgres]')" if postgres else ""
        raise StoreError(f"cannot open database {masked_url(url)!r}: {_short(e, url)}{hint}") from None
    if sqlite:
        event.listen(engine, "connect", lambda conn, _record: _sqlite_pragmas(conn, "FULL" if durable else "NORMAL"))
        # pysqlite's own transaction handling defers BEGIN; take it over so writes start with BEGIN IMMEDIATE
        # and waiting writers queue on busy_timeout instead of failing with "database is locked".
        event.listen(engine, "begin", _sqlite_begin)
    return engine, sqlite, postgres


def ensure_schema(engine: Engine, writer: Engine, url: str, postgres: bool, create: bool) -> None:
    """Check the store's schema version: create the tables in an empty database (if `create`), upgrade an older
    store, refuse a newer one. `writer` is the engine whose transactions take SQLite's write lock."""
    with engine.connect() as conn:
        version = _schema_version(conn, url)
        conn.rollback()
    if version == SCHEMA_VERSION:
        return
    if version is not None and version > SCHEMA_VERSION:
        raise StoreError(f"{masked_url(url)} has store schema version {version}, newer than this rlhf's "
                         f"{SCHEMA_VERSION}: upgrade rlhf to use it")
    if version is None and not create:
        raise StoreError(f"{masked_url(url)} holds no rlhf store")
    # Create or upgrade under the write lock, re-checking inside it: several processes may open a new store at
    # once (SQLite: BEGIN IMMEDIATE serialises them; PostgreSQL: a transaction-scoped advisory lock).
    with writer.begin() as conn:
        if postgres:
            conn.execute(text("SELECT pg_advisory_xact_lock(7351902)"))
        version = _schema_version(conn, url)
        if version is None:
            Base.metadata.create_all(conn)
            conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        if version not in MIGRATIONS and version != SCHEMA_VERSION:
            raise StoreError(f"{masked_url(url)} has store schema version {version}; this rlhf needs {SCHEMA_VERSION} "
                             "and cannot upgrade it")
        while version < SCHEMA_VERSION:
            step = MIGRATIONS[version]
            if callable(step):
                step(conn, postgres)
            else:
                for statement in step:
                    conn.execute(text(statement))
            version += 1
        conn.execute(update(Meta.__table__).where(Meta.key == "schema_version").values(value=str(version)))


def _schema_version(conn, url: str) -> int | None:
    if not inspect(conn).has_table("meta"):
        return None
    value = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
    if value is None:
        raise StoreError(f"{masked_url(url)}: a 'meta' table without a schema version; not an rlhf store")
    return int(value)

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

