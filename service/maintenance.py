"""Background upkeep, one thread per service process.

Every ``maintenance_interval_s``: turn quiet STOW-RS series into jobs, refresh the heartbeat of
this process's running jobs, re-queue running jobs whose heartbeat is older than ``lease_s``
(their worker died), and - every minute - delete expired results and abandoned uploads.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time

from service import dicomweb
from service.jobs import expire_jobs
from service.store import RUNNING

log = logging.getLogger("medseg.service.maintenance")
SLOW_EVERY_S = 60.0


class Maintenance:
    """The upkeep thread of one app (``app.state``: settings, store, queue, pool, metrics)."""

    def __init__(self, state):
        self.state = state
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="medseg-maintenance", daemon=True)
        self._last_slow = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.state.settings.maintenance_interval_s):
            try:
                self.run_once()
            except Exception:  # keep going: the database may be briefly unavailable
                log.exception("maintenance step failed")

    def run_once(self) -> None:
        state = self.state
        settings, store = state.settings, state.store
        dicomweb.flush_quiet_series(store, settings, state.queue, state.metrics)
        now = time.time()
        for job_id in state.pool.running_ids():
            store.update_job(job_id, where_state=RUNNING, heartbeat_at=now)
        for job_id in store.requeue_interrupted(settings.lease_s):
            log.warning("job re-queued: heartbeat lost", extra={"job_id": job_id})
            state.queue.submit(job_id)
        if now - self._last_slow >= SLOW_EVERY_S:
            self._last_slow = now
            expire_jobs(store, settings, now)
            self._remove_abandoned_uploads(now)

    def _remove_abandoned_uploads(self, now: float) -> None:
        settings = self.state.settings
        cutoff = now - settings.request_timeout_s - 3600
        if not settings.incoming_dir.is_dir():
            return
        for path in settings.incoming_dir.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
            except FileNotFoundError:
                continue
