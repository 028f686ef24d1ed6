"""Prometheus metrics (prometheus-client), served at ``GET /metrics``.

One registry per app. Job counts by state are read from the job store at scrape time, so they
are right across restarts and across processes sharing a store.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from service.store import STATES, Store

LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """The service's counters and histograms."""

    def __init__(self, store: Store):
        self.registry = CollectorRegistry()
        self.submitted = Counter(
            "medseg_jobs_submitted", "Jobs accepted, by source", ["source"], registry=self.registry
        )
        self.rejected = Counter(
            "medseg_uploads_rejected", "Requests refused, by problem code", ["code"], registry=self.registry
        )
        self.finished = Counter(
            "medseg_jobs_finished", "Jobs finished, by final state", ["state"], registry=self.registry
        )
        self.latency = Histogram(
            "medseg_job_latency_seconds",
            "Seconds from job submission to results available",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.processing = Histogram(
            "medseg_job_processing_seconds",
            "Seconds a worker spent reading, segmenting and writing a job",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "medseg_received_bytes", "Request body bytes received", ["endpoint"], registry=self.registry
        )
        self.stow_instances = Counter(
            "medseg_stow_instances", "STOW-RS instances, by outcome", ["outcome"], registry=self.registry
        )
        self.pushes = Counter(
            "medseg_pacs_pushes", "SEG pushes to the PACS, by outcome", ["outcome"], registry=self.registry
        )
        self.registry.register(_JobStateCollector(store))

    def job_finished(self, state: str, latency_s: float, processing_s: float | None) -> None:
        self.finished.labels(state).inc()
        if state == "succeeded":
            self.latency.observe(latency_s)
            if processing_s is not None:
                self.processing.observe(processing_s)


class _JobStateCollector:
    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        family = GaugeMetricFamily("medseg_jobs", "Jobs in the store, by state", labels=["state"])
        try:
            counts = self.store.count_by_state()
        except Exception:
            counts = {}
        for state in STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family
