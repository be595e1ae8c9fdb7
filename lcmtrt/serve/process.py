"""The `lcmtrt serve` process: uvicorn on the app, a model that fails to load ends it, and SIGTERM drains.

SIGTERM: /ready turns 503 and new image requests get 503 + Retry-After at once, every accepted request is finished
and answered, then uvicorn closes and the process exits 0. A second SIGTERM or a SIGINT stops as uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from lcmtrt.errors import UserError
from lcmtrt.serve.app import ServeConfig, ServeState, create_app, load_models

log = logging.getLogger("lcmtrt.serve")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServeState):
        super().__init__(config)
        self.state = state
        self.failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn(self._watch_loading())
        await super().serve(sockets)

    def _spawn(self, coroutine: object) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.state.draining and self._loop is not None:
            self.state.draining = True  # set here, in the signal handler: no request is admitted after it
            self._loop.call_soon_threadsafe(self._spawn, self._drain())
            return  # not recorded as a captured signal: uvicorn would re-raise it and the exit code would be 143
        super().handle_exit(sig, frame)

    async def _drain(self) -> None:
        waiting = self.state.in_flight
        log.info("SIGTERM: refusing new requests, finishing %d accepted", waiting)
        while self.state.in_flight:
            await asyncio.sleep(0.02)
        for batcher in self.state.batchers.values():
            batcher.stop()
        log.info("drained; shutting down")
        self.should_exit = True

    async def _watch_loading(self) -> None:
        batchers = list(self.state.batchers.values())
        await asyncio.to_thread(lambda: [b.ready.wait() for b in batchers])
        failed = [b for b in batchers if b.failed is not None]
        if failed:
            self.failure = failed[0].failed
            self.should_exit = True
        else:
            log.info("ready: %s", ", ".join(self.state.batchers))


def run_server(config: ServeConfig) -> int:
    """Serve until SIGTERM (drained, 0) or SIGINT; a bundle that fails to load is a UserError (exit 2)."""
    state = load_models(config)
    uv_config = uvicorn.Config(create_app(state), host=config.host, port=config.port, access_log=False,
                               log_level="info", lifespan="on", timeout_graceful_shutdown=30)
    server = _DrainingServer(uv_config, state)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (and has logged why)
        raise UserError(f"cannot listen on {config.host}:{config.port} (in use, or not an address of this "
                        "host); pick another --host/--port") from None
    if server.failure is not None:
        if isinstance(server.failure, UserError):
            raise server.failure
        raise RuntimeError(f"a model failed to load: {server.failure}") from server.failure
    return 0
