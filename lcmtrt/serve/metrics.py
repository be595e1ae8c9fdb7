"""Prometheus metrics of `lcmtrt serve`, in a registry of their own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
IMAGES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServeMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: a server process has one start time
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lcmtrt_requests", "Image API requests by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=r)
        self.images = Counter("lcmtrt_images", "Images returned to clients", ["model"], registry=r)
        self.queue_images = Gauge("lcmtrt_queue_images", "Images accepted and waiting for an engine batch",
                                  ["model"], registry=r)
        self.batch_images = Histogram("lcmtrt_batch_images", "Images per batch the worker ran (requests merged)",
                                      ["model"], buckets=IMAGES, registry=r)
        self.engine_launches = Counter("lcmtrt_engine_launches", "Engine runs of a whole generation at one built "
                                       "batch size", ["model"], registry=r)
        self.engine_seconds = Histogram("lcmtrt_engine_seconds", "Engine time per batch", ["model"],
                                        buckets=SECONDS, registry=r)
        self.queue_wait_seconds = Histogram("lcmtrt_queue_wait_seconds", "From admission to a request's first "
                                            "engine batch", ["model"], buckets=SECONDS, registry=r)
        self.request_seconds = Histogram("lcmtrt_request_seconds", "Whole request, served ones only", ["model"],
                                         buckets=SECONDS, registry=r)
        self.cancelled = Counter("lcmtrt_cancelled_requests", "Accepted requests dropped before their images were "
                                 "done, by reason (disconnect, timeout)", ["model", "reason"], registry=r)
        self.in_flight = Gauge("lcmtrt_requests_in_flight", "Image requests admitted and not yet answered",
                               registry=r)
        self.replica_requests = Counter("lcmtrt_replica_requests", "Image requests served (200) by this Ray Serve "
                                        "replica, by replica id and model", ["replica", "model"], registry=r)
        self.ready = Gauge("lcmtrt_model_ready", "1 when the model is loaded and warmed", ["model"], registry=r)
        self.step_programs = Gauge("lcmtrt_step_programs", "Step programs (buffers, bindings and graphs of one "
                                   "batch size and plan) kept, at most --max-step-programs", ["model"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
