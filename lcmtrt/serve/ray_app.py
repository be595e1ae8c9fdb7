"""`lcmtrt serve` on Ray Serve: the single-host app, unchanged, as the ingress of every replica.

Each replica process loads its bundles with `load_models` and serves `create_app`'s FastAPI app, so batching,
admission (queue-full 503 + Retry-After) and OpenAI-shaped errors are lcmtrt's own, inside the replica. Ray routes
whole requests to replicas; Ray's per-replica limit is set above what lcmtrt admits, so overload is answered by
lcmtrt, not by Ray's router. What Ray's proxy itself answers (a replica died mid-request, no replica running, its
own backpressure) is rewritten into the same OpenAI error JSON by `proxy_middlewares`, which Ray's proxy loads from
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH.

Entry points: `lcmtrt serve --ray` (serve_ray_process.py), and `serve run` / `serve deploy` on `app_builder`:
    serve run lcmtrt.serve.ray_app:app_builder engines=artifacts/tiny-sd15 replicas=2
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from starlette.middleware import Middleware

from lcmtrt.errors import UserError
from lcmtrt.runtime.backends.devices import parse_device
from lcmtrt.serve.app import ServeConfig, ServeState, create_app, load_models
from lcmtrt.serve.config import (RAY_DEFAULTS, SERVE_DEFAULTS, check_api_keys, check_ray_settings, check_serve_settings,
                                 parse_models)

log = logging.getLogger("lcmtrt.serve")
APP_NAME = "lcmtrt"
DEPLOYMENT_NAME = "LcmtrtReplica"  # the name a `serve deploy` YAML uses to set replicas, GPUs and autoscaling
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "lcmtrt.serve.ray_app:proxy_middlewares"


@dataclass
class RayConfig:
    replicas: int = 1
    address: str | None = None  # None: start a local Ray instance for this command
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    object_store_mb: int = 512  # a local instance's shared memory; responses are small, /dev/shm may be too


# Ray runs one replica per actor process: the builder Ray calls after __init__ finds that replica's models here.
# (Set and read only through module-level functions: Ray ships the deployment class by value, with its own globals.)
_replica_state: ServeState | None = None


def _load_replica_models(config: ServeConfig) -> ServeState:
    global _replica_state
    _replica_state = load_models(config)
    return _replica_state


def _build_replica_app() -> FastAPI:
    """Ray calls this in the replica after LcmtrtReplica.__init__: the single-host app over the replica's models."""
    return create_app(_replica_state, ready_before_serving=True)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(_build_replica_app)
class LcmtrtReplica:
    """One replica: its own bundles, batchers and metrics; Ray marks it ready once every model is warmed."""

    def __init__(self, config: ServeConfig) -> None:
        _log_to_stderr()
        replica = _replica_id()
        self.state = _load_replica_models(dataclasses.replace(config, replica=replica))
        log.info("replica %s (pid %d): loading %s", replica, os.getpid(), ", ".join(self.state.cards))

    def check_health(self) -> None:
        """Ray's periodic probe: a model that failed to load, or whose worker thread stopped, makes Ray replace this
        replica."""
        failed = [name for name, b in self.state.batchers.items() if b.failed is not None]
        if failed:
            raise RuntimeError(f"model {failed[0]} failed: {self.state.batchers[failed[0]].failed}")


def _replica_id() -> str:
    context = serve.get_replica_context()
    replica_id = getattr(context, "replica_id", None)  # Ray >= 2.10; replica_tag before
    return replica_id.unique_id if replica_id is not None else str(context.replica_tag)


def _log_to_stderr() -> None:
    """lcmtrt's INFO lines (model loading, one access line per request) on the replica's stderr, which Ray keeps."""
    root = logging.getLogger("lcmtrt")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def deployment_options(config: ServeConfig, ray_config: RayConfig) -> dict[str, Any]:
    """Ray's limits sit above lcmtrt's admission (at most max_queue images queued plus a running batch per model),
    so a busy replica answers 503 itself rather than Ray queueing or refusing in plain text."""
    ongoing = len(config.models) * 2 * config.max_queue + 16
    actor = {"num_cpus": ray_config.cpus_per_replica}
    if ray_config.gpus_per_replica:
        actor["num_gpus"] = ray_config.gpus_per_replica
    return {"num_replicas": ray_config.replicas, "ray_actor_options": actor, "max_ongoing_requests": ongoing,
            "max_queued_requests": ongoing, "graceful_shutdown_timeout_s": min(config.request_timeout_s, 600.0)}


def build_app(config: ServeConfig, ray_config: RayConfig) -> Any:
    """The Ray Serve application: LcmtrtReplica x replicas, each with every bundle in `config`."""
    return LcmtrtReplica.options(**deployment_options(config, ray_config)).bind(config)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run lcmtrt.serve.ray_app:app_builder engines=DIR[,NAME=DIR] [replicas=N] ...` and the
    `import_path` of a `serve deploy` config; the keys are `lcmtrt serve`'s flags with underscores, checked as the
    command checks its flags (serve/config.py) before anything is built."""
    config, ray_config = builder_configs(args)
    return build_app(config, ray_config)


def builder_configs(args: dict[str, Any]) -> tuple[ServeConfig, RayConfig]:
    """app_builder's arguments checked (ranges, contradictions, keys) into the configs, or a one-line UserError."""
    known = {"engines", "device", "api_keys", *SERVE_DEFAULTS, *RAY_DEFAULTS}
    unknown = sorted(set(args) - known)
    if unknown or "engines" not in args:
        raise UserError(f"lcmtrt app arguments: engines is required; unknown {unknown}; known {sorted(known)}")
    numbers = check_serve_settings({k: v for k, v in args.items() if k in SERVE_DEFAULTS}, spell=str)
    ray_numbers = check_ray_settings({k: v for k, v in args.items() if k in RAY_DEFAULTS}, spell=str)
    specs, keys = _listed(args["engines"]), _listed(args.get("api_keys", []))
    if not specs or not all(isinstance(spec, str) and spec for spec in specs):
        raise UserError(f"engines {args['engines']!r}: give DIR or NAME=DIR, comma-separated or as a list")
    keys = check_api_keys([*keys, *(k for k in os.environ.get("LCMTRT_API_KEY", "").split(",") if k)], "api_keys")
    device = parse_device(str(args.get("device", "auto")))  # as --device is read; each replica maps it on load
    config = ServeConfig(parse_models(specs), device=device, max_n=numbers["max_n"],
                         max_batch_wait_ms=numbers["max_batch_wait_ms"], max_queue=numbers["max_queue"],
                         max_body_mb=numbers["max_body_mb"], request_timeout_s=numbers["request_timeout_s"],
                         api_keys=keys, max_step_programs=int(numbers["max_step_programs"]))
    return config, RayConfig(ray_numbers["replicas"], None, ray_numbers["gpus_per_replica"],
                             ray_numbers["cpus_per_replica"])


def _listed(value: Any) -> list[Any]:
    """`a,b` (serve run's key=value) or a YAML list; anything else is one item, refused by the checks."""
    return value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]


class OpenAIShapedProxyErrors:
    """ASGI middleware in Ray's HTTP proxy: an error Ray itself answers (plain text, or nothing when the replica
    died mid-request) becomes OpenAI's error JSON; 5xx becomes 503 + Retry-After, since a retry reaches a live
    replica. lcmtrt's own answers are JSON already and pass untouched."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, held = [False], [None]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and b"json" not in kind:
                    held[0] = message  # Ray's own error: its plain-text body is replaced below
                    return
                started[0] = True
            elif held[0] is not None:
                return
            await send(message)

        await self.app(scope, receive, sending)
        if started[0]:
            return
        status = held[0]["status"] if held[0] is not None else 500
        retry = dict(held[0].get("headers", [])).get(b"retry-after", b"1") if held[0] is not None else b"1"
        await _send_error(send, status, retry)


async def _send_error(send: Any, status: int, retry_after: bytes) -> None:
    if status in (404, 405):
        message, code = f"no route here (Ray Serve answered {status})", "not_found"
    else:
        status, code = 503, "replica_unavailable"
        message = "no lcmtrt replica could answer this request (one stopped or none is running yet); retry"
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", retry_after))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy calls this when RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names it."""
    return [Middleware(OpenAIShapedProxyErrors)]


def check_bundles(config: ServeConfig) -> None:
    """Read each bundle that exists here now, so a mistake fails the command before Ray starts anything."""
    from lcmtrt.bundle import load_bundle

    for name, path in config.models:
        if Path(path).exists():
            load_bundle(path)
        else:
            log.warning("model %s: %s is not on this machine; it must exist at that path on every Ray node",
                        name, path)
