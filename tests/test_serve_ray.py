"""`lcmtrt serve --ray` on a local Ray instance (2 CPUs, 2 replicas of half a CPU each, the tiny bundle): requests
spread over both replicas and each response names its replica; every replica counts what it served in /metrics;
overload is still lcmtrt's OpenAI-shaped 503; killing a replica under load loses nothing silently and Ray brings it
back; the Ray instance and every process it started are gone after SIGTERM. Skipped where Ray Serve is absent."""

from __future__ import annotations

import base64
import collections
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcmtrt.cli.main import main

KEY = "test-key"


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree[parent].append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


class RayServer:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self.served: collections.Counter[str] = collections.Counter()  # 200s seen per replica id
        self.lock = threading.Lock()

    def request(self, method: str, path: str, payload: object = None, timeout: float = 60) -> tuple[int, dict, object]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            body = None if payload is None else json.dumps(payload).encode()
            connection.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                                 "Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        headers = {k.lower(): v for k, v in response.getheaders()}
        parsed = json.loads(data) if "json" in headers.get("content-type", "") else data.decode()
        if response.status == 200 and path.startswith("/v1/images/"):
            with self.lock:
                self.served[headers["x-lcmtrt-replica"]] += 1
        return response.status, headers, parsed

    def generate(self, prompt: str, seed: int, n: int = 1) -> tuple[int, dict, object]:
        return self.request("POST", "/v1/images/generations", {"model": "tiny", "prompt": prompt, "seed": seed, "n": n})

    def replica_pids(self) -> list[int]:
        return [pid for pid in descendants(self.process.pid) if alive(pid) and
                b"ServeReplica:lcmtrt" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    def metrics_by_replica(self, tries: int = 40) -> dict[str, float]:
        """lcmtrt_replica_requests_total of each replica: /metrics answers from one replica at a time."""
        found: dict[str, float] = {}
        for _ in range(tries):
            status, headers, text = self.request("GET", "/metrics")
            assert status == 200
            for line in text.splitlines():
                if line.startswith("lcmtrt_replica_requests_total{"):
                    replica = line.split('replica="', 1)[1].split('"', 1)[0]
                    assert replica == headers["x-lcmtrt-replica"]  # a replica reports only itself
                    found[replica] = float(line.rsplit(" ", 1)[1])
            if len(found) >= len(self.replica_pids()):
                break
        return found


@pytest.fixture(scope="module")
def ray_server(tiny_sd15_bundle: Path, tmp_path_factory) -> RayServer:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'lcmtrt[ray]')")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve-ray") / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "lcmtrt.cli.main", "serve", "--ray", "--replicas", "2",
                                "--cpus-per-replica", "0.5", "--engines", f"tiny={tiny_sd15_bundle}", "--port",
                                str(port), "--api-key", KEY, "--max-queue", "8", "--max-batch-wait-ms", "50"],
                               stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    server = RayServer(process, port, log)
    started = []
    try:
        for _ in range(1800):  # Ray's start, then two replicas loading and warming the tiny bundle
            if process.poll() is not None:
                raise AssertionError(f"lcmtrt serve --ray exited {process.returncode}: {log.read_text()[-4000:]}")
            if "ready: 2 replica(s)" in log.read_text():
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"not ready: {log.read_text()[-4000:]}")
        yield server
    finally:
        started = descendants(process.pid)  # Ray's GCS, raylet, workers: all must end with the command
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        leaked = [pid for pid in started if alive(pid)]
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, f"processes left running after SIGTERM: {leaked}"
        assert code == 0, log.read_text()[-4000:]


def image(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))))


def test_requests_spread_over_both_replicas_and_each_counts_its_own(ray_server: RayServer,
                                                                    tiny_sd15_bundle: Path) -> None:
    from lcmtrt.runtime.pipeline import Pipeline

    status, headers, body = ray_server.generate("a red fox", 7)  # alone: `infer "a red fox" --seed 7` exactly
    assert status == 200 and headers["x-lcmtrt-batch-images"] == "1"
    expected = Pipeline.load(tiny_sd15_bundle).generate(["a red fox"], seed=7).images[0]
    np.testing.assert_array_equal(image(body), expected)

    answers: list[tuple[int, dict, object]] = []
    threads = [threading.Thread(target=lambda i=i: answers.append(ray_server.generate(f"boat {i}", i)))
               for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 12 and all(status == 200 for status, _, _ in answers)
    replicas = collections.Counter(headers["x-lcmtrt-replica"] for _, headers, _ in answers)
    assert len(replicas) == 2, replicas  # Ray routed whole requests to both

    counted = ray_server.metrics_by_replica()
    assert set(counted) == set(ray_server.served), (counted, ray_server.served)
    assert all(counted[replica] == ray_server.served[replica] for replica in counted), (counted, ray_server.served)


def test_overload_is_answered_by_lcmtrt_with_openai_503(ray_server: RayServer) -> None:
    """24 requests of 2 images at once on 2 replicas that each queue 8 images: lcmtrt's 503, not Ray's."""
    answers: list[tuple[int, dict, object]] = []
    threads = [threading.Thread(target=lambda i=i: answers.append(ray_server.generate(f"flood {i}", i, n=2)))
               for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 24 and {status for status, _, _ in answers} <= {200, 503}
    refused = [(headers, body) for status, headers, body in answers if status == 503]
    assert refused and any(status == 200 for status, _, _ in answers)
    for headers, body in refused:
        assert body["error"]["code"] == "queue_full" and int(headers["retry-after"]) >= 1
        assert headers["x-lcmtrt-replica"]  # answered inside a replica, by lcmtrt's admission control


def test_killed_replica_loses_no_request_and_ray_brings_it_back(ray_server: RayServer) -> None:
    before = ray_server.replica_pids()
    assert len(before) == 2
    outcomes: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            outcomes[i] = ray_server.generate(f"under load {i}", i)
        except OSError as e:  # a dropped connection: the client knows and can retry
            outcomes[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # requests admitted and queued on both replicas
    os.kill(before[0], signal.SIGKILL)
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    retry = []
    for i, outcome in outcomes.items():
        if isinstance(outcome, OSError):
            retry.append(i)
            continue
        status, headers, body = outcome
        if status == 200:
            assert len(body["data"]) == 1 and image(body).shape == (64, 64, 3)
        else:  # OpenAI-shaped and retryable: the proxy's middleware or lcmtrt itself answered
            assert status == 503 and set(body["error"]) == {"message", "type", "param", "code"}, (status, body)
            assert int(headers["retry-after"]) >= 1
            retry.append(i)
    assert len(outcomes) == 16
    for i in retry:  # each failed request succeeds when the client retries it
        assert ray_server.generate(f"under load {i}", i)[0] == 200

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = ray_server.replica_pids()
        if len(pids) == 2 and before[0] not in pids:
            break
        time.sleep(0.5)
    assert len(ray_server.replica_pids()) == 2, "Ray did not bring the replica back"
    seen: set[str] = set()
    while len(seen) < 2 and time.monotonic() < deadline:  # both serve (the new one once it is warmed)
        status, headers, _ = ray_server.generate("after the kill", 1)
        if status == 200:
            seen.add(headers["x-lcmtrt-replica"])
        else:
            time.sleep(0.5)
    assert len(seen) == 2, seen


def test_ray_mistakes_are_one_line(tiny_sd15_bundle: Path, monkeypatch, capsys) -> None:
    bundle = str(tiny_sd15_bundle)
    assert main(["serve", "--engines", bundle, "--replicas", "2"]) == 2
    assert "only apply with --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "--engines", bundle, "--ray"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lcmtrt[ray]'" in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    pytest.importorskip("ray.serve")
    for flags, words in ((["--replicas", "0"], "--replicas 0"), (["--gpus-per-replica", "-1"], "--gpus-per-replica"),
                         (["--ray-address", "127.0.0.1:1"], "nothing answers there"),
                         (["--ray-address", "no-port"], "HOST:PORT")):
        assert main(["serve", "--engines", bundle, "--ray", *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_app_builder_checks_its_arguments_as_serve_checks_its_flags(monkeypatch) -> None:
    """`serve run lcmtrt.serve.ray_app:app_builder key=value` goes through serve's own checks (serve/config.py), Ray
    not started: ranges, contradictions and keys are one-line UserErrors naming the argument."""
    pytest.importorskip("ray.serve")
    import re

    from lcmtrt.errors import UserError
    from lcmtrt.serve.ray_app import app_builder

    monkeypatch.delenv("LCMTRT_API_KEY", raising=False)
    base = {"engines": "tiny=/no/such/bundle"}  # bundles are read by the replicas, not here
    for args, words in (({"max_n": "nan"}, "max_n nan: must be an integer in [1, 1024]"),
                        ({"max_n": 4.5}, "max_n 4.5: must be an integer"),
                        ({"max_batch_wait_ms": float("inf")}, "max_batch_wait_ms inf: must be a finite number"),
                        ({"request_timeout_s": "0"}, "request_timeout_s 0: must be a finite number in (0, 86400]"),
                        ({"max_body_mb": True}, "max_body_mb True: must be"),
                        ({"max_queue": 4, "max_n": 8}, "max_n 8 is above max_queue 4"),
                        ({"replicas": "0"}, "replicas 0: must be an integer in [1, 1024]"),
                        ({"cpus_per_replica": -1}, "cpus_per_replica -1: must be"),
                        ({"gpus_per_replica": "nan"}, "gpus_per_replica nan: must be"),
                        ({"api_keys": "good,"}, "api_keys: a key is empty")):
        with pytest.raises(UserError, match=re.escape(words)):
            app_builder({**base, **args})
    from lcmtrt.serve.ray_app import builder_configs

    config, ray_config = builder_configs({**base, "max_n": "2", "max_queue": 8, "max_batch_wait_ms": "2.5",
                                          "replicas": "3", "cpus_per_replica": 0.5, "api_keys": "a,b"})
    assert (config.max_n, config.max_queue, config.max_batch_wait_ms, config.api_keys) == (2, 8, 2.5, ("a", "b"))
    assert (ray_config.replicas, ray_config.cpus_per_replica, ray_config.gpus_per_replica) == (3, 0.5, 0.0)
