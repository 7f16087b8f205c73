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
corrupt the store or break a guarantee. `Store(url, durable=True)` waits for the disk on every commit.

A task holds responses at positions 0 (A), 1 (B), ...: a pair (kind "pair" or "arena") gets a choice, K >= 3
responses (kind "rank") get a ranking (`submit_ranking`), kept as given (groups of tied positions, best first), and
a rate task's one response gets a thumb up or down with an optional 1-5 Likert score (`submit_rating`).
An annotator's rewrite of a response (`save_edit`) is kept beside it, never in its place. A prompt is a list of chat
messages: one user turn, or a whole conversation ending with the user's turn. Swapped repeats (how "repeat",
`repeat_task`) show an annotator a pair they judged again, sides swapped, for the position-bias audit; they are kept
out of progress counts and of the training export.

`Store` is the engine and sessions (here) with its methods grouped by concern: schema.py (tables, schema versions
and migrations, opening a database), accounts.py (annotators), writes.py, queries.py, transfer.py (dump, import).
"""

from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from rlhf.store.accounts import Accounts
from rlhf.store.queries import Queries, TaskView
from rlhf.store.schema import (
    CHOICES,
    EDIT_MAX,
    GUIDELINE_MAX,
    KINDS,
    LABELED,
    LIKERT,
    MIGRATIONS,
    NAME_MAX,
    PROMPT_MAX,
    RANK_CHOICES,
    RATE_CHOICES,
    RATIONALE_MAX,
    REVIEWS,
    SCHEMA_VERSION,
    SOURCE_MAX,
    AlreadyVoted,
    Annotator,
    Base,
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
    _short,
    default_url,
    ensure_schema,
    masked_url,
    open_engine,
    prompt_key,
)
from rlhf.store.transfer import Transfer, import_tasks
from rlhf.store.writes import Writes

__all__ = ["CHOICES", "EDIT_MAX", "GUIDELINE_MAX", "KINDS", "LABELED", "LIKERT", "MIGRATIONS", "NAME_MAX", "PROMPT_MAX",
           "RANK_CHOICES", "RATE_CHOICES", "RATIONALE_MAX", "REVIEWS", "SCHEMA_VERSION", "SOURCE_MAX", "AlreadyVoted",
           "Annotator", "Base", "Edit", "Meta",
           "Prompt", "Response", "Skip", "Store", "StoreError", "Task", "TaskFull", "TaskItem", "TaskView", "Vote",
           "default_url", "import_tasks", "masked_url", "prompt_key"]


class Store(Accounts, Writes, Queries, Transfer):
    """The preference store over one database URL. Thread-safe: each call opens its own session (transaction).

    Processes share a store through the database: open one `Store` per process (or per app worker).
    """

    def __init__(self, url: str | None = None, create: bool = True, durable: bool = False):
        self.url = url or default_url()
        self.engine, self.sqlite, self.postgres = open_engine(self.url, durable, create)
        # Writers take SQLite's write lock when their transaction starts, readers don't (see schema._sqlite_begin).
        self._writer = self.engine.execution_options(rlhf_write=True)
        try:
            ensure_schema(self.engine, self._writer, self.url, self.postgres, create)
        except DBAPIError as e:
            self.engine.dispose()
            raise StoreError(f"cannot open database {masked_url(self.url)!r}: {_short(e, self.url)}") from None
        except StoreError:
            self.engine.dispose()
            raise

    def close(self) -> None:
        """Close the connection pool (a Store used again afterwards reconnects)."""
        self.engine.dispose()

    @contextmanager
    def session(self, write: bool = True):
        """One transaction; `write=False` for reads, which then never wait for SQLite's write lock."""
        with Session(self._writer if write else self.engine, expire_on_commit=False) as s, s.begin():
            yield s
