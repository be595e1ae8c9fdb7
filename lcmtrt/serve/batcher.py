"""Dynamic batching for one model: a worker thread owns the Pipeline and merges queued requests' rows.

Requests with the same BatchKey (plan, img2img, CFG, inpainting: inpainting rows never join other rows) share engine
batches up to the largest batch the bundle was built for, counting images, so one request's `n` images may span
several batches. A batch waits for company only while `company_coming()` says more requests to this model are on
their way (received, not yet queued), and at most `max_wait_s` after its oldest request arrived: a lone request runs
at once. The oldest request always goes first, so none starves. A batch runs as the pipeline cuts it into launches,
and each request is answered as soon as the launch holding its last row is read, while the rest of the batch runs
on. The queue is bounded in images: `submit` refuses at once beyond it, and nothing accepted is ever dropped unless
cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lcmtrt.runtime.pipeline import Generation, Pipeline
from lcmtrt.runtime.rows import PreparedRows

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` images already; the caller answers 503 with Retry-After."""


class Stopped(Exception):
    """The batcher is draining or stopped and takes no new work."""


class WorkerDied(Exception):
    """The worker thread stopped on an error outside any one batch: its queued jobs fail with this at once, it takes
    no new work, and `failed` holds it (so /ready and Ray's health check report it)."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int  # images per engine batch: the bundle's largest built batch size
    max_wait_s: float = 0.010  # how long the oldest request waits for company
    max_queue: int = 64  # images waiting (not yet running) at most


@dataclass
class BatchStats:
    """What one engine batch did, for metrics and access logs."""

    images: int
    engine_batches: list[int]
    engine_seconds: float


@dataclass(eq=False)
class Job:
    """One request's rows on their way through the queue; `future` resolves (on the event loop) to its images."""

    rows: PreparedRows
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)
    taken: int = 0  # rows handed to batches so far
    finished: int = 0  # rows computed so far
    started: float | None = None  # when its first row went to the engines
    cancelled: bool = False
    ended: bool = False  # _finish ran: counted out of the running jobs, future resolved
    images: np.ndarray | None = None
    engine_seconds: float = 0.0
    batch_images: list[int] = field(default_factory=list)  # images in each batch it was part of

    @property
    def left(self) -> int:
        return len(self.rows) - self.taken

    @property
    def queue_wait_s(self) -> float:
        return (self.started or time.monotonic()) - self.arrived


class Batcher:
    def __init__(self, name: str, load: Callable[[], Pipeline], config: BatcherConfig,
                 on_batch: Callable[[BatchStats], None] = lambda stats: None,
                 on_queue: Callable[[int], None] = lambda images: None,
                 company_coming: Callable[[], bool] = lambda: True):
        self.name, self.config, self._company_coming = name, config, company_coming
        self._load, self._on_batch, self._on_queue = load, on_batch, on_queue
        self._cond = threading.Condition()
        self._jobs: list[Job] = []  # waiting, oldest first
        self._queued = 0  # images of self._jobs not yet taken
        self._running = 0  # jobs taken in part or whole and not yet finished
        self._held: set[Job] = set()  # every job accepted and not yet finished: a dying worker fails them all
        self._stopping = False
        self.pipeline: Pipeline | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"lcmtrt-worker-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queued_images(self) -> int:
        return self._queued

    def submit(self, rows: PreparedRows, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a request's rows, or raise QueueFull/Stopped without queueing anything."""
        job = Job(rows, loop.create_future(), loop)
        with self._cond:
            if isinstance(self.failed, WorkerDied):
                raise WorkerDied(str(self.failed))
            if self._stopping:
                raise Stopped(self.name)
            if self._queued + len(rows) > self.config.max_queue:
                raise QueueFull(self.name)
            self._jobs.append(job)
            self._held.add(job)
            self._queued += len(rows)
            self._cond.notify_all()
        self._on_queue(self._queued)
        return job

    def nudge(self) -> None:
        """company_coming() may have changed: a batch waiting for company looks again."""
        with self._cond:
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a job's rows not yet computed (its client left or its wait ran out); rows running finish unused."""
        with self._cond:
            if job.cancelled or job.ended:
                return
            job.cancelled = True
            if job in self._jobs:
                self._jobs.remove(job)
                self._queued -= job.left
            if job.started is None:  # none of it ran: nothing of it is held any more
                self._held.discard(job)
            if job.started is not None and job.finished == job.taken:
                self._finish(job)  # part of it ran and nothing of it is running now
            self._cond.notify_all()
        self._on_queue(self._queued)

    def stop(self) -> None:
        """Take nothing new; the worker finishes every accepted job, then exits."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def idle(self) -> bool:
        with self._cond:
            return not self._jobs and self._running == 0

    def _main(self) -> None:
        try:
            self.pipeline = self._load()
        except BaseException as e:  # noqa: BLE001 - reported by /ready and the server's start-up
            self.failed = e
            log.error("model %s failed to load: %s", self.name, e)
            self.ready.set()
            return
        self.ready.set()
        try:
            while True:
                with self._cond:
                    pieces = self._next_batch()
                    if pieces is None:
                        return
                self._batch(pieces)
        except BaseException as e:  # noqa: BLE001 - outside any one batch: the worker cannot go on
            self._die(e)

    def _batch(self, pieces: list[tuple[Job, int, int]]) -> None:
        """One batch; whatever fails in it (the engines, copying the results, a callback) fails its jobs only."""
        try:
            self._on_queue(self._queued)
            self._run(pieces)
        except Exception as e:  # noqa: BLE001 - a bug: the worker lives on and serves the next batch
            log.exception("model %s: handling a batch of %d images failed (requests already answered keep their "
                          "images)", self.name, sum(b - a for _, a, b in pieces))
            for job, _, _ in pieces:
                self._finish(job, error=e)

    def _die(self, error: BaseException) -> None:
        """Record why the worker stopped, take no more work, and fail every job it holds at once."""
        log.critical("model %s: the worker thread stopped; /ready is 503 and its requests fail with 500", self.name,
                     exc_info=error)
        died = WorkerDied(f"its worker thread stopped on {type(error).__name__}: {error}")
        died.__cause__ = error
        with self._cond:
            self.failed = died
            self._stopping = True
            jobs = list(self._held)
        for job in jobs:
            try:
                self._finish(job, error=died)
            except BaseException:  # noqa: BLE001 - fail the others still
                log.exception("model %s: a request could not be failed", self.name)
        with contextlib.suppress(Exception):
            self._on_queue(self._queued)

    def _next_batch(self) -> list[tuple[Job, int, int]] | None:
        """Under the lock: wait for work and for company, then take (job, start, stop) row ranges, oldest first."""
        while True:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            oldest = self._jobs[0]
            key = oldest.rows.key
            deadline = oldest.arrived + self.config.max_wait_s
            while (not self._stopping and self._jobs and self._jobs[0] is oldest and self._company_coming()
                   and sum(j.left for j in self._jobs if j.rows.key == key) < self.config.max_batch
                   and time.monotonic() < deadline):
                self._cond.wait(deadline - time.monotonic())
            if self._jobs and self._jobs[0] is oldest:
                break  # else the oldest was cancelled meanwhile: start over with the new oldest
        pieces, room = [], self.config.max_batch
        for job in [j for j in self._jobs if j.rows.key == key]:
            count = min(room, job.left)
            pieces.append((job, job.taken, job.taken + count))
            if job.taken == 0:
                job.started = time.monotonic()
                self._running += 1
            job.taken += count
            room -= count
            self._queued -= count
            if job.left == 0:
                self._jobs.remove(job)
            if room == 0:
                break
        return pieces

    def _run(self, pieces: list[tuple[Job, int, int]]) -> None:
        """Run the joined rows launch by launch (Pipeline.run_pieces): a request is answered as soon as its own rows
        are done, while the rest of the batch still runs."""
        rows = PreparedRows.join([job.rows.take(start, stop) for job, start, stop in pieces])
        launches, seconds = [], 0.0
        with self._cond:
            for job, _, _ in pieces:
                job.batch_images.append(len(rows))
        try:
            for offset, done in self.pipeline.run_pieces(rows):
                launches += done.batches
                seconds += done.engine_seconds
                self._deliver(pieces, offset, done)
        except BaseException as e:  # noqa: BLE001 - a bug: every job in the batch fails with it, the worker lives on
            log.exception("model %s: a batch of %d images failed", self.name, len(rows))
            for job, _, _ in pieces:
                self._finish(job, error=e)  # jobs answered by an earlier launch keep their images
            return
        self._on_batch(BatchStats(len(rows), launches, seconds))

    def _deliver(self, pieces: list[tuple[Job, int, int]], offset: int, done: Generation) -> None:
        """One launch's images (rows offset.. of the joined batch) into their jobs; a job whose rows are all done
        is answered now."""
        end, begin = offset + len(done.images), 0
        with self._cond:  # cancel() reads and sets the same fields
            for job, start, stop in pieces:  # the job's rows start..stop are rows begin..begin + stop - start
                piece_start, begin = begin, begin + stop - start
                if job.ended or begin <= offset:  # answered (or cancelled), or its rows here ran in earlier launches
                    continue
                job.engine_seconds += done.engine_seconds  # each launch of the batch until its rows are done
                first, last = max(piece_start, offset), min(begin, end)  # its rows this launch ran
                if first >= last:
                    continue
                if job.images is None:
                    job.images = np.empty((len(job.rows), *done.images.shape[1:]), np.uint8)
                job.images[start - piece_start + first:start - piece_start + last] = \
                    done.images[first - offset:last - offset]
                job.finished += last - first
                # a cancelled job has no rows left queued: it ends when its running rows do
                if job.finished == len(job.rows) or (job.cancelled and job.finished == job.taken):
                    self._finish(job)

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        with self._cond:
            if job.ended:
                return
            job.ended = True
            self._held.discard(job)
            if job in self._jobs:  # a failed batch fails the rest of its jobs too
                self._jobs.remove(job)
                self._queued -= job.left
            self._running -= 1 if job.started is not None else 0
            job.started = job.started or time.monotonic()
            job.finished = len(job.rows)
            self._cond.notify_all()

        def resolve() -> None:
            if not job.future.done():
                job.future.set_exception(error) if error else job.future.set_result(job.images)

        try:
            job.loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # its event loop is closed (the server is shutting down): nobody waits for it
            log.warning("model %s: a request's event loop is closed; its answer is dropped", self.name)
