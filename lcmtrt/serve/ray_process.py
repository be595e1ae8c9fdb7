"""`lcmtrt serve --ray`: connect to a Ray cluster (or start a local instance), deploy the app, serve until a signal.

SIGTERM or Ctrl-C deletes the application (Ray stops routing to its replicas and lets each finish its accepted
requests, up to --request-timeout-s), then a local Ray instance started here is shut down with every process it
started. On an existing cluster only the application is removed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from types import FrameType

import ray
from ray import serve

from lcmtrt.errors import UserError
from lcmtrt.serve.app import ServeConfig
from lcmtrt.serve.ray_app import (APP_NAME, PROXY_CALLBACK, PROXY_CALLBACK_ENV, RayConfig, build_app,
                                      check_bundles)

log = logging.getLogger("lcmtrt.serve")
CONNECT_TIMEOUT_S = 5.0  # ray.init waits minutes on an address nobody answers; a TCP probe says so at once


def _probe(address: str) -> None:
    """A clear error for an address nothing listens on (`auto` and `local` are Ray's own lookups)."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: give HOST:PORT of the head node (its GCS, default port 6379), "
                        "ray://HOST:10001, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the cluster "
                        "with `ray start --head` or fix the address") from None


def _connect(config: ServeConfig, ray_config: RayConfig) -> None:
    if ray_config.address is None:
        # the local proxy inherits this process's environment: Ray's own errors become OpenAI-shaped JSON
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        ray.init(include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=ray_config.object_store_mb * 2**20)
        _check_resources(ray_config)
        return
    _probe(ray_config.address)
    try:
        ray.init(address=ray_config.address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--ray-address {ray_config.address}: cannot join that Ray cluster "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if os.environ.get(PROXY_CALLBACK_ENV) != PROXY_CALLBACK:
        log.warning("the cluster's Ray proxies answer their own errors in plain text unless each node was started "
                    "with %s=%s (see README)", PROXY_CALLBACK_ENV, PROXY_CALLBACK)


def _check_resources(ray_config: RayConfig) -> None:
    """On a local instance nothing scales up: replicas that cannot all be placed would wait forever."""
    have = ray.cluster_resources()
    for resource, each in (("CPU", ray_config.cpus_per_replica), ("GPU", ray_config.gpus_per_replica)):
        need = each * ray_config.replicas
        if need > have.get(resource, 0.0) + 1e-9:
            flag = "--cpus-per-replica" if resource == "CPU" else "--gpus-per-replica"
            raise UserError(f"--replicas {ray_config.replicas} x {flag} {each:g} need {need:g} {resource}s; this "
                            f"machine's Ray instance has {have.get(resource, 0.0):g}")


def run_on_ray(config: ServeConfig, ray_config: RayConfig) -> int:
    """Serve on Ray Serve until SIGTERM or Ctrl-C; 0 after a clean stop."""
    check_bundles(config)
    _connect(config, ray_config)
    stop = threading.Event()

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_sigterm)  # after ray.init, which installs its own
    deployed = False
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        log.info("deploying %d replica(s) of %s on Ray ...", ray_config.replicas, ", ".join(n for n, _ in config.models))
        try:
            serve.run(build_app(config, ray_config), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise UserError(f"the Ray deployment did not start: {str(e).splitlines()[0]} (the replica logs under "
                            "/tmp/ray/session_latest/logs/serve say why)") from None
        deployed = True
        log.info("ready: %d replica(s) on Ray at http://%s:%d", ray_config.replicas, config.host, config.port)
        while not stop.wait(0.5):
            pass
        log.info("SIGTERM: removing the application (replicas finish what they accepted)")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _teardown(ray_config, deployed)


def _teardown(ray_config: RayConfig, deployed: bool) -> None:
    try:
        if deployed:
            serve.delete(APP_NAME)
        if ray_config.address is None:
            serve.shutdown()
    finally:
        if ray_config.address is None:
            ray.shutdown()  # also ends the raylet, GCS and workers it started
        log.info("stopped")
