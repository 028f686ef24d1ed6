"""The worker pool: threads in the service process that take jobs from the queue and run them.

Each worker keeps its own :class:`PredictorCache` (a model is loaded once per worker). A job's
progress callback also checks, at most every ``CHECK_S`` seconds, whether the job was cancelled
(``DELETE``) or the service is stopping; a stopping service puts its running jobs back in the
queue. A crash (SIGKILL, power loss) leaves jobs ``running``: the next start of the same node, or
any node once the heartbeat is older than the lease, re-queues them.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import Any

from medseg.errors import MedsegError
from service import pacs
from service.config import Settings
from service.metrics import Metrics
from service.pipeline import PredictorCache, run_job
from service.problems import problem_body, problem_of
from service.queue import JobQueue
from service.store import FAILED, QUEUED, RUNNING, SUCCEEDED, Job, Store

log = logging.getLogger("medseg.service.worker")
CHECK_S = 0.5


class JobCancelled(Exception):
    """The job was cancelled or deleted while it ran."""


class WorkerStopping(Exception):
    """The service is shutting down; the job goes back to the queue."""


class WorkerPool:
    """``settings.workers`` threads running jobs from ``queue``."""

    def __init__(self, settings: Settings, store: Store, queue: JobQueue, metrics: Metrics):
        self.settings, self.store, self.queue, self.metrics = settings, store, queue, metrics
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: dict[str, int] = {}  # job id -> worker index
        self._lock = threading.Lock()

    def start(self) -> None:
        for index in range(self.settings.workers):
            thread = threading.Thread(target=self._loop, args=(index,), name=f"medseg-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask workers to stop; running jobs are re-queued at their next progress check."""
        self._stop.set()
        self.queue.wake_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> int:
        return sum(thread.is_alive() for thread in self._threads)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def _loop(self, index: int) -> None:
        predictors = PredictorCache(self.settings.device, max_windows=self.settings.max_windows)
        while not self._stop.is_set():
            try:
                job = self.queue.claim(self.settings.node_id, timeout=1.0)
            except Exception:  # database briefly unavailable: retry
                log.exception("could not claim a job")
                self._stop.wait(2.0)
                continue
            if job is None:
                continue
            with self._lock:
                self._running[job.id] = index
            try:
                self._run(job, predictors)
            finally:
                with self._lock:
                    self._running.pop(job.id, None)

    def run_claimed(self, job: Job, predictors: PredictorCache) -> None:
        """Run one job already claimed (``running`` for this node), outside the pool's threads:
        what a ``medseg worker`` Celery task does. ``running_ids`` lists it meanwhile, so the
        heartbeat thread keeps its lease; same outcomes as a pool thread (succeeded, failed with
        its problem, ``interrupted`` once ``max_attempts`` is exceeded, removed if deleted)."""
        with self._lock:
            self._running[job.id] = -1
        try:
            self._run(job, predictors)
        finally:
            with self._lock:
                self._running.pop(job.id, None)

    def _run(self, job: Job, predictors: PredictorCache) -> None:
        settings, store = self.settings, self.store
        job_dir = settings.jobs_dir / job.id
        queued_s = (job.started_at or time.time()) - job.created_at
        if job.attempts > settings.max_attempts:
            self._finish(
                job,
                FAILED,
                error=problem_body(500, "interrupted", f"job interrupted {job.attempts - 1} times; not retried"),
            )
            return
        log.info(
            "job started",
            extra={"job_id": job.id, "attempt": job.attempts, "model": job.model, "queued_s": round(queued_s, 3)},
        )
        last_check = [0.0]

        def checkpoint(fraction: float | None = None) -> None:
            """Heartbeat; raises if the service is stopping or the job's row is gone."""
            last_check[0] = time.monotonic()
            if self._stop.is_set():
                raise WorkerStopping()
            values = {"heartbeat_at": time.time()}
            if fraction is not None:
                values["progress"] = fraction
            if not store.update_job(job.id, where_state=RUNNING, where_node=job.node, **values):
                raise JobCancelled()

        def progress(*args: Any, **kwargs: Any) -> None:
            if time.monotonic() - last_check[0] >= CHECK_S:
                checkpoint(_fraction(args, kwargs))

        try:
            job_input = job.job_input()
            outcome = run_job(
                job_dir,
                job_input,
                job.model,
                job.job_options(),
                predictors,
                progress,
                policy=settings.read_policy,
                checkpoint=checkpoint,
            )
        except JobCancelled:
            log.info("job cancelled while running", extra={"job_id": job.id})
            self._discard(job, job_dir)
            return
        except WorkerStopping:
            store.update_job(
                job.id,
                where_state=RUNNING,
                where_node=job.node,
                state=QUEUED,
                node=None,
                progress=0.0,
                started_at=None,
                attempts=max(0, job.attempts - 1),
            )
            log.info("job re-queued at shut-down", extra={"job_id": job.id})
            return
        except Exception as error:  # MedsegError: the client's; anything else a fault of ours (500)
            if not isinstance(error, MedsegError):
                log.exception("job failed", extra={"job_id": job.id, "error_type": type(error).__name__})
            if not self._finish(job, FAILED, error=problem_of(error), queued_s=queued_s):
                self._discard(job, job_dir)  # deleted while it ran: its writes may have failed for that
            return
        stored = outcome.model_dump(mode="json")
        timings = {**(job.timings or {}), "queued_s": queued_s, **stored["timings"]}
        # the upload's (scan) notes, then the worker's: reading repeats the scan's, kept once
        warnings = list(dict.fromkeys([*job_input.warnings, *outcome.warnings]))
        if not self._finish(
            job,
            SUCCEEDED,
            results=stored["results"],
            timings=timings,
            statistics=outcome.stored_statistics(),
            progress=1.0,
            input=job_input.model_copy(update={"warnings": warnings[:40]}).stored(),
        ):
            self._discard(job, job_dir)  # cancelled at the last moment
            return
        if settings.pacs_url and "seg" in outcome.results:
            self._push(job, job_dir / outcome.results["seg"])

    def _discard(self, job: Job, job_dir) -> None:
        """Remove a cancelled job's folder - only if its row is gone (``DELETE``). A row still
        there means another node took the job over (its heartbeat was stale): its folder and
        results are that node's, and this superseded run just stops."""
        if self.store.get_job(job.id) is None:
            shutil.rmtree(job_dir, ignore_errors=True)
        else:
            log.warning("job taken over by another node; this run stops", extra={"job_id": job.id})

    def _finish(self, job: Job, state: str, queued_s: float | None = None, **values: Any) -> bool:
        now = time.time()
        if "timings" not in values and queued_s is not None:
            values["timings"] = {**(job.timings or {}), "queued_s": queued_s}
        changed = self.store.update_job(
            job.id, where_state=RUNNING, where_node=job.node, state=state, finished_at=now, heartbeat_at=now, **values
        )
        if changed:
            self.metrics.job_finished(state, now - job.created_at, (values.get("timings") or {}).get("total_s"))
            extra = {"job_id": job.id, "state": state, "latency_s": round(now - job.created_at, 3)}
            if values.get("timings"):
                extra["timings"] = {k: round(v, 3) for k, v in values["timings"].items()}
            if values.get("error"):
                extra["error_type"] = values["error"]["type"]
            log.info("job finished", extra=extra)
        return changed

    def _push(self, job: Job, seg_path) -> None:
        self.store.update_job(job.id, push={"state": "pushing"})
        try:
            pacs.push_instances(self.settings, [seg_path])
        except Exception as error:  # PushError, or an unreadable SEG: the job itself succeeded
            self.store.update_job(job.id, push={"state": "failed", "detail": str(error)})
            self.metrics.pushes.labels("failed").inc()
            log.warning("SEG push failed", extra={"job_id": job.id, "detail": str(error)})
            return
        self.store.update_job(job.id, push={"state": "done", "at": time.time()})
        self.metrics.pushes.labels("done").inc()
        log.info("SEG pushed to PACS", extra={"job_id": job.id})


def _fraction(args: tuple, kwargs: dict) -> float | None:
    """Progress as a fraction in 0..1 from ``(fraction)`` or ``(done, total)`` callbacks."""
    try:
        if len(args) >= 2 and float(args[1]) > 0:
            return max(0.0, min(1.0, float(args[0]) / float(args[1])))
        if len(args) == 1:
            return max(0.0, min(1.0, float(args[0])))
        if "done" in kwargs and kwargs.get("total"):
            return max(0.0, min(1.0, float(kwargs["done"]) / float(kwargs["total"])))
    except (TypeError, ValueError):
        return None
    return None
