"""Scale-out: Celery as the job queue (Redis or RabbitMQ as broker), ``medseg worker`` processes.

Without a broker nothing here is used: the job store is the queue (:class:`service.queue.StoreQueue`)
and workers are threads of ``medseg serve``. With ``broker_url`` set:

- an API replica (``medseg serve --broker URL --database-url URL --workers 0``) stores the job as
  before and publishes one Celery message carrying **only the job id** (:class:`BrokerQueue`);
- a worker (``medseg worker --broker URL --database-url URL --data-dir DIR``) consumes messages
  one at a time; for each it *claims* the job in the store with one conditional ``UPDATE``
  (``queued -> running``, or ``running`` with a heartbeat older than ``lease_s``), then runs it
  with the same code as the in-process pool (:meth:`service.workers.WorkerPool.run_claimed`).

Delivery is at-least-once: ``task_acks_late`` (a message is acknowledged after the job ran),
``task_reject_on_worker_lost``, ``worker_prefetch_multiplier=1`` (a worker holds one message per
job slot) and a Redis visibility timeout longer than the longest job. A message delivered twice
(re-delivery after a worker died, a re-submission by the heartbeat check, a retry) is harmless:
only one delivery wins the claim, the others find the job taken or finished and are dropped, and a
re-run writes ``output.partial`` in the job's own folder and renames it. A worker killed mid-job
leaves the job ``running``; once its heartbeat is older than ``lease_s`` any process (API replica
or worker) re-queues it with a conditional update - exactly one of them - and re-submits its id.
A job interrupted more than ``max_attempts`` times fails with problem type ``interrupted``; a job
whose claim kept failing (job store unreachable) fails with ``retries-exhausted``: the dead-letter
state, visible in ``GET /v1/jobs/{id}``. A message that never reached the broker, or that the
broker lost (a replica died between storing the job and publishing it; Redis restarted without
its append-only file), is covered by the re-publish sweep: a job still ``queued`` and not published
for ``broker_republish_s`` is published again, by one process (conditional update of
``jobs.published_at``).
"""

from __future__ import annotations

import logging
import os
import queue as queue_module
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from service.config import Settings
from service.store import FAILED, QUEUED, Job, Store

log = logging.getLogger("medseg.service.broker")
TASK = "medseg.run_job"
SWEEP_S = 30.0
PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def celery_app(settings: Settings):
    """The Celery application for ``settings.broker_url`` (publisher and worker alike)."""
    from celery import Celery

    if not settings.broker_url:
        raise ValueError("no broker_url configured")
    app = Celery("medseg", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # acknowledge after the job ran: a dead worker's job is re-delivered
        task_reject_on_worker_lost=True,  # a killed pool process re-queues its message at once
        worker_prefetch_multiplier=1,  # no job waits in a busy worker's buffer
        broker_transport_options={
            # Redis: a delivered, unacknowledged message goes back to the queue after this long
            "visibility_timeout": settings.broker_visibility_timeout_s,
            # ...found by a scan every broker_restore_interval_s (kombu's default is one scan
            # per 10 x 10 s); other transports ignore these keys
            "unacked_restore_interval": settings.broker_restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.broker_queue,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_heartbeat=30,
    )
    return app


class BrokerQueue:
    """:class:`service.queue.JobQueue` for an API replica: ``submit`` publishes the job id.

    ``submit`` never blocks the caller (the API's event loop): ids go to an in-memory outbox that
    one thread publishes in order, retrying every few seconds while the broker is unreachable and
    the job still queued. What the outbox held when the process died is covered by the re-publish
    sweep (``start``). ``claim`` never returns a job (workers take them from the broker);
    in-process pool threads, if any, claim from the store directly.
    """

    def __init__(self, settings: Settings, store: Store, app=None):
        self.settings, self.store = settings, store
        self.app = app or celery_app(settings)
        self._lock = threading.Lock()
        self._outbox: queue_module.Queue[str | None] = queue_module.Queue()
        self._stop = threading.Event()
        self._publisher: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None

    def submit(self, job_id: str) -> None:
        self._outbox.put(job_id)
        with self._lock:
            if self._publisher is None:
                self._publisher = threading.Thread(target=self._publish_loop, daemon=True, name="medseg-broker-publish")
                self._publisher.start()

    def check_reachable(self, timeout: float = 2.0) -> None:
        """Connect to the broker once (for ``/readyz``); raises the transport's error when it is
        unreachable within ``timeout`` seconds."""
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)

    def claim(self, node: str, timeout: float) -> Job | None:
        time.sleep(min(timeout, 1.0))
        return None

    def wake_all(self) -> None:
        pass

    def close(self, timeout: float = 5.0) -> None:
        """Publish what the outbox holds (for up to ``timeout`` s), then stop."""
        if self._publisher is not None:
            self._outbox.put(None)
            self._publisher.join(timeout)
        self._stop.set()
        try:
            self.app.close()
        except Exception:
            pass

    def _publish_loop(self) -> None:
        while True:
            job_id = self._outbox.get()
            if job_id is None:
                return
            while not self._publish(job_id):
                if self._stop.wait(2.0):
                    return
                try:
                    job = self.store.get_job(job_id)
                except Exception:
                    continue
                if job is None or job.state != QUEUED:
                    break

    def _publish(self, job_id: str) -> bool:
        try:
            self.app.send_task(
                TASK, args=[job_id], queue=self.settings.broker_queue, retry=True, retry_policy=PUBLISH_RETRY
            )
        except Exception as error:  # kombu OperationalError, socket errors, ...
            log.error(
                "could not publish job to the broker; retrying",
                extra={"job_id": job_id, "error_type": type(error).__name__},
            )
            return False
        log.info("job published", extra={"job_id": job_id})
        try:
            self.store.update_job(job_id, where_state=QUEUED, published_at=time.time())
        except Exception:  # only the re-publish sweep uses it; a later sweep may publish again
            log.warning("could not record the publication", extra={"job_id": job_id})
        return True

    def start(self) -> None:
        """Start the re-publish sweep: every ``SWEEP_S`` seconds, queued jobs whose message may be
        lost (:meth:`service.store.Store.claim_republish`) are published again."""
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep, daemon=True, name="medseg-broker-sweep")
            self._sweeper.start()

    def sweep_once(self) -> list[str]:
        ids = self.store.claim_republish(self.settings.broker_republish_s)
        for job_id in ids:
            log.warning("queued job published again (message may be lost)", extra={"job_id": job_id})
            self.submit(job_id)
        return ids

    def _sweep(self) -> None:
        while not self._stop.wait(SWEEP_S):
            try:
                self.sweep_once()
            except Exception:  # the database may be briefly unavailable
                log.exception("re-publish sweep failed")


def install(app, settings: Settings) -> None:
    """Make the FastAPI app of ``create_app(settings)`` publish jobs to the broker: after its own
    start-up, ``app.state.queue`` becomes a :class:`BrokerQueue` (the API and the maintenance
    thread submit through ``state.queue``). Nothing changes without ``settings.broker_url``."""
    if not settings.broker_url:
        return
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application):
        async with original(application) as value:
            queue = BrokerQueue(settings, application.state.store)
            application.state.queue = queue
            queue.start()
            log.info("publishing jobs to the broker", extra={"queue": settings.broker_queue})
            try:
                yield value
            finally:
                queue.close()

    app.router.lifespan_context = lifespan


# --- batches from the command line (medseg predict --broker) ------------------------------------
BATCH_OWNER = "cli-batch"  # jobs.owner of batch jobs: an admin key sees them in GET /v1/jobs


class BatchClient:
    """What ``medseg predict --broker`` submits and collects through: the API's own steps.

    Each series is staged in ``<data_dir>/incoming/<id>/`` (hard links where the file system
    allows, else copies), checked by :func:`service.inputs.prepare_input` (the upload checks),
    stored by :func:`service.jobs.create_job` (source ``batch``) and published by
    :class:`BrokerQueue`; ``medseg worker`` processes run it as any other job. ``data_dir`` must
    be the workers' data dir on a shared file system (inputs are staged into it, results are read
    back from it), and the store URL theirs.
    """

    def __init__(self, settings: Settings, owner: str = BATCH_OWNER):
        """Open the store (migrating it if needed) and the broker connection.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the store cannot be opened.
            ValueError: ``settings.broker_url`` is not set.
        """
        if not settings.broker_url:
            raise ValueError("no broker_url configured")
        self.settings, self.owner = settings, owner
        for folder in (settings.data_dir, settings.jobs_dir, settings.incoming_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.db_url)
        self.queue = BrokerQueue(settings, self.store)

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Raise the transport's error (``OSError``, ``kombu.exceptions.OperationalError``) when
        the broker cannot be reached within ``timeout`` seconds."""
        self.queue.check_reachable(timeout)

    def submit(self, files, card, model: str, options) -> Job:
        """Stage ``files`` (the instances of one series, or one volume file or archive), validate
        them for ``card`` with ``options`` (:class:`service.inputs.JobOptions`), store the job as
        ``queued`` and hand its id to the broker (asynchronously; see :class:`BrokerQueue`).

        Raises:
            MedsegError: what the upload checks raise (unreadable, unsafe, too large, modality or
                field-of-view mismatch, formats that need DICOM input).
            OSError: the data dir is not writable.
        """
        import shutil
        from pathlib import Path

        from service.inputs import prepare_input
        from service.jobs import create_job, new_job_id
        from service.uploads import Received, ReceivedFile

        job_id = new_job_id()
        upload_dir = self.settings.incoming_dir / job_id
        upload_dir.mkdir(parents=True)
        try:
            received = Received()
            for index, source in enumerate(map(Path, files)):
                # several files are DICOM instances: numbered names (folders may repeat names)
                target = upload_dir / (source.name if len(files) == 1 else f"{index:05d}.dcm")
                _link_or_copy(source, target)
                size = target.stat().st_size
                received.files.append(ReceivedFile(target, source.name, "application/octet-stream", size))
                received.size += size
            job_input = prepare_input(received, upload_dir, self.settings, card, options)
            job = create_job(
                self.store,
                self.settings,
                job_id=job_id,
                owner=self.owner,
                source="batch",
                model=model,
                options=options,
                job_input=job_input,
                input_dir=upload_dir,
            )
        finally:
            shutil.rmtree(upload_dir, ignore_errors=True)  # moved into the job, or refused
        self.queue.submit(job.id)
        return job

    def jobs(self, ids) -> dict[str, Job]:
        """The current rows of the jobs ``ids`` (a deleted job is absent)."""
        from sqlalchemy import select

        ids, found = list(ids), {}
        for start in range(0, len(ids), 500):
            with self.store.session() as session:
                rows = session.scalars(select(Job).where(Job.id.in_(ids[start : start + 500])))
                found.update({row.id: row for row in rows})
        return found

    def collect(self, job: Job, targets: dict) -> dict:
        """Copy the results of a succeeded ``job`` to ``targets`` (result name -> destination
        path; names the job lacks are left out) and return ``{name: destination}``.

        Each file is copied with :func:`medseg.io.atomic.atomic_write` (a hidden temporary beside
        its destination, then renamed): a destination is never half-written. The report is renamed
        last, since ``--skip-existing`` takes its presence as "this series is done".

        Raises:
            FileNotFoundError: a result file is missing from the job's folder.
            OSError: a destination cannot be written.
        """
        import shutil

        from medseg.io.atomic import atomic_write
        from service.jobs import result_path

        written = {}
        for name in sorted(targets, key=lambda n: n == "report"):
            if name not in (job.results or {}):
                continue
            source = result_path(self.settings, job, name)
            if source is None:
                raise FileNotFoundError(f"job {job.id}: result '{name}' is missing from the shared data dir")
            written[name] = atomic_write(targets[name], lambda tmp, source=source: shutil.copyfile(source, tmp))
        return written

    def delete(self, job_id: str) -> None:
        """Delete a job, row and files; a worker running it stops at its next progress check, a
        message still queued for it is dropped at the claim (:func:`service.jobs.cancel_job`)."""
        from service.jobs import cancel_job

        job = self.store.get_job(job_id)
        if job is not None:
            cancel_job(self.store, self.settings, job)

    def close(self, timeout: float = 30.0) -> None:
        """Publish what is still in the outbox (up to ``timeout`` s), then close broker and store."""
        self.queue.close(timeout)
        self.store.dispose()


def _link_or_copy(source, target) -> None:
    """Hard-link ``source`` to ``target``; copy it where linking is impossible (another file
    system, ``fs.protected_hardlinks``)."""
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# --- the worker process -------------------------------------------------------------------------
class WorkerRuntime:
    """What one ``medseg worker`` process holds: settings, store, a pool object used to run
    claimed jobs, one :class:`PredictorCache` per job slot (each model loaded once), and the
    heartbeat thread (leases of its running jobs, re-queue of other processes' stale jobs)."""

    def __init__(self, settings: Settings, node: str | None = None):
        from service.metrics import Metrics
        from service.workers import WorkerPool

        self.settings = settings.model_copy(update={"workers": 0})
        self.node = node or f"{settings.node_id}:worker:{os.getpid()}"
        self.settings = self.settings.model_copy(update={"node_id": self.node})
        for folder in (settings.data_dir, settings.jobs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.db_url)
        self.app = celery_app(settings)
        self.queue = BrokerQueue(self.settings, self.store, self.app)
        self.metrics = Metrics(self.store)
        self.pool = WorkerPool(self.settings, self.store, self.queue, self.metrics)
        self._local = threading.local()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeats, daemon=True, name="medseg-worker-heartbeat")

    def predictors(self):
        from service.pipeline import PredictorCache

        cache = getattr(self._local, "predictors", None)
        if cache is None:
            cache = self._local.predictors = PredictorCache(self.settings.device, max_windows=self.settings.max_windows)
        return cache

    def start(self) -> None:
        for job_id in self.store.requeue_interrupted(self.settings.lease_s, node=self.node):
            log.warning("job re-queued after restart", extra={"job_id": job_id})
            self.queue.submit(job_id)
        self._thread.start()
        self.queue.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.queue.close()
        self.store.dispose()

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.settings.maintenance_interval_s):
            try:
                self.store.heartbeat(self.pool.running_ids(), self.node)
                for job_id in self.store.requeue_interrupted(self.settings.lease_s):
                    log.warning("job re-queued: heartbeat lost", extra={"job_id": job_id})
                    self.queue.submit(job_id)
                if self.settings.worker_health_file is not None:
                    self.settings.worker_health_file.touch()
            except Exception:  # the database may be briefly unavailable
                log.exception("worker heartbeat failed")

    def execute(self, task, job_id: str) -> str:
        """The body of the Celery task: claim ``job_id`` in the store and run it."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            job = self.store.claim(job_id, self.node, self.settings.lease_s)
        except SQLAlchemyError as error:
            retries = task.request.retries or 0
            if retries >= self.settings.max_attempts:
                self._give_up(job_id, retries, error)
                return "retries-exhausted"
            log.warning(
                "could not claim job; retrying",
                extra={"job_id": job_id, "retry": retries + 1, "error_type": type(error).__name__},
            )
            raise task.retry(
                exc=error, countdown=min(30, 2**retries), max_retries=self.settings.max_attempts
            ) from error
        if job is None:  # taken by another delivery, finished, or deleted: nothing to do
            log.info("job message dropped (not claimable)", extra={"job_id": job_id})
            return "skipped"
        self.pool.run_claimed(job, self.predictors())
        return "ran"

    def _give_up(self, job_id: str, retries: int, error: BaseException) -> None:
        from service.problems import problem_body

        try:
            now = time.time()
            self.store.update_job(
                job_id,
                where_state=QUEUED,
                state=FAILED,
                finished_at=now,
                heartbeat_at=now,
                error=problem_body(
                    503,
                    "retries-exhausted",
                    f"job could not be started after {retries + 1} tries ({type(error).__name__})",
                ),
            )
        except Exception:
            log.exception("could not mark job failed", extra={"job_id": job_id})
        log.error("job failed: retries exhausted", extra={"job_id": job_id})


def run_worker(settings: Settings, loglevel: str = "INFO") -> int:
    """Run a Celery worker (blocking) taking jobs from ``settings.broker_queue``; returns its
    exit code. ``settings.worker_concurrency`` jobs at once (threads; default 1)."""
    from celery import signals

    from service import logs

    runtime = WorkerRuntime(settings)
    app = runtime.app

    @signals.setup_logging.connect(weak=False)
    def _logging(**_: Any) -> None:  # keep medseg's JSON logs (no Celery handlers)
        logs.configure()

    @app.task(name=TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def run_job_task(self, job_id: str) -> str:
        return runtime.execute(self, job_id)

    runtime.start()
    log.info(
        "worker started",
        extra={
            "node": runtime.node,
            "queue": settings.broker_queue,
            "concurrency": settings.worker_concurrency,
            "database": runtime.store.engine.dialect.name,
        },
    )
    try:
        app.worker_main(
            argv=[
                "worker",
                "--pool=threads",
                f"--concurrency={settings.worker_concurrency}",
                f"--queues={settings.broker_queue}",
                f"--hostname=medseg@{runtime.node}",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--prefetch-multiplier=1",
            ]
        )
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        runtime.stop()
        log.info("worker stopped", extra={"node": runtime.node})
    return 0


__all__ = ["BatchClient", "BrokerQueue", "WorkerRuntime", "celery_app", "install", "run_worker", "TASK"]
