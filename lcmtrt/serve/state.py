"""What the server holds: its settings and, per model, the card, the batcher and the requests on their way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcmtrt.serve.api import ModelCard
from lcmtrt.serve.batcher import Batcher
from lcmtrt.serve.metrics import ServeMetrics


@dataclass
class ServeConfig:
    models: list[tuple[str, Path]]  # (model id, bundle folder)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_n: int = 4
    max_batch_wait_ms: float = 10.0
    max_queue: int = 64  # images
    max_body_mb: float = 20.0
    request_timeout_s: float = 600.0
    api_keys: tuple[str, ...] = ()
    replica: str = ""  # set inside a Ray Serve replica: named in X-Lcmtrt-Replica and lcmtrt_replica_requests
    max_step_programs: int = 16  # per model: step programs kept (Pipeline.max_step_programs)
    batch_ms: dict[int, float] | None = None  # a run's ms per batch size, for every model; None: timed at warm-up


@dataclass
class ServeState:
    config: ServeConfig
    cards: dict[str, ModelCard]
    batchers: dict[str, Batcher]
    metrics: ServeMetrics
    draining: bool = False
    in_flight: int = 0  # admitted image requests not yet answered: a drain waits for them
    # image requests past the key check and not yet queued, by model (None: its body is not read yet, so it may be
    # for any model): the company a waiting batch expects
    arriving: dict[str | None, int] = field(default_factory=lambda: {None: 0})
    last_batch_s: dict[str, float] = field(default_factory=dict)
    warmed: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model: Pipeline.warm_up's report

    def ready(self) -> bool:
        return all(b.ready.is_set() and b.failed is None for b in self.batchers.values())

    def company_coming(self, name: str) -> bool:
        """Is an image request on its way that may join a batch of model `name`? (Read by that model's worker.)"""
        return self.arriving[None] > 0 or self.arriving.get(name, 0) > 0

    def expect(self, scope_state: dict) -> None:
        """An image request passed the key check: batches may wait for it (at most --max-batch-wait-ms)."""
        self.arriving[None] += 1
        scope_state["arriving"] = None

    def heading_to(self, scope_state: dict, name: str) -> None:
        """The request's model is known: only that model's batches count on it from now on."""
        if "arriving" in scope_state and scope_state["arriving"] is None:
            self.arriving[name] = self.arriving.get(name, 0) + 1
            self.arriving[None] -= 1
            scope_state["arriving"] = name
            self._nudge()

    def arrived(self, scope_state: dict) -> None:
        """The request is queued, or will never be: batches stop counting on it. Once per request."""
        if "arriving" in scope_state:
            self.arriving[scope_state.pop("arriving")] -= 1
            self._nudge()

    def _nudge(self) -> None:
        for batcher in self.batchers.values():
            batcher.nudge()
