"""Prometheus metrics of one daemon (prometheus-client), on a registry of its own so tests can run several."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class Metrics:
    """Every ``fracwatch_*`` metric; components call the ``observe_*``/``count_*`` methods."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            "fracwatch_instances_received",
            "Instances received over C-STORE, by outcome (stored, duplicate).",
            ["outcome"],
            registry=self.registry,
        )
        self.studies_scored = Counter(
            "fracwatch_studies_scored",
            "Study versions scored, by category.",
            ["category"],
            registry=self.registry,
        )
        self.images_scored = Counter(
            "fracwatch_images_scored", "Images scored (errors excluded).", registry=self.registry
        )
        self.scoring_latency = Histogram(
            "fracwatch_scoring_latency_seconds",
            "From the study's completion to its result being saved.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scoring_batches = Histogram(
            "fracwatch_scoring_batch_studies",
            "Study versions per scoring batch (more than one when studies waited for a busy scoring process).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "fracwatch_delivery_latency_seconds",
            "From a produced object's creation to its acknowledgement by a destination.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.deliveries = Counter(
            "fracwatch_deliveries",
            "C-STORE attempts of produced objects, by outcome (sent, retry, dead).",
            ["outcome"],
            registry=self.registry,
        )
        self.triage_messages = Counter(
            "fracwatch_triage_messages",
            "Triage message attempts, by channel and outcome (sent, retry, dead).",
            ["channel", "outcome"],
            registry=self.registry,
        )
        self.purged_files = Counter(
            "fracwatch_retention_purged_files", "Spool files deleted by retention.", registry=self.registry
        )
        self.queue_depth = Gauge(
            "fracwatch_queue_depth",
            "Scoring jobs waiting or running (retries scheduled later included).",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "fracwatch_dead_letters",
            "Study versions whose scoring job failed every attempt (state failed, with the reason).",
            registry=self.registry,
        )
        self.http_requests = Counter(
            "fracwatch_http_requests",
            "HTTP requests served, by route and status class.",
            ["route", "status"],
            registry=self.registry,
        )

    def track_queue(self, depth: Callable[[], int]) -> None:
        """Read the worker's backlog at each scrape."""
        self.queue_depth.set_function(lambda: float(depth()))
