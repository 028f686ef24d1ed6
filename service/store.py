"""The job store: jobs, API keys and STOW-RS series in one SQLAlchemy database.

SQLite in write-ahead-log mode is the embedded default (one file in the data directory, safe for
the worker threads of one process); any SQLAlchemy URL (e.g. ``postgresql+psycopg://...``) works
for several machines sharing one store. Times are POSIX seconds (UTC). The schema is kept by
Alembic migrations (``service/migrations``), applied by :func:`migrate` whenever a store opens.

Job states: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` -> ``expired`` (retention
period passed, files deleted). A job interrupted by a crash goes back to ``queued``. ``DELETE``
removes a job (row and files) in any state; its worker, if any, notices and stops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, create_engine, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from service.models import JobInput, JobOptions, JobResult

QUEUED, RUNNING, SUCCEEDED, FAILED, EXPIRED = "queued", "running", "succeeded", "failed", "expired"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, EXPIRED)


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One segmentation request: its input, options, state, timings and results."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(32), index=True)
    source: Mapped[str] = mapped_column(String(16))  # upload | stow | batch
    model: Mapped[str] = mapped_column(String(200))
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # JobOptions.stored(): tta, overlap, formats
    input: Mapped[dict] = mapped_column(JSON, default=dict)  # JobInput.stored(): kind, path, series_uid...
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    node: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    results: Mapped[dict] = mapped_column(JSON, default=dict)  # result name -> path relative to job dir
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    statistics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    push: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # PACS push: state, detail
    # scale-out: when the job id was last handed to the broker (migration 0002)
    published_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    # the JSON columns read through the job models (service.models): rows of any version
    def job_input(self) -> JobInput:
        """``input`` as a :class:`~service.models.JobInput` (raises ``pydantic.ValidationError``
        for a row no version wrote)."""
        return JobInput.from_row(self.input)

    def job_options(self) -> JobOptions:
        """``options`` as a :class:`~service.models.JobOptions` (``model`` and ``series_uid`` unset)."""
        return JobOptions.from_row(self.options)

    def job_result(self) -> JobResult:
        """``results``, ``timings`` (all of them, seconds) and ``statistics`` as a
        :class:`~service.models.JobResult`; its warnings are in :meth:`job_input`."""
        return JobResult.model_validate(
            {"results": self.results or {}, "timings": self.timings or {}, "statistics": self.statistics}
        )


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; ``id`` is the public part of the key."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class StowSeries(Base):
    """A series being received over STOW-RS; it becomes a job once quiet for a while."""

    __tablename__ = "stow_series"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(owner, series uid)
    owner: Mapped[str] = mapped_column(String(32))
    series_uid: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    instances: Mapped[int] = mapped_column(Integer, default=0)
    first_at: Mapped[float] = mapped_column(Float)
    last_at: Mapped[float] = mapped_column(Float, index=True)
    state: Mapped[str] = mapped_column(String(16), default="collecting")  # collecting | submitted
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


LOCK_TIMEOUT_S = 5.0  # SQLite busy timeout (s)


class Store:
    """Sessions on the job store, and the few multi-row operations the service needs."""

    def __init__(self, url: str):
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # a locked store answers 503 after this wait, never a request hanging for long
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": LOCK_TIMEOUT_S}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on exit, rolled back on error."""
        with self._sessions.begin() as session:
            yield session

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def check_writable(self) -> None:
        """Raise (``sqlalchemy.exc.OperationalError``) if a write transaction cannot start now,
        e.g. another process holds SQLite's write lock for longer than the busy timeout."""
        if not self.url.startswith("sqlite"):
            self.ping()
            return
        raw = self.engine.raw_connection()
        try:
            cursor = raw.driver_connection.cursor()
            cursor.execute("PRAGMA busy_timeout = 1000")
            try:
                cursor.execute("BEGIN IMMEDIATE")
                cursor.execute("ROLLBACK")
            except Exception as error:
                from sqlalchemy.exc import OperationalError

                raise OperationalError("BEGIN IMMEDIATE", None, error) from None
            finally:
                cursor.execute(f"PRAGMA busy_timeout = {int(LOCK_TIMEOUT_S * 1000)}")
        finally:
            raw.close()

    def dispose(self) -> None:
        self.engine.dispose()

    # --- jobs -------------------------------------------------------------------------------
    def get_job(self, job_id: str) -> Job | None:
        with self.session() as session:
            return session.get(Job, job_id)

    def add(self, row: Base) -> None:
        with self.session() as session:
            session.add(row)

    def update_job(
        self,
        job_id: str,
        *,
        where_state: str | tuple[str, ...] | None = None,
        where_node: str | None = None,
        **values: Any,
    ) -> bool:
        """Set ``values`` on a job (only if it is in ``where_state``, and held by ``where_node``
        when given: a run superseded by another node's changes nothing); True if a row changed."""
        statement = update(Job).where(Job.id == job_id)
        if where_node is not None:
            statement = statement.where(Job.node == where_node)
        if where_state is not None:
            states = (where_state,) if isinstance(where_state, str) else where_state
            statement = statement.where(Job.state.in_(states))
        with self.session() as session:
            return session.execute(statement.values(**values)).rowcount == 1

    def claim_next(self, node: str) -> Job | None:
        """Atomically move the oldest queued job to ``running`` for ``node``; None if none."""
        now = time.time()
        for _ in range(5):  # another worker may win the race for the same row: try the next
            with self.session() as session:
                query = select(Job.id).where(Job.state == QUEUED).order_by(Job.created_at).limit(1)
                if self.engine.dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True)
                job_id = session.scalar(query)
                if job_id is None:
                    return None
                changed = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == QUEUED)
                    .values(
                        state=RUNNING,
                        started_at=now,
                        heartbeat_at=now,
                        node=node,
                        progress=0.0,
                        attempts=Job.attempts + 1,
                    )
                ).rowcount
                if changed == 1:
                    session.flush()
                    return session.get(Job, job_id, populate_existing=True)
        return None

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to run; None unless queued."""
        if job.state != QUEUED:
            return None
        with self.session() as session:
            ahead = session.scalar(
                select(func.count()).select_from(Job).where(Job.state == QUEUED, Job.created_at < job.created_at)
            )
        return int(ahead) + 1

    def count_by_state(self) -> dict[str, int]:
        with self.session() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state: int(n) for state, n in rows}

    def claim(self, job_id: str, node: str, lease_s: float) -> Job | None:
        """Move one job to ``running`` for ``node`` if it is ``queued``, or ``running`` with a
        heartbeat older than ``lease_s`` (its worker died); None otherwise (already taken,
        finished, deleted). One conditional ``UPDATE``: of several deliveries of the same job
        (a broker's at-least-once), exactly one wins."""
        now = time.time()
        claimable = (Job.state == QUEUED) | ((Job.state == RUNNING) & (Job.heartbeat_at < now - lease_s))
        with self.session() as session:
            changed = session.execute(
                update(Job)
                .where(Job.id == job_id, claimable)
                .values(
                    state=RUNNING, started_at=now, heartbeat_at=now, node=node, progress=0.0, attempts=Job.attempts + 1
                )
            ).rowcount
            if changed != 1:
                return None
            session.flush()
            return session.get(Job, job_id, populate_existing=True)

    def claim_republish(self, older_than_s: float, limit: int = 100) -> list[str]:
        """Queued jobs not handed to the broker for ``older_than_s`` seconds (never, or a message
        lost: a replica died between storing and publishing, the broker lost its data); each is
        marked published now by one conditional ``UPDATE``, so of several processes sweeping at
        once exactly one re-publishes it. Oldest first, at most ``limit``."""
        now = time.time()
        cutoff = now - older_than_s
        due = (
            (Job.state == QUEUED)
            & (Job.created_at < cutoff)
            & (Job.published_at.is_(None) | (Job.published_at < cutoff))
        )
        with self.session() as session:
            ids = list(session.scalars(select(Job.id).where(due).order_by(Job.created_at).limit(limit)))
        won = []
        for job_id in ids:
            with self.session() as session:
                if session.execute(update(Job).where(Job.id == job_id, due).values(published_at=now)).rowcount == 1:
                    won.append(job_id)
        return won

    def heartbeat(self, job_ids: list[str], node: str) -> int:
        """Refresh the lease of ``node``'s running jobs among ``job_ids``; how many it still holds
        (a job re-queued and claimed by another node is no longer refreshed by this one)."""
        if not job_ids:
            return 0
        with self.session() as session:
            return session.execute(
                update(Job)
                .where(Job.id.in_(job_ids), Job.state == RUNNING, Job.node == node)
                .values(heartbeat_at=time.time())
            ).rowcount

    def requeue_interrupted(self, lease_s: float, node: str | None = None) -> list[str]:
        """Running jobs with a heartbeat older than ``lease_s``, or of ``node`` (this process at
        start-up: they were interrupted by its previous life), go back to ``queued``.

        Each row moves with its own conditional ``UPDATE`` (still running, still stale or still
        ``node``'s), so with several processes doing this at once each job is re-queued, and
        returned (to be re-submitted), by exactly one of them."""
        stale = time.time() - lease_s
        condition = Job.heartbeat_at < stale
        if node is not None:
            condition = condition | (Job.node == node)
        with self.session() as session:
            ids = list(session.scalars(select(Job.id).where(Job.state == RUNNING, condition)))
        moved = []
        for job_id in ids:
            with self.session() as session:
                if (
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.state == RUNNING, condition)
                        .values(state=QUEUED, node=None, progress=0.0, started_at=None)
                    ).rowcount
                    == 1
                ):
                    moved.append(job_id)
        return moved


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
INITIAL_REVISION = "0001"  # the tables create_all made before migrations existed
_PG_MIGRATION_LOCK = 0x6D656473  # pg_advisory_lock key: one process migrates at a time


def alembic_config(connection=None):
    """Programmatic Alembic configuration for ``service/migrations`` (no ini file needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, attempts: int = 5) -> None:
    """Bring the store to the newest Alembic revision (``upgrade head``), on any dialect.

    A store made by ``create_all`` before migrations existed (tables, no ``alembic_version``) is
    stamped with the initial revision first. On PostgreSQL an advisory lock lets one of several
    starting processes migrate while the others wait; on SQLite a process that loses the race
    (``table already exists``) finds the store migrated and goes on.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect

    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    for attempt in range(attempts):
        try:
            with engine.connect() as connection:
                if set(MigrationContext.configure(connection).get_current_heads()) == heads:
                    return  # the common case: nothing to do
            with engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
                tables = set(inspect(connection).get_table_names())
                config = alembic_config(connection)
                if "jobs" in tables and "alembic_version" not in tables:
                    command.stamp(config, INITIAL_REVISION)
                command.upgrade(config, "head")
            return
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))  # another process was migrating: look again


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
