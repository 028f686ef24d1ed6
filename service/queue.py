"""The job queue: what workers take jobs from.

:class:`JobQueue` is the interface. :class:`StoreQueue`, the default, is the job store itself:
queued rows are the queue, claimed atomically (``UPDATE ... WHERE state='queued'``, ``SKIP LOCKED``
on PostgreSQL), so it survives restarts and several processes can share a PostgreSQL store.
:class:`service.broker.BrokerQueue` is the broker-backed one (Celery; ``medseg serve --broker``):
``submit`` publishes the job id, and ``medseg worker`` processes claim each delivered id in the
store with one conditional update (:meth:`service.store.Store.claim`).
"""

from __future__ import annotations

import threading
from typing import Protocol

from service.store import Job, Store


class JobQueue(Protocol):
    """Hands queued jobs to workers."""

    def submit(self, job_id: str) -> None:
        """A job has been stored in state ``queued``: make it available to a worker."""

    def claim(self, node: str, timeout: float) -> Job | None:
        """The next job, already marked ``running`` for ``node``; None after ``timeout`` seconds."""

    def wake_all(self) -> None:
        """Wake every waiting ``claim`` (used at shut-down)."""


class StoreQueue:
    """The default queue: the store's ``queued`` jobs, oldest first; a condition avoids polling."""

    def __init__(self, store: Store):
        self.store = store
        self._condition = threading.Condition()
        self._pending = 0

    def submit(self, job_id: str) -> None:
        with self._condition:
            self._pending += 1
            self._condition.notify()

    def claim(self, node: str, timeout: float) -> Job | None:
        job = self.store.claim_next(node)
        if job is not None:
            return job
        with self._condition:
            if not self._pending:
                self._condition.wait(timeout)
            self._pending = max(0, self._pending - 1)
        return self.store.claim_next(node)

    def wake_all(self) -> None:
        with self._condition:
            self._condition.notify_all()
