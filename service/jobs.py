"""Creating, showing, cancelling and expiring jobs (shared by the REST API and STOW-RS).

A job's files live in ``<data_dir>/jobs/<id>/``: ``input/`` (the upload, moved there in one
``os.replace`` after validation) and ``output/`` (written by the worker to ``output.partial`` and
renamed). Ids are random 128-bit hex strings chosen by the server.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select

from service.auth import Principal
from service.config import Settings
from service.models import JobInput, JobOptions
from service.store import EXPIRED, FAILED, QUEUED, STATES, SUCCEEDED, Job, Store

log = logging.getLogger("medseg.service.jobs")


def new_job_id() -> str:
    return uuid.uuid4().hex


def create_job(
    store: Store,
    settings: Settings,
    *,
    job_id: str,
    owner: str,
    source: str,
    model: str,
    options: JobOptions,
    job_input: JobInput,
    input_dir: Path,
) -> Job:
    """Move ``input_dir`` to ``<job>/input`` and store the job as ``queued``; returns the row.

    ``options`` and ``job_input`` are stored in the row's JSON columns (:meth:`JobOptions.stored`:
    ``tta``, ``overlap`` and the ``formats`` of ``job_input`` when it resolved them;
    :meth:`JobInput.stored`); ``job_input.validate_s`` becomes the ``validate_s`` timing.

    On failure nothing is left behind and nothing is lost: no row is stored, ``input_dir`` is
    moved back where it was (a STOW series is then retried later) and the job folder is removed.
    """
    if job_input.formats is not None:
        options = options.model_copy(update={"formats": job_input.formats})
    job_dir = settings.jobs_dir / job_id
    job_dir.mkdir(parents=True)
    moved = False
    try:
        os.replace(input_dir, job_dir / "input")
        moved = True
        job = Job(
            id=job_id,
            owner=owner,
            source=source,
            model=model,
            options=options.stored(),
            input=job_input.stored(),
            state=QUEUED,
            created_at=time.time(),
            attempts=0,
            progress=0.0,
            results={},
            timings={"validate_s": job_input.validate_s},
        )
        store.add(job)
    except BaseException:
        if moved:
            os.replace(job_dir / "input", input_dir)
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    log.info(
        "job queued",
        extra={
            "job_id": job_id,
            "source": source,
            "model": model,
            "key_id": owner,
            "instances": job_input.instances,
        },
    )
    return job


def visible(job: Job | None, principal: Principal) -> bool:
    """Whether ``principal`` may see ``job`` (its own, or any for admin)."""
    return job is not None and (principal.is_admin or job.owner == principal.key_id)


def cancel_job(store: Store, settings: Settings, job: Job) -> None:
    """Cancel (if queued or running) and delete a job: its row and all its files.

    A running job's worker notices the missing row at its next progress check (or when it
    finishes) and stops and cleans up.
    """
    with store.session() as session:
        row = session.get(Job, job.id)
        if row is not None:
            session.delete(row)
    shutil.rmtree(settings.jobs_dir / job.id, ignore_errors=True)
    log.info("job deleted", extra={"job_id": job.id, "previous_state": job.state})


def expire_jobs(store: Store, settings: Settings, now: float | None = None) -> list[str]:
    """Delete the files of jobs finished more than ``retention_s`` ago; they become ``expired``."""
    cutoff = (now or time.time()) - settings.retention_s
    with store.session() as session:
        ids = list(session.scalars(select(Job.id).where(Job.state.in_((SUCCEEDED, FAILED)), Job.finished_at < cutoff)))
    for job_id in ids:
        shutil.rmtree(settings.jobs_dir / job_id, ignore_errors=True)
        store.update_job(job_id, where_state=(SUCCEEDED, FAILED), state=EXPIRED, results={})
        log.info("job expired", extra={"job_id": job_id})
    return ids


def list_jobs(store: Store, principal: Principal, state: str | None, limit: int, offset: int) -> tuple[list[Job], int]:
    """A page of the jobs ``principal`` may see, newest first, and the total count."""
    query = select(Job)
    count = select(func.count()).select_from(Job)
    if not principal.is_admin:
        query, count = query.where(Job.owner == principal.key_id), count.where(Job.owner == principal.key_id)
    if state:
        query, count = query.where(Job.state == state), count.where(Job.state == state)
    with store.session() as session:
        total = int(session.scalar(count))
        rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit)))
    return rows, total


# --- the API's view of a job --------------------------------------------------------------------
class JobView(BaseModel):
    """A job as the API shows it (times in ISO 8601 UTC, durations in s)."""

    id: str
    state: Literal[STATES]  # type: ignore[valid-type]
    source: Literal["upload", "stow", "batch"] = Field(description="batch: medseg predict --broker")
    model: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: float = Field(description="0..1")
    queue_position: int | None = Field(None, description="1 = next to run; null unless queued")
    attempts: int
    input: dict[str, Any] = Field(description="series_uid, modality, instances, shape, spacing (mm)")
    options: dict[str, Any]
    timings: dict[str, float] = Field(description="seconds: validate, queued, read, predict, write, total")
    statistics: Any | None = Field(None, description="the report's volumes (ml) per label")
    error: dict[str, Any] | None = Field(None, description="RFC 9457 problem of a failed job")
    results: dict[str, str] = Field(description="result name -> URL")
    push: dict[str, Any] | None = Field(None, description="PACS push of the SEG: state, detail")


class JobPage(BaseModel):
    items: list[JobView]
    total: int
    limit: int
    offset: int


def _time(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, timezone.utc) if value is not None else None


def job_view(job: Job, store: Store, base_url: str = "") -> JobView:
    """The API's view of a stored job: its row read through the job models (:class:`JobInput`,
    :class:`JobOptions`, :class:`JobResult`), results as download URLs, times as ISO 8601 UTC."""
    job_input, options, result = job.job_input(), job.job_options(), job.job_result()
    results = {name: f"{base_url}/v1/jobs/{job.id}/result/{name}" for name in result.results}
    return JobView(
        id=job.id,
        state=job.state,
        source=job.source,
        model=job.model,
        created_at=_time(job.created_at),
        started_at=_time(job.started_at),
        finished_at=_time(job.finished_at),
        progress=job.progress or 0.0,
        queue_position=store.queue_position(job),
        attempts=job.attempts or 0,
        input=job_input.shown(),
        options=options.stored() if job.options else {},
        timings={k: round(float(v), 4) for k, v in result.timings.items()},
        statistics=result.stored_statistics(),
        error=job.error,
        results=results,
        push=job.push,
    )


def result_path(settings: Settings, job: Job, name: str) -> Path | None:
    """The file of result ``name`` of ``job``, or None (not written, gone, or outside the job folder)."""
    relative = job.job_result().results.get(name)
    if not relative:
        return None
    path = (settings.jobs_dir / job.id / relative).resolve()
    return path if path.is_file() and (settings.jobs_dir / job.id).resolve() in path.parents else None


__all__ = [
    "create_job",
    "cancel_job",
    "expire_jobs",
    "list_jobs",
    "job_view",
    "JobView",
    "JobPage",
    "visible",
    "result_path",
    "new_job_id",
]
