"""`lcmtrt serve` in this process (uvicorn in a thread, on 127.0.0.1), with hooks in its image work, its batches and
its worker: image decoding and fitting leave the event loop free; a failed batch fails its requests only; a dead
worker is reported by /ready and fails its requests at once; a batch waits only for company heading to its model,
never for a request refused by the key check. Every wait is bounded; nothing is timed."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")

import uvicorn  # noqa: E402

from lcmtrt.runtime.rows import BatchKey, PreparedRows  # noqa: E402
from lcmtrt.serve import api  # noqa: E402
from lcmtrt.serve import app as app_module  # noqa: E402
from lcmtrt.serve import edits as edits_module  # noqa: E402
from lcmtrt.serve.app import ServeConfig, ServeState, create_app, load_models  # noqa: E402
from lcmtrt.serve.batcher import Batcher, BatcherConfig  # noqa: E402

KEY = "fault-key"
WAIT_S = 30.0  # the bound on every wait for something that must happen


class Hold:
    """Wraps a function: the first `times` calls stop inside it until released (at most WAIT_S)."""

    def __init__(self, function: Callable[..., Any], times: int = 1):
        self.function, self.times = function, times
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.times > 0:
            self.times -= 1
            self.entered.set()
            self.release.wait(WAIT_S)
        return self.function(*args, **kwargs)


class Served:
    def __init__(self, state: ServeState, port: int, records: list[logging.LogRecord]):
        self.state, self.port, self.records = state, port, records

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                key: str | None = KEY, timeout: float = WAIT_S) -> tuple[int, dict, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        kind = response.getheader("content-type", "")
        return response.status, dict(response.getheaders()), json.loads(data) if "json" in kind else data

    def generate(self, model: str, prompt: str, **kwargs: Any) -> tuple[int, dict, Any]:
        body = json.dumps({"model": model, "prompt": prompt, "seed": 1, **kwargs}).encode()
        return self.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def serving(models: list[tuple[str, Path]], **settings: Any) -> Iterator[Served]:
    """load_models + create_app under uvicorn in a thread; yields once every model is ready."""
    state = load_models(ServeConfig(models, api_keys=(KEY,), **settings))
    records, root = Records(), logging.getLogger("lcmtrt")
    root.addHandler(records)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(state), lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    served = Served(state, listener.getsockname()[1], records.records)
    try:
        for _ in range(int(WAIT_S * 10)):
            with contextlib.suppress(OSError):
                if served.request("GET", "/ready", key=None, timeout=5)[0] == 200:
                    break
            threading.Event().wait(0.1)
        else:
            raise AssertionError("the in-process server did not get ready")
        yield served
    finally:
        server.should_exit = True
        thread.join(90)
        listener.close()
        root.removeHandler(records)


def assert_openai_error(status: int, body: Any, expected: int, code: str) -> None:
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body


def png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    array = np.stack([np.broadcast_to(ramp, (height, width))] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["answer"] = call()
        except BaseException as e:  # noqa: BLE001 - the test reads it
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_health_answers_while_a_large_edit_is_decoded_and_fitted(tiny_sd15_bundle: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from test_serve import multipart

    decode, fit = Hold(api.decode_image), Hold(api.fit_image)
    monkeypatch.setattr(edits_module, "decode_image", decode)  # the image part; a mask is decoded in the same call
    monkeypatch.setattr(api, "fit_image", fit)
    with serving([("tiny", tiny_sd15_bundle)]) as served:
        body, kind = multipart({"model": "tiny", "prompt": "a large edit", "strength": "0.5"},
                               {"image": ("large.png", png(2048, 2048))})
        edit, result = in_thread(lambda: served.request("POST", "/v1/images/edits", body, {"Content-Type": kind}))
        try:
            for stage in (decode, fit):  # each stops inside its image work until /health has answered
                assert stage.entered.wait(WAIT_S), result
                status, _, answer = served.request("GET", "/health", key=None, timeout=10)
                assert status == 200 and answer == {"status": "ok"}
                stage.release.set()
        finally:
            decode.release.set()
            fit.release.set()
            edit.join(WAIT_S * 2)
        status, _, answer = result["answer"]
        assert status == 200 and len(answer["data"]) == 1, answer


@pytest.mark.parametrize("where", ["engines", "batch callback"])
def test_a_failed_batch_fails_its_request_and_the_next_ones_are_served(tiny_sd15_bundle: Path, where: str) -> None:
    with serving([("tiny", tiny_sd15_bundle)], max_batch_wait_ms=0, request_timeout_s=20) as served:
        batcher = served.state.batchers["tiny"]
        failures = [RuntimeError(f"injected failure in the {where}")]

        def fail_once(function: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(*args: Any) -> Any:
                if failures:
                    raise failures.pop()
                return function(*args)
            return wrapped

        if where == "engines":
            batcher.pipeline.run_pieces = fail_once(batcher.pipeline.run_pieces)
        else:  # after the engines: the metrics callback (as the result copy or an answer could) fails
            batcher._on_batch = fail_once(batcher._on_batch)
        status, _, answer = served.generate("tiny", "fails")
        if where == "engines":
            assert_openai_error(status, answer, 500, "internal_error")
        else:  # a request is answered as soon as its rows are read, before the batch's callback runs
            assert status == 200 and len(answer["data"]) == 1, answer
        logged = lambda: any(r.exc_info and f"injected failure in the {where}" in str(r.exc_info[1])
                             for r in served.records)
        for _ in range(int(WAIT_S * 50)):  # the callback runs (and fails) after the answer was sent
            if logged():
                break
            threading.Event().wait(0.02)
        assert logged()
        for seed in (2, 3):
            status, _, answer = served.generate("tiny", "served after it", seed=seed)
            assert status == 200 and len(answer["data"]) == 1, answer
        assert served.request("GET", "/ready", key=None)[0] == 200 and batcher.failed is None


def test_a_dead_worker_fails_its_requests_at_once_and_ready_says_so(tiny_sd15_bundle: Path) -> None:
    with serving([("tiny", tiny_sd15_bundle)], max_batch_wait_ms=0, request_timeout_s=20) as served:
        batcher = served.state.batchers["tiny"]
        running = Hold(batcher.pipeline.run_pieces)
        batcher.pipeline.run_pieces = running
        first, first_result = in_thread(lambda: served.generate("tiny", "running when the worker dies"))
        try:
            assert running.entered.wait(WAIT_S)
            queued, queued_result = in_thread(lambda: served.generate("tiny", "queued when the worker dies", seed=2))
            for _ in range(int(WAIT_S * 50)):
                if batcher.queued_images == 1:
                    break
                threading.Event().wait(0.02)
            assert batcher.queued_images == 1

            def broken() -> None:
                raise RuntimeError("injected bug outside any batch")

            batcher._next_batch = broken  # the worker calls it once the running batch is done
        finally:
            running.release.set()
        first.join(WAIT_S)
        queued.join(WAIT_S)
        assert first_result["answer"][0] == 200  # its batch was done before the worker died
        assert_openai_error(*queued_result["answer"][::2], 500, "worker_failed")
        status, _, ready = served.request("GET", "/ready", key=None)
        assert status == 503 and ready["models"] == {"tiny": "failed"} and not ready["ready"]
        assert_openai_error(*served.generate("tiny", "after it died", seed=3)[::2], 500, "worker_failed")
        assert served.request("GET", "/health", key=None)[0] == 200
        assert 'lcmtrt_model_ready{model="tiny"} 0.0' in served.request("GET", "/metrics", key=None)[2].decode()
        died = [r for r in served.records if "worker thread stopped" in r.getMessage()]
        assert died and "injected bug outside any batch" in str(died[0].exc_info[1])


def test_a_batch_waits_only_for_company_heading_to_its_model(tiny_sd15_bundle: Path) -> None:
    """A batch of model a may wait a minute for company; b's request being prepared is not company for it."""
    models = [("a", tiny_sd15_bundle), ("b", tiny_sd15_bundle)]
    with serving(models, max_batch_wait_ms=60_000, request_timeout_s=60) as served:
        state, b = served.state, served.state.batchers["b"]
        preparing = Hold(b.pipeline.prepare)
        b.pipeline.prepare = preparing
        to_b, b_result = in_thread(lambda: served.generate("b", "on its way to b"))
        try:
            assert preparing.entered.wait(WAIT_S)
            assert state.batchers["b"]._company_coming() and not state.batchers["a"]._company_coming()
            status, headers, answer = served.generate("a", "alone at a")  # answered while b's is still held
            assert status == 200 and headers["x-lcmtrt-batch-images"] == "1", answer
            assert not preparing.release.is_set() and to_b.is_alive()
        finally:
            preparing.release.set()
            to_b.join(WAIT_S * 2)
        assert b_result["answer"][0] == 200


def test_a_request_refused_by_the_key_check_is_not_company(tiny_sd15_bundle: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    refusal = app_module._Gate._refusal

    def watched(gate: Any, scope: dict) -> Any:  # the company each model's batches expect while the key is checked
        seen.append({name: batcher._company_coming() for name, batcher in gate.state.batchers.items()})
        return refusal(gate, scope)

    monkeypatch.setattr(app_module._Gate, "_refusal", watched)
    with serving([("a", tiny_sd15_bundle), ("b", tiny_sd15_bundle)]) as served:
        body = json.dumps({"model": "a", "prompt": "no key"}).encode()
        for key in (None, "wrong"):
            status, _, answer = served.request("POST", "/v1/images/generations", body,
                                               {"Content-Type": "application/json"}, key=key)
            assert_openai_error(status, answer, 401, "invalid_api_key")
        assert seen[-2:] == [{"a": False, "b": False}] * 2
        assert served.state.arriving == {None: 0}


def test_company_is_counted_per_model() -> None:
    nudged: list[str] = []
    batchers = {name: SimpleNamespace(nudge=lambda name=name: nudged.append(name)) for name in ("a", "b")}
    state = ServeState(None, {}, batchers, None)  # type: ignore[arg-type]
    upload, known = {}, {}
    state.expect(upload)  # body not read yet: it may be for any model
    assert state.company_coming("a") and state.company_coming("b")
    state.expect(known)
    state.heading_to(known, "b")
    state.arrived(upload)
    assert state.company_coming("b") and not state.company_coming("a") and nudged
    state.heading_to(known, "a")  # its model is settled once
    state.arrived(known)
    state.arrived(known)  # once per request
    assert not state.company_coming("a") and not state.company_coming("b")
    assert state.arriving == {None: 0, "b": 0}


class HeldPipeline:
    """A fake Pipeline: images of zeros; the first run stops until released."""

    def __init__(self) -> None:
        self.hold = Hold(lambda rows: SimpleNamespace(images=np.zeros((len(rows), 2, 2, 3), np.uint8),
                                                      batches=[len(rows)], engine_seconds=0.0))

    def run_pieces(self, rows: PreparedRows) -> Any:
        yield 0, self.hold(rows)  # one launch holding every row


def rows(count: int) -> PreparedRows:
    return PreparedRows(BatchKey("plan", False, False), {}, frozenset(), [], np.zeros((count, 1), np.float32), None,
                        {})


def test_a_closed_event_loop_does_not_end_the_worker() -> None:
    pipeline = HeldPipeline()
    batcher = Batcher("fake", lambda: pipeline, BatcherConfig(2, 0.0, 8), company_coming=lambda: False)
    batcher.start()
    assert batcher.ready.wait(WAIT_S)
    gone, loop = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        batcher.submit(rows(1), gone)
        assert pipeline.hold.entered.wait(WAIT_S)
        gone.close()  # its server's loop closed while its batch ran: the answer cannot be delivered
        pipeline.hold.release.set()
        job = batcher.submit(rows(1), loop)
        images = loop.run_until_complete(asyncio.wait_for(job.future, WAIT_S))
        assert images.shape == (1, 2, 2, 3) and batcher.failed is None
    finally:
        pipeline.hold.release.set()
        loop.close()
        batcher.stop()
        batcher.join(WAIT_S)
