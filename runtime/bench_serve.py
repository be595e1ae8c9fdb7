"""`lcmtrt bench-serve`: drive a running `lcmtrt serve` with the official openai client at rising concurrency.

Per level: requests/s, images/s, client-side p50/p90/p99 latency, the server-side p50 (its Server-Timing header),
the server's mean batch (from /metrics), 503s and lost requests (neither served nor refused with 503). With `--engines`, the same bundle is benched offline in the
same run first (while the server idles) for the ratio of served to offline images/s at the batch the level can fill.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcmtrt.runtime.errors import UserError

log = logging.getLogger(__name__)
PROMPT = "a cinematic photo of a lighthouse on a cliff at dusk, detailed, 8k"


@dataclass(frozen=True)
class LoadSettings:
    url: str
    model: str | None = None
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    requests: int = 32  # per level at most
    seconds: float = 60.0  # per level at most
    n: int = 1
    api_key: str = "none"


async def _metric_sums(base: str, model: str) -> tuple[float, float]:
    """(images, batches) the server has run for `model` so far: lcmtrt_batch_images' sum and count."""
    from prometheus_client.parser import text_string_to_metric_families

    def fetch() -> str:
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
            return response.read().decode()

    total = count = 0.0
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.name == "lcmtrt_batch_images_sum":
                total = sample.value
            elif sample.labels.get("model") == model and sample.name == "lcmtrt_batch_images_count":
                count = sample.value
    return total, count


async def _level(openai_client: Any, model: str, concurrency: int, settings: LoadSettings) -> dict[str, Any]:
    import openai

    tickets = iter(range(settings.requests))
    latencies: list[float] = []
    server_ms: list[float] = []  # the server's own time per request (its Server-Timing header)
    outcome = {"ok": 0, "refused_503": 0, "lost": 0}
    deadline = time.monotonic() + settings.seconds

    async def worker() -> None:
        for ticket in tickets:
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            try:
                raw = await openai_client.images.with_raw_response.generate(
                    model=model, prompt=PROMPT, n=settings.n, response_format="b64_json", extra_body={"seed": ticket})
                raw.parse()  # the SDK's own decoding is part of what a client waits for
            except openai.APIStatusError as e:
                outcome["refused_503" if e.status_code == 503 else "lost"] += 1
                log.debug("request %d: %s", ticket, e)
                continue
            except openai.APIError as e:  # connection reset, timeout: the request is lost
                outcome["lost"] += 1
                log.warning("request %d lost: %s", ticket, e)
                continue
            latencies.append(time.perf_counter() - start)
            server_ms.append(server_timing(raw.headers.get("server-timing", "")).get("total", float("nan")))
            outcome["ok"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies or [float("nan")]) * 1000
    return {"concurrency": concurrency, **outcome, "seconds": elapsed, "requests_per_s": outcome["ok"] / elapsed,
            "images_per_s": outcome["ok"] * settings.n / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "server_p50_ms": float(np.percentile(server_ms or [float("nan")], 50))}


def server_timing(header: str) -> dict[str, float]:
    """`queue;dur=0.3, engine;dur=33.4, total;dur=39.5` -> {"queue": 0.3, "engine": 33.4, "total": 39.5} (ms)."""
    timings = {}
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    timings[name] = float(value)
                except ValueError:
                    pass
    return timings


async def _drive(settings: LoadSettings) -> dict[str, Any]:
    import openai

    base = settings.url.rstrip("/").removesuffix("/v1")
    openai_client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=settings.api_key, max_retries=0,
                                       timeout=max(60.0, settings.seconds))
    try:
        models = (await openai_client.models.list()).data
    except openai.APIError as e:
        raise UserError(f"--url {settings.url}: no lcmtrt server answers there ({e})") from None
    card = next((m for m in models if m.id == (settings.model or models[0].id)), None)
    if card is None:
        raise UserError(f"--model {settings.model}: the server has {', '.join(m.id for m in models)}")
    await openai_client.images.generate(model=card.id, prompt=PROMPT, n=settings.n, extra_body={"seed": 0})
    levels = []
    for concurrency in settings.concurrency:
        before = await _metric_sums(base, card.id)
        level = await _level(openai_client, card.id, concurrency, settings)
        after = await _metric_sums(base, card.id)
        batches = after[1] - before[1]
        level["mean_batch"] = (after[0] - before[0]) / batches if batches else float("nan")
        levels.append(level)
        log.info("concurrency %d: %.2f images/s", concurrency, level["images_per_s"])
    await openai_client.close()
    return {"model": card.model_dump(), "levels": levels}


def _offline(engines: Path) -> dict[str, Any]:
    from lcmtrt.runtime.bench import BenchSettings, bench_lcmtrt
    from lcmtrt.runtime.bundle import load_bundle

    bundle = load_bundle(engines)
    settings = BenchSettings(bundle.batch_sizes, (bundle.default_steps,), iterations=10, warmup=2)
    report = bench_lcmtrt(str(engines), "auto", settings)
    steps = bundle.default_steps
    return {"environment": report["environment"],
            "by_batch": {b: {"images_per_s": report["results"][f"batch{b}-steps{steps}"]["images_per_s"],
                             "p50_ms": report["results"][f"batch{b}-steps{steps}"]["end_to_end"]["p50_ms"]}
                         for b in bundle.batch_sizes}}


def _compare(report: dict[str, Any], n: int) -> None:
    """Each level's images/s over offline images/s at the largest built batch it can fill (concurrency x n)."""
    by_batch = report["offline"]["by_batch"]
    for level in report["levels"]:
        fillable = [b for b in by_batch if b <= level["concurrency"] * n] or [min(by_batch)]
        batch = max(fillable)
        level["offline_batch"] = batch
        level["vs_offline"] = level["images_per_s"] / by_batch[batch]["images_per_s"]
    first = report["levels"][0]
    if first["concurrency"] == 1 and n in by_batch:
        report["p50_over_offline_ms_at_1"] = first["p50_ms"] - by_batch[n]["p50_ms"]
        report["server_p50_over_offline_ms_at_1"] = first["server_p50_ms"] - by_batch[n]["p50_ms"]


def format_report(report: dict[str, Any]) -> str:
    model = report["model"]
    lines = [f"lcmtrt bench-serve: model {model['id']} ({model.get('size')}, batch sizes {model.get('batch_sizes')}, "
             f"{model.get('backend')} {model.get('precision')}), n={report['settings']['n']}"]
    if "offline" in report:
        offline = ", ".join(f"batch {b}: {r['images_per_s']:.2f} img/s (p50 {r['p50_ms']:.1f} ms)"
                            for b, r in report["offline"]["by_batch"].items())
        lines.append(f"offline lcmtrt bench, same run: {offline}")
    lines.append(f"{'conc':>4s} {'ok':>5s} {'503':>5s} {'lost':>5s} {'req/s':>7s} {'img/s':>7s} {'p50 ms':>8s} "
                 f"{'p90 ms':>8s} {'p99 ms':>8s} {'server p50':>10s} {'batch':>6s} {'vs offline':>12s}")
    for r in report["levels"]:
        ratio = f"{r['vs_offline']:6.2f} (b{r['offline_batch']})" if "vs_offline" in r else ""
        lines.append(f"{r['concurrency']:4d} {r['ok']:5d} {r['refused_503']:5d} {r['lost']:5d} "
                     f"{r['requests_per_s']:7.2f} {r['images_per_s']:7.2f} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} "
                     f"{r['p99_ms']:8.1f} {r['server_p50_ms']:10.1f} {r['mean_batch']:6.2f} {ratio:>12s}")
    if "p50_over_offline_ms_at_1" in report:
        lines.append(f"concurrency 1: served p50 is {report['p50_over_offline_ms_at_1']:+.1f} ms over offline p50 "
                     f"at the client (SDK and HTTP included), {report['server_p50_over_offline_ms_at_1']:+.1f} ms "
                     "in the server (Server-Timing total)")
    return "\n".join(lines)


def bench_serve(settings: LoadSettings, engines: Path | None) -> dict[str, Any]:
    """The load test's report: per concurrency level, and beside the offline bench when `engines` is given."""
    report: dict[str, Any] = {"settings": asdict(settings)}
    report["settings"].pop("api_key")
    if engines is not None:
        log.info("offline bench of %s (the server should be idle) ...", engines)
        report["offline"] = _offline(engines)
    report.update(asyncio.run(_drive(settings)))
    if engines is not None:
        _compare(report, settings.n)
    return report
