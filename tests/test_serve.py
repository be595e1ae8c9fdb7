"""`lcmtrt serve` as a real process on 127.0.0.1, called with the official openai client and with raw HTTP: images
equal `lcmtrt infer`'s, alone or batched; every mistake gets its status and OpenAI's error JSON; a flood gets 503s
and loses nothing; a disconnected request is not computed; SIGTERM finishes what was accepted and exits 0."""

from __future__ import annotations

import base64
import http.client
import importlib.util
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from conftest import distinct_originals  # noqa: E402
from lcmtrt.bench.serving import server_timing  # noqa: E402
from lcmtrt.cli.main import main  # noqa: E402
from lcmtrt.runtime.images import fit_image  # noqa: E402
from lcmtrt.runtime.pipeline import Pipeline  # noqa: E402

KEY = "test-key"


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                key: str | None = KEY) -> tuple[int, dict, object]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = dict(headers or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        kind = response.getheader("content-type", "")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data) if "json" in kind else data.decode()

    def post_json(self, payload: object, raw: bytes | None = None, **kwargs) -> tuple[int, dict, object]:
        body = raw if raw is not None else json.dumps(payload).encode()
        return self.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"}, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        _, _, text = self.request("GET", "/metrics", key=None)
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0, timeout=120)


def start_server(tmp_path: Path, *args: str) -> Server:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / f"serve-{port}.log"
    process = subprocess.Popen([sys.executable, "-m", "lcmtrt.cli.main", "serve", "--port", str(port),
                                "--api-key", KEY, *args], stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Server(process, port, log)
    for _ in range(600):  # loading and warming the tiny bundles takes seconds
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: {log.read_text()}")
        try:
            if server.request("GET", "/ready", key=None)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"server not ready: {log.read_text()}")


def stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def server(tiny_sd15_bundle: Path, tiny_sd15_canny_bundle: Path, tmp_path_factory) -> Server:
    # --batch-ms: a batch of 2 runs as one launch however fast this host ran each size at warm-up
    running = start_server(tmp_path_factory.mktemp("serve"), "--engines", f"tiny={tiny_sd15_bundle}",
                           "--engines", f"canny={tiny_sd15_canny_bundle}", "--max-batch-wait-ms", "200",
                           "--max-body-mb", "1", "--max-queue", "32", "--batch-ms", "1=10,2=12")
    yield running
    stop(running)


@pytest.fixture(scope="module")
def pipeline(tiny_sd15_bundle: Path) -> Pipeline:
    return Pipeline.load(tiny_sd15_bundle)


def decoded(item) -> np.ndarray:
    data = item["b64_json"] if isinstance(item, dict) else item.b64_json
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(fields: dict[str, str] | list[tuple[str, str]], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart body; `fields` as pairs can repeat a name."""
    boundary = "lcmtrt-test-boundary"
    pairs = fields.items() if isinstance(fields, dict) else fields
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in pairs]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
              f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
              for k, (name, data) in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_openai_client_images_equal_infer(server: Server, tiny_sd15_bundle: Path, tiny_sd15_canny_bundle: Path,
                                          tmp_path: Path, capsys) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny", "canny"]
    served = client.images.generate(model="tiny", prompt="a red fox", n=2, size="64x64", extra_body={"seed": 7})
    assert served.size == "64x64" and served.output_format == "png" and len(served.data) == 2
    assert all(item.model_extra["seed"] == 7 for item in served.data)
    out = tmp_path / "fox.png"
    assert main(["-q", "infer", "--engines", str(tiny_sd15_bundle), "a red fox", "--num-images", "2", "--seed", "7",
                 "--output", str(out)]) == 0
    for i, item in enumerate(served.data):
        np.testing.assert_array_equal(decoded(item), np.asarray(Image.open(tmp_path / f"fox-{i}.png")))

    source = np.asarray(Image.open(tmp_path / "fox-0.png"))
    (tmp_path / "source.png").write_bytes(png_bytes(source))
    edited = client.images.edit(model="tiny", image=("source.png", png_bytes(source), "image/png"),
                                prompt="a blue fox", extra_body={"seed": 3, "strength": 0.5, "img2img_mode": "lcm"})
    assert main(["-q", "infer", "--engines", str(tiny_sd15_bundle), "a blue fox", "--image", str(tmp_path / "source.png"),
                 "--strength", "0.5", "--img2img-mode", "lcm", "--seed", "3", "--output", str(tmp_path / "e.png")]) == 0
    np.testing.assert_array_equal(decoded(edited.data[0]), np.asarray(Image.open(tmp_path / "e.png")))

    control = np.zeros((80, 96, 3), np.uint8)
    control[20:60, 30:70] = 255
    (tmp_path / "control.png").write_bytes(png_bytes(control))
    guided = client.images.generate(model="canny", prompt="a house", extra_body={
        "seed": 2, "control_image": base64.b64encode(png_bytes(control)).decode(), "control_scale": 0.7})
    assert main(["-q", "infer", "--engines", str(tiny_sd15_canny_bundle), "a house", "--control-image",
                 str(tmp_path / "control.png"), "--control-scale", "0.7", "--seed", "2",
                 "--output", str(tmp_path / "c.png")]) == 0
    np.testing.assert_array_equal(decoded(guided.data[0]), np.asarray(Image.open(tmp_path / "c.png")))
    jpeg = client.images.generate(model="tiny", prompt="a red fox", output_format="jpeg", extra_body={"seed": 7})
    assert base64.b64decode(jpeg.data[0].b64_json)[:3] == b"\xff\xd8\xff"
    capsys.readouterr()


def test_models_health_metrics_and_keys(server: Server) -> None:
    status, _, listing = server.request("GET", "/v1/models")
    tiny = next(m for m in listing["data"] if m["id"] == "tiny")
    assert status == 200 and tiny["size"] == "64x64" and tiny["batch_sizes"] == [1, 2] and tiny["family"] == "sd15"
    assert tiny["inpaint"] is None and tiny["img2img"] is True
    assert server.request("GET", "/health", key=None)[0] == 200
    assert "batch-invariant" not in server.log.read_text()  # freshly exported bundles need no warning
    assert server.request("GET", "/metrics", key=None)[0] == 200
    for key in (None, "wrong-key", KEY + "x"):
        status, _, body = server.request("GET", "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _, body = server.request("GET", "/v1/nothing")
    assert status == 404 and "error" in body


BOMB_SIDE = 60000


def bomb_png() -> bytes:
    """A PNG header claiming 60000x60000 pixels (3.6 G) with a few bytes of data: refused before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


GOOD = {"model": "tiny", "prompt": "a cat"}
BAD_JSON = [  # (payload, status, param)
    ({**GOOD, "model": "dall-e-3"}, 404, "model"),
    ({"model": "tiny"}, 400, "prompt"),
    ({**GOOD, "prompt": "x" * 100_000}, 400, "prompt"),
    ({**GOOD, "n": 0}, 400, "n"),
    ({**GOOD, "n": 5}, 400, "n"),
    ({**GOOD, "size": "512x512"}, 400, "size"),
    ({**GOOD, "num_inference_steps": 0}, 400, "num_inference_steps"),
    ({**GOOD, "num_inference_steps": 51}, 400, "num_inference_steps"),
    ({**GOOD, "guidance_scale": -1}, 400, "guidance_scale"),
    ({**GOOD, "seed": "abc"}, 400, "seed"),
    ({**GOOD, "seed": 1.5}, 400, "seed"),
    ({**GOOD, "seed": -1}, 400, "seed"),
    ({**GOOD, "seed": 2**64}, 400, "seed"),
    ({**GOOD, "response_format": "url"}, 400, "response_format"),
    ({**GOOD, "unknown_field": 1}, 400, "unknown_field"),
    ({**GOOD, "control_image": "aGVsbG8="}, 400, "control_image"),
    ({"model": "canny", "prompt": "a cat"}, 400, "control_image"),
    ({"model": "canny", "prompt": "a cat", "control_image": "not base64!"}, 400, "control_image"),
    ([1, 2], 400, None),
]


def assert_openai_error(status: int, body: object, expected: int, param: str | None) -> None:
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param and body["error"]["message"], body


def test_bad_input_gets_status_and_openai_error(server: Server) -> None:
    for payload, expected, param in BAD_JSON:
        assert_openai_error(*server.post_json(payload)[::2], expected, param)
    for raw in (b'{"prompt": ', b'{"model": "tiny", "prompt": "x", "guidance_scale": NaN}',
                b'{"model": "tiny", "prompt": "x", "guidance_scale": Infinity}', b"\xff\xfe"):
        status, _, body = server.post_json(None, raw=raw)
        assert status == 400 and body["error"]["message"], (raw, body)
    status, _, body = server.request("POST", "/v1/images/generations", b"prompt=x", {"Content-Type": "text/plain"})
    assert_openai_error(status, body, 400, None)
    status, _, body = server.post_json(None, raw=b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert_openai_error(status, body, 413, None)

    source = png_bytes(np.full((64, 64, 3), 128, np.uint8))
    edits = [({"prompt": "x", "strength": "0"}, {"image": ("a.png", source)}, "strength"),
             ({"prompt": "x", "strength": "1.5"}, {"image": ("a.png", source)}, "strength"),
             ({"prompt": "x"}, {"image": ("a.png", b"this is not an image")}, "image"),
             ({"prompt": "x"}, {"image": ("a.png", bomb_png())}, "image"),
             ({"prompt": "x"}, {"image": ("a.png", source), "mask": ("m.png", png_bytes(np.zeros((64, 64, 4),
                                                                                        np.uint8)))}, "mask"),
             ({"prompt": "x"}, {}, "image")]
    for fields, files, param in edits:
        body, kind = multipart({"model": "tiny", **fields}, files)
        status, _, answer = server.request("POST", "/v1/images/edits", body, {"Content-Type": kind})
        assert_openai_error(status, answer, 400, param)
        if "mask" in files:  # a well-formed mask on a bundle without inpainting: how to build one
            assert "build-engines --inpaint" in answer["error"]["message"], answer
    status, _, answer = server.request("POST", "/v1/images/edits", b"{}", {"Content-Type": "application/json"})
    assert_openai_error(status, answer, 400, None)
    status, _, answer = server.post_json({**GOOD, "seed": 1})  # still serving
    assert status == 200 and len(answer["data"]) == 1


def post_edit(server: Server, fields: list[tuple[str, str]], image: bytes) -> tuple[int, dict]:
    body, kind = multipart([("model", "tiny"), *fields], {"image": ("source.png", image)})
    status, _, answer = server.request("POST", "/v1/images/edits", body, {"Content-Type": kind})
    return status, answer


def test_edit_takes_timesteps_as_comma_separated_or_repeated_form_fields(server: Server, tiny_sd15_bundle: Path,
                                                                          tmp_path: Path, capsys) -> None:
    """A multipart edit spells the JSON list timesteps [999, 499] as `-F timesteps=999,499` or as repeated fields:
    both are infer's --timesteps 999,499 on the same image."""
    source = np.linspace(0, 255, 64 * 64 * 3).astype(np.uint8).reshape(64, 64, 3)
    (tmp_path / "source.png").write_bytes(png_bytes(source))
    common = [("prompt", "a blue fox"), ("seed", "3"), ("strength", "1.0"), ("scheduler", "tcd"), ("eta", "0.3")]
    status, comma = post_edit(server, [*common, ("timesteps", "999,499")], png_bytes(source))
    assert status == 200, comma
    status, repeated = post_edit(server, [*common, ("timesteps", "999"), ("timesteps", "499")], png_bytes(source))
    assert status == 200, repeated
    assert main(["-q", "infer", "--engines", str(tiny_sd15_bundle), "a blue fox", "--image",
                 str(tmp_path / "source.png"), "--strength", "1.0", "--scheduler", "tcd", "--eta", "0.3", "--timesteps", "999,499", "--seed", "3",
                 "--output", str(tmp_path / "e.png")]) == 0
    expected = np.asarray(Image.open(tmp_path / "e.png"))
    np.testing.assert_array_equal(decoded(comma["data"][0]), expected)
    np.testing.assert_array_equal(decoded(repeated["data"][0]), expected)
    status, answer = post_edit(server, [*common, ("timesteps", "999,-5")], png_bytes(source))
    assert_openai_error(status, answer, 400, "timesteps")
    capsys.readouterr()


@pytest.mark.parametrize("fields,param,start", [
    ({"scheduler": "lcm", "timesteps": [999, -5]}, "timesteps", "timesteps 999,-5 must be"),
    ({"scheduler": "euler-trailing", "timesteps": [999, 999]}, "timesteps", "timesteps 999,999 must be"),
    ({"scheduler": "euler-trailing", "eta": 0.5}, "eta", "eta applies to"),
    ({"scheduler": "ddim-trailing", "timesteps": [999, 499]}, "timesteps", "timesteps: DDIMScheduler"),
    ({"num_inference_steps": 3, "timesteps": [999, 499]}, "timesteps", "num_inference_steps 3 and 2 timesteps"),
])
def test_scheduler_refusals_name_the_request_field(server: Server, fields: dict, param: str, start: str) -> None:
    """The shared sampler checks answer a 400 naming the request's field, in its spelling, never infer's flags."""
    status, _, body = server.post_json({**GOOD, **fields})
    assert_openai_error(status, body, 400, param)
    assert body["error"]["message"].startswith(start) and "--" not in body["error"]["message"], body


def test_concurrent_requests_are_batched_and_equal_infer(server: Server, pipeline: Pipeline) -> None:
    requests = [{"model": "tiny", "prompt": f"a painting of a boat, number {i}", "seed": 100 + i,
                 "guidance_scale": 6.0 + i} for i in range(6)]
    launches = server.metric("lcmtrt_engine_launches_total", model="tiny")
    answers: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, server.post_json(requests[i])))
               for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.metric("lcmtrt_engine_launches_total", model="tiny") - launches < len(requests)
    merged = 0
    for i, request in enumerate(requests):
        status, headers, body = answers[i]
        assert status == 200, body
        shared = headers["x-lcmtrt-batch-images"]
        prompt, seed, guidance = request["prompt"], request["seed"], request["guidance_scale"]
        merged += shared != "1"
        timing = server_timing(headers["server-timing"])
        assert set(timing) == {"queue", "engine", "total"} and timing["queue"] + timing["engine"] <= timing["total"]
        # alone or beside another request: `infer PROMPT --seed S` at batch 1, bit for bit (test_batch_invariance.py)
        expected = pipeline.generate([prompt], seed=seed, guidance_scale=guidance).images[0]
        np.testing.assert_array_equal(decoded(body["data"][0]), expected)
    assert merged >= 2


def test_bench_serve_reports_each_level(server: Server, tmp_path: Path, capsys) -> None:
    """bench-serve with the openai client, bounded in requests: every request answered, a row per level."""
    from lcmtrt.cli.main import main

    report_path, plot_path = tmp_path / "serve.json", tmp_path / "serve.png"
    plot = ["--plot", str(plot_path)] if importlib.util.find_spec("matplotlib") else []  # the bench extra
    code = main(["-q", "bench-serve", "--url", f"http://127.0.0.1:{server.port}", "--model", "tiny", "--api-key",
                 KEY, "--concurrency", "1,2", "--requests", "4", "--seconds", "60", "--json", str(report_path), *plot])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    assert all(level["ok"] == 4 and level["lost"] == 0 for level in report["levels"])
    # the server's own time (Server-Timing) is part of what the client waited for
    assert all(0 < level["server_p50_ms"] <= level["p50_ms"] for level in report["levels"])
    text = capsys.readouterr().out
    assert "conc" in text and "p50" in text
    if plot:  # latency and images/s against concurrency
        from lcmtrt.bench.plots import SERVE_SIZE

        with Image.open(plot_path) as image:
            assert image.format == "PNG" and image.size == SERVE_SIZE


def test_ready_says_what_is_warmed(server: Server) -> None:
    """Warm-up binds the default plan at every built batch size, and image-to-image (the API's default strength and
    mode) where the bundle has an encoder; /ready lists them with a run's time per batch size (given here), and
    default requests of either kind then make no step program."""
    status, _, body = server.request("GET", "/ready", key=None)
    assert status == 200 and set(body.get("warmed", {})) == {"tiny", "canny"}
    warmed = body["warmed"]["tiny"]
    kinds = {(p["mode"], p["batch"], p["steps"]) for p in warmed["programs"]}
    assert kinds == {("text-to-image", 1, 4), ("text-to-image", 2, 4), ("image-to-image", 1, 3),
                     ("image-to-image", 2, 3)}  # classic image-to-image at strength 0.8 runs int(4 x 0.8) steps
    assert warmed["batch_ms"] == {"1": 10.0, "2": 12.0} and warmed["batch_ms_source"] == "given"
    programs = server.metric("lcmtrt_step_programs", model="tiny")
    assert 4 <= programs <= 16
    assert server.post_json({**GOOD, "seed": 4})[0] == 200
    body, kind = multipart({"model": "tiny", "prompt": "a cat"}, {"image": ("a.png", png_bytes(np.zeros((64, 64, 3),
                                                                                                       np.uint8)))})
    assert server.request("POST", "/v1/images/edits", body, {"Content-Type": kind})[0] == 200
    assert server.metric("lcmtrt_step_programs", model="tiny") == programs


@pytest.fixture(scope="module")
def plans_server(tiny_sd15_bundle: Path, tmp_path_factory) -> Server:
    running = start_server(tmp_path_factory.mktemp("serve-plans"), "--engines", str(tiny_sd15_bundle),
                           "--max-step-programs", "3")
    yield running
    stop(running)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_distinct_plans_keep_step_programs_and_memory_bounded(plans_server: Server) -> None:
    """Any client can ask for a new schedule: three rounds of 40 distinct plans keep at most --max-step-programs
    (3) step programs, and once the first round has warmed the allocator the next 80 plans leave the server's
    memory about where it was. (Keeping every program, as before the bound, these two rounds added ~7 MiB on this
    tiny model: ~90 KiB of buffers and bindings per program.)"""
    (warmed,) = plans_server.request("GET", "/ready", key=None)[2]["warmed"].values()  # timed at warm-up here
    assert warmed["batch_ms_source"] == "measured" and set(warmed["batch_ms"]) == {"1", "2"}
    assert all(ms > 0 for ms in warmed["batch_ms"].values())
    originals = distinct_originals(120)
    rss = [rss_mb(plans_server.process.pid)]
    for round_start in (0, 40, 80):
        for i, original in enumerate(originals[round_start:round_start + 40]):
            status, _, body = plans_server.post_json({"prompt": "a boat", "seed": i, "num_inference_steps": 4,
                                                      "original_inference_steps": original})
            assert status == 200, body
            assert plans_server.metric("lcmtrt_step_programs") <= 3
        rss.append(rss_mb(plans_server.process.pid))
    print("server RSS MiB at ready and after each round of 40 plans:", " ".join(f"{x:.1f}" for x in rss))
    assert plans_server.metric("lcmtrt_step_programs") == 3
    assert rss[3] - rss[1] < 4, rss
    (now,) = plans_server.request("GET", "/ready", key=None)[2]["warmed"].values()
    assert len(now["kept_now"]) == 3 and now["kept_now"][-1]["timesteps"] != warmed["programs"][-1]["timesteps"]


@pytest.fixture(scope="module")
def small_server(tiny_sd15_bundle: Path, tmp_path_factory) -> Server:
    """A short queue, and a wait for company (3 s) longer than a request may take (2 s), so that a request with
    company on its way sits in the queue."""
    running = start_server(tmp_path_factory.mktemp("serve-small"), "--engines", str(tiny_sd15_bundle),
                           "--max-queue", "4", "--max-batch-wait-ms", "3000", "--request-timeout-s", "2")
    yield running
    stop(running)


def _http_head(length: int) -> bytes:
    return (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {length}\r\n\r\n".encode())


def test_lone_request_does_not_wait_for_company(small_server: Server) -> None:
    """Nothing else on its way: the batch runs at once, not after --max-batch-wait-ms (3 s here)."""
    waited = small_server.metric("lcmtrt_queue_wait_seconds_sum")
    status, headers, answer = small_server.post_json({"prompt": "alone", "n": 1})
    assert status == 200 and headers["x-lcmtrt-batch-images"] == "1"
    assert answer["noise"] == "torch"  # which generator made the seed's noise: torch's numbers equal diffusers'
    assert small_server.metric("lcmtrt_queue_wait_seconds_sum") - waited < 1.5


def test_disconnected_request_is_not_computed(small_server: Server) -> None:
    batches = small_server.metric("lcmtrt_batch_images_count")
    # a request still sending its body is on its way: the queued one waits up to 3 s for it, time enough to leave
    uploading = socket.create_connection(("127.0.0.1", small_server.port))
    uploading.sendall(_http_head(1000) + b'{"prompt": ')
    connection = socket.create_connection(("127.0.0.1", small_server.port))
    body = json.dumps({"prompt": "never computed", "n": 1}).encode()
    connection.sendall(_http_head(len(body)) + body)
    for _ in range(200):
        if small_server.metric("lcmtrt_queue_images") == 1:
            break
        time.sleep(0.02)
    connection.close()
    for _ in range(200):
        if small_server.metric("lcmtrt_cancelled_requests_total", reason="disconnect") == 1:
            break
        time.sleep(0.02)
    uploading.close()
    assert small_server.metric("lcmtrt_cancelled_requests_total", reason="disconnect") == 1
    assert small_server.metric("lcmtrt_queue_images") == 0
    status, _, _ = small_server.post_json({"prompt": "computed", "n": 2})  # fills a batch: runs at once
    assert status == 200
    assert small_server.metric("lcmtrt_batch_images_count") == batches + 1


def test_request_past_its_timeout_gets_503_and_is_not_computed(small_server: Server) -> None:
    batches = small_server.metric("lcmtrt_batch_images_count")
    uploading = socket.create_connection(("127.0.0.1", small_server.port))  # on its way for longer than 2 s
    uploading.sendall(_http_head(1000) + b'{"prompt": ')
    try:
        status, headers, answer = small_server.post_json({"prompt": "too slow", "n": 1})
    finally:
        uploading.close()
    assert_openai_error(status, answer, 503, None)
    assert answer["error"]["code"] == "timeout" and int(headers["retry-after"]) >= 1
    assert small_server.metric("lcmtrt_cancelled_requests_total", reason="timeout") == 1
    assert small_server.metric("lcmtrt_queue_images") == 0
    assert small_server.metric("lcmtrt_batch_images_count") == batches


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def flood(server: Server, count: int) -> list[tuple[int, dict]]:
    answers: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        status, headers, body = server.post_json({"prompt": f"flood {i}", "n": 2, "seed": i})
        with lock:
            answers.append((status, headers))
            assert status != 200 or len(body["data"]) == 2

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_overload_gets_503_and_loses_nothing(small_server: Server) -> None:
    served_before = small_server.metric("lcmtrt_requests_total", endpoint="generations", status="200")
    first = flood(small_server, 16)
    after_first = rss_mb(small_server.process.pid)
    second = flood(small_server, 16)
    for answers in (first, second):
        assert len(answers) == 16 and {status for status, _ in answers} <= {200, 503}
        refused = [headers for status, headers in answers if status == 503]
        assert refused and all(int(headers["retry-after"]) >= 1 for headers in refused)
        assert any(status == 200 for status, _ in answers)
    assert rss_mb(small_server.process.pid) < after_first + 64  # the queue is bounded, so memory is too
    served = small_server.metric("lcmtrt_requests_total", endpoint="generations", status="200") - served_before
    assert served == sum(status == 200 for status, _ in first + second)


def test_sigterm_finishes_accepted_requests_and_exits_0(small_server: Server) -> None:
    answers: list[int] = []
    threads = [threading.Thread(target=lambda i=i: answers.append(
        small_server.post_json({"prompt": f"in flight {i}", "n": 1, "seed": i})[0])) for i in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(500):  # all three admitted
        if small_server.metric("lcmtrt_requests_in_flight") == 3:
            break
        time.sleep(0.02)
    small_server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join()
    assert answers == [200, 200, 200]
    try:
        late = small_server.post_json({"prompt": "too late"})[0]
    except OSError:
        late = "refused"
    assert late in (503, "refused")
    assert small_server.process.wait(timeout=60) == 0
    log = small_server.log.read_text()
    assert log.count("POST /v1/images/generations 200") >= 3 and "drained" in log
