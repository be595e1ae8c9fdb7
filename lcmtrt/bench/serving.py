"""`lcmtrt bench-serve`: drive a running `lcmtrt serve` with the official openai client at rising concurrency.

Per level: requests/s, images/s, client-side p50/p90/p99 latency, the server-side p50 (its Server-Timing header),
the server's mean batch (from /metrics), 503s and lost requests (neither served nor refused with 503). With
`--engines`, the same bundle is benched offline in the same run first (while the server idles) for the ratio of
served to offline images/s at the batch the level can fill.
Against Ray Serve, each level also counts the requests each replica served (the X-Lcmtrt-Replica header); with
`--baseline-url` (a single-host `lcmtrt serve` of the same bundle) concurrency-1 requests alternate between the two
servers in the same run, and the difference of their latencies is the Ray proxy's overhead per request.
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

from lcmtrt.errors import UserError

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
    baseline_url: str | None = None  # a single-host server to alternate with at concurrency 1


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
    replicas: dict[str, int] = {}
    batches: list[list[int]] = []  # per served request: the engine batches its rows ran in
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
            replica = raw.headers.get("x-lcmtrt-replica")
            if replica:
                replicas[replica] = replicas.get(replica, 0) + 1
            batches.append([int(b) for b in raw.headers.get("x-lcmtrt-batch-images", "").split(",") if b])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies or [float("nan")]) * 1000
    return {"concurrency": concurrency, **outcome, "seconds": elapsed, "requests_per_s": outcome["ok"] / elapsed,
            "images_per_s": outcome["ok"] * settings.n / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "server_p50_ms": float(np.percentile(server_ms or [float("nan")], 50)), "replicas": replicas,
            "mean_batch_from_headers": _mean_batch(batches, settings.n)}


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


def _mean_batch(batches: list[list[int]], n: int) -> float:
    """Images per engine batch from the responses' headers: a batch of b images is 1/b of it per image in it
    (exact for n=1; for a request split over batches its images are taken as evenly spread)."""
    share = sum(n / len(sizes) / b for sizes in batches if sizes for b in sizes)
    return len(batches) * n / share if share else float("nan")


async def _alternated(target: Any, baseline: Any, model: str, baseline_model: str, settings: LoadSettings
                      ) -> dict[str, Any]:
    """Concurrency 1, requests alternating between the target (Ray) and the baseline (single host), first one then
    the other, so both see the same host load; the per-pair difference of latencies is the proxy's overhead."""
    times: dict[str, list[float]] = {"target": [], "baseline": []}
    for ticket in range(settings.requests):
        order = [("target", target, model), ("baseline", baseline, baseline_model)]
        for name, client, model_id in (order if ticket % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            await client.images.generate(model=model_id, prompt=PROMPT, n=settings.n, response_format="b64_json",
                                         extra_body={"seed": ticket})
            times[name].append(time.perf_counter() - start)
    target_ms, baseline_ms = (np.asarray(times[k]) * 1000 for k in ("target", "baseline"))
    return {"url": settings.baseline_url, "pairs": settings.requests,
            "target_p50_ms": float(np.median(target_ms)), "baseline_p50_ms": float(np.median(baseline_ms)),
            "overhead_p50_ms": float(np.median(target_ms - baseline_ms)),
            "overhead_mean_ms": float(np.mean(target_ms - baseline_ms))}


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
        if level["replicas"]:  # /metrics answers from one replica only: the responses' headers cover them all
            level["mean_batch"] = level["mean_batch_from_headers"]
        levels.append(level)
        log.info("concurrency %d: %.2f images/s", concurrency, level["images_per_s"])
    result = {"model": card.model_dump(), "levels": levels}
    if settings.baseline_url is not None:
        result["baseline"] = await _with_baseline(openai_client, card.id, settings)
    await openai_client.close()
    return result


async def _with_baseline(openai_client: Any, model: str, settings: LoadSettings) -> dict[str, Any]:
    import openai

    base = settings.baseline_url.rstrip("/").removesuffix("/v1")
    baseline = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=settings.api_key, max_retries=0,
                                  timeout=max(60.0, settings.seconds))
    try:
        ids = [m.id for m in (await baseline.models.list()).data]
    except openai.APIError as e:
        raise UserError(f"--baseline-url {settings.baseline_url}: no lcmtrt server answers there ({e})") from None
    baseline_model = model if model in ids else ids[0]
    await baseline.images.generate(model=baseline_model, prompt=PROMPT, n=settings.n, extra_body={"seed": 0})
    try:
        return await _alternated(openai_client, baseline, model, baseline_model, settings)
    finally:
        await baseline.close()


def _offline(engines: Path) -> dict[str, Any]:
    from lcmtrt.bench.offline import BenchSettings, bench_lcmtrt
    from lcmtrt.bundle import load_bundle

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
    for r in report["levels"]:
        if r["replicas"]:
            split = ", ".join(f"{name} {count}" for name, count in sorted(r["replicas"].items()))
            lines.append(f"concurrency {r['concurrency']}: requests per replica: {split}")
    if "baseline" in report:
        b = report["baseline"]
        lines.append(f"concurrency 1, {b['pairs']} alternated pairs against {b['url']}: p50 {b['target_p50_ms']:.1f} "
                     f"ms here vs {b['baseline_p50_ms']:.1f} ms there; overhead per request p50 "
                     f"{b['overhead_p50_ms']:+.1f} ms (mean {b['overhead_mean_ms']:+.1f} ms)")
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
