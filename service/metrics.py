"""Prometheus metrics, in a registry per app so tests can run several apps in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("decode", "queue", "infer", "postprocess", "encode")  # a request's stages, in order
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "maskformer_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "maskformer_request_latency_seconds",
            "request latency, arrival to response",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge("maskformer_queue_depth", "images waiting for a batch", registry=self.registry)
        self.batch_size = Histogram(
            "maskformer_batch_size",
            "images per forward pass",
            buckets=tuple(range(1, max_batch_size + 1)),
            registry=self.registry,
        )
        self.stage = Histogram(
            "maskformer_stage_seconds",
            f"time per image in each stage: {', '.join(STAGES)}",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ready = Gauge("maskformer_ready", "1 when the backend is loaded and warm", registry=self.registry)
