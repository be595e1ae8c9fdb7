"""`lcmtrt bench`: per-stage and end-to-end latency, throughput, cold start and memory of a bundle, optionally
beside the diffusers pipeline on the same checkpoint, device, precision, size, batch and steps."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from lcmtrt.runtime.errors import UserError
from lcmtrt.runtime.pipeline import Pipeline

PROMPT = "a cinematic photo of a lighthouse on a cliff at dusk, detailed, 8k"


@dataclass(frozen=True)
class BenchSettings:
    batches: tuple[int, ...]
    steps: tuple[int, ...]
    iterations: int = 5
    warmup: int = 1


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99))}


def _stage_summary(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median and p90 per stage; the denoise steps pooled into one `denoise_step` figure (and their sum)."""
    steps = [v for s in samples for k, v in s.items() if k.startswith("denoise")]
    pooled = {"text": [s["text"] for s in samples], "denoise_step": steps,
              "denoise_total": [sum(v for k, v in s.items() if k.startswith("denoise")) for s in samples],
              "vae_decode": [s["vae_decode"] for s in samples]}
    return {k: {"median_ms": float(np.median(v) * 1000), "p90_ms": float(np.percentile(v, 90) * 1000)}
            for k, v in pooled.items()}


def _measure(generate: Callable[[], Any], stage_times: Callable[[], dict[str, float]], batch: int,
             settings: BenchSettings) -> dict[str, Any]:
    for _ in range(settings.warmup):
        generate()
    latencies, overheads = [], []
    for _ in range(settings.iterations):
        start = time.perf_counter()
        result = generate()
        latencies.append(time.perf_counter() - start)
        if result is not None:  # lcmtrt: everything but waiting for the engines is runtime overhead
            overheads.append((latencies[-1] - result.engine_seconds) / batch)
    stages = _stage_summary([stage_times() for _ in range(settings.iterations)])
    e2e = _stats(latencies)
    measured = {"end_to_end": e2e, "images_per_s": batch / (e2e["p50_ms"] / 1000), "stages": stages}
    if overheads:
        measured["overhead_ms_per_image"] = float(np.median(overheads) * 1000)
    return measured


def bench_lcmtrt(bundle_dir: str, device: str, settings: BenchSettings) -> dict[str, Any]:
    start = time.perf_counter()
    pipeline = Pipeline.load(bundle_dir, device)
    load_s = time.perf_counter() - start
    missing = [b for b in settings.batches if b not in pipeline.bundle.batch_sizes]
    if missing:
        raise UserError(f"--batch {missing} not built into this bundle (it has {list(pipeline.bundle.batch_sizes)}); "
                        "rebuild with `lcmtrt build-engines --batch ...`")
    first_batch, first_steps = settings.batches[0], settings.steps[0]
    conditions = condition_images(pipeline.bundle)
    pipeline.generate([PROMPT] * first_batch, seed=0, steps=first_steps, **conditions)
    cold_s = time.perf_counter() - start
    results = {}
    for batch in settings.batches:
        for steps in settings.steps:
            results[f"batch{batch}-steps{steps}"] = _measure(
                lambda: pipeline.generate([PROMPT] * batch, seed=0, steps=steps, **conditions),
                lambda: pipeline.stage_times(batch, steps), batch, settings)
    warm_ms = results[f"batch{first_batch}-steps{first_steps}"]["end_to_end"]["p50_ms"]
    memory_in_use = getattr(pipeline.backend, "memory_in_use", None)
    bundle = pipeline.bundle
    return {
        "environment": _environment(bundle, pipeline.backend.device),
        "cold_start": {"load_s": load_s, "first_image_s": cold_s,
                       "ratio_to_load_plus_warm": cold_s / (load_s + warm_ms / 1000)},
        "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_memory_in_use_mb": memory_in_use() / 2**20 if memory_in_use else None,
        "results": results,
    }


def condition_images(bundle: Any) -> dict[str, list[np.ndarray]]:
    """A ControlNet or T2I-Adapter bundle is timed with a synthetic condition map (a centred square's edges)."""
    engines = bundle.engines
    if "control_image" not in engines["denoise"].input_names and "adapter" not in engines:
        return {}
    channels = engines["adapter"].inputs[0].shape[-1] if "adapter" in engines else 3
    edges = np.zeros((bundle.height, bundle.width, channels), np.uint8)
    top, left, bottom, right = bundle.height // 4, bundle.width // 4, 3 * bundle.height // 4, 3 * bundle.width // 4
    edges[[top, bottom], left:right] = edges[top:bottom, [left, right]] = 255
    return {"adapter_images" if "adapter" in engines else "control_images": [edges]}


def _environment(bundle: Any, device: str) -> dict[str, Any]:
    import onnxruntime

    import lcmtrt

    env = {"backend": bundle.backend, "precision": bundle.precision, "device": device,
           "model": bundle.sources.get("model"), "size": f"{bundle.width}x{bundle.height}",
           "lcmtrt": lcmtrt.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    if bundle.backend == "tensorrt":
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    return env


def bench_diffusers(bundle_dir: str, settings: BenchSettings) -> dict[str, Any]:
    """The reference: diffusers' LatentConsistencyModelPipeline on the bundle's own checkpoint, timed per stage."""
    import torch

    from lcmtrt.export.models import reference_pipeline
    from lcmtrt.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir, verify_hashes=False)
    gpu = bundle.backend == "tensorrt" or bundle.build.get("ort_device") == "cuda"
    device, dtype = ("cuda", torch.float16) if gpu and bundle.precision == "fp16" else ("cuda" if gpu else "cpu", torch.float32)
    embedding = bundle.guidance_mode == "embedding"
    pipe = reference_pipeline(bundle.sources, bundle.family, embedding).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    current: dict[str, float] = {}
    timings: list[dict[str, float]] = []

    def timed(module: Any, label: Callable[[], str], method: str = "forward") -> None:
        original = getattr(module, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            sync()
            key = label()
            current[key] = current.get(key, 0.0) + time.perf_counter() - start  # SDXL: both text encoders
            return out

        setattr(module, method, wrapper)

    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            timed(encoder, lambda: "text")
    timed(pipe.unet, lambda: f"denoise[{sum(k.startswith('denoise') for k in current)}]")
    timed(pipe.vae, lambda: "vae_decode", "decode")

    def generate(batch: int, steps: int) -> None:
        current.clear()
        with torch.inference_mode():
            pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=bundle.default_guidance_scale,
                 height=bundle.height, width=bundle.width, generator=torch.manual_seed(0), output_type="np")
        sync()
        timings.append(dict(current))

    results = {}
    for batch in settings.batches:
        for steps in settings.steps:
            timings.clear()
            results[f"batch{batch}-steps{steps}"] = _measure(
                lambda: generate(batch, steps), lambda: (generate(batch, steps), timings[-1])[1], batch, settings)
    return {"environment": {"diffusers": __import__("diffusers").__version__, "torch": torch.__version__,
                            "device": device, "dtype": str(dtype).removeprefix("torch."),
                            "threads": torch.get_num_threads()},
            "results": results}


def speedups(ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, dict[str, float]]:
    """How many times faster lcmtrt is, per figure (reference time / our time; our images/s / theirs)."""
    table = {}
    for key, mine in ours["results"].items():
        theirs = reference["results"][key]
        row = {"end_to_end_p50": theirs["end_to_end"]["p50_ms"] / mine["end_to_end"]["p50_ms"],
               "images_per_s": mine["images_per_s"] / theirs["images_per_s"]}
        for stage in ("text", "denoise_step", "vae_decode"):
            row[stage] = theirs["stages"][stage]["median_ms"] / mine["stages"][stage]["median_ms"]
        table[key] = row
    return table


def format_report(report: dict[str, Any]) -> str:
    ours = report["lcmtrt"]
    env = ours["environment"]
    lines = [f"lcmtrt bench: {env['model']} {env['size']} | {env['backend']} {env['precision']} on {env['device']}",
             f"cold start: load {ours['cold_start']['load_s']:.2f} s, first image {ours['cold_start']['first_image_s']:.2f} s "
             f"({ours['cold_start']['ratio_to_load_plus_warm']:.2f}x load + warm generation); "
             f"peak host memory {ours['peak_host_memory_mb']:.0f} MB"
             + (f"; device memory in use {ours['device_memory_in_use_mb']:.0f} MB"
                if ours["device_memory_in_use_mb"] is not None else ""),
             ""]
    header = f"{'setting':16s} {'who':9s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'img/s':>8s} " \
             f"{'text ms':>8s} {'step ms':>9s} {'vae ms':>9s} {'ovh ms/img':>10s}"
    lines.append(header)
    for key, mine in ours["results"].items():
        rows = [("lcmtrt", mine)]
        if "diffusers" in report:
            rows.append(("diffusers", report["diffusers"]["results"][key]))
        for who, r in rows:
            s = r["stages"]
            overhead = f"{r['overhead_ms_per_image']:10.3f}" if who == "lcmtrt" else f"{'':10s}"
            lines.append(f"{key:16s} {who:9s} {r['end_to_end']['p50_ms']:9.1f} {r['end_to_end']['p90_ms']:9.1f} "
                         f"{r['end_to_end']['p99_ms']:9.1f} {r['images_per_s']:8.2f} {s['text']['median_ms']:8.1f} "
                         f"{s['denoise_step']['median_ms']:9.1f} {s['vae_decode']['median_ms']:9.1f} {overhead}")
        if "speedup" in report:
            sp = report["speedup"][key]
            lines.append(f"{key:16s} {'speedup':9s} {sp['end_to_end_p50']:8.2f}x {'':9s} {'':9s} "
                         f"{sp['images_per_s']:7.2f}x {sp['text']:7.2f}x {sp['denoise_step']:8.2f}x "
                         f"{sp['vae_decode']:8.2f}x")
    return "\n".join(lines)
