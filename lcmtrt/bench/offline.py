"""`lcmtrt bench`: per-stage and end-to-end latency, throughput, cold start and memory of a bundle, optionally
beside the diffusers pipeline on the same checkpoint, device, precision, size, batch and steps."""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lcmtrt.bench.plots import sampler_text
from lcmtrt.errors import UserError
from lcmtrt.runtime.backends.cpu import BF16_FLAGS, INT8_FLAGS, REPORTED_FLAGS, cpu_info
from lcmtrt.runtime.conditioning import bench_inputs, workload
from lcmtrt.runtime.images import compare_images
from lcmtrt.runtime.pipeline import Pipeline
from lcmtrt.runtime.scheduler import SamplerChoice

PROMPT = "a cinematic photo of a lighthouse on a cliff at dusk, detailed, 8k"
FIDELITY_PROMPTS = [PROMPT, "a bowl of fruit on a wooden table, still life", "portrait of a cat, oil painting",
                    "a snowy mountain village at night"]


@dataclass(frozen=True)
class BenchSettings:
    batches: tuple[int, ...]
    steps: tuple[int, ...]
    iterations: int = 5
    warmup: int = 1
    samplers: tuple[SamplerChoice, ...] = ()  # the sampler timed at each of `steps` (none: the bundle's default)

    def sampler(self, steps: int) -> SamplerChoice | None:
        return next((s for s in self.samplers if s.steps == steps), None)

    def generation(self, steps: int) -> dict[str, Any]:
        """The generation settings of one timed request at `steps`: its sampler, eta and timesteps."""
        chosen = self.sampler(steps)
        if chosen is None:
            return {"steps": steps}
        return {"steps": steps, "scheduler": chosen.name, "eta": chosen.eta, "timesteps": chosen.timesteps}


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


class LcmtrtContender:
    """lcmtrt on one bundle: loaded once (cold start measured to the first image), then one request per call."""

    def __init__(self, bundle_dir: str, device: str, settings: BenchSettings, name: str = "lcmtrt"):
        self.name = name
        start = time.perf_counter()
        self.pipeline = Pipeline.load(bundle_dir, device)
        self.load_s = time.perf_counter() - start
        missing = [b for b in settings.batches if b not in self.pipeline.bundle.batch_sizes]
        if missing:
            raise UserError(f"--batch {missing} not built into this bundle (it has "
                            f"{list(self.pipeline.bundle.batch_sizes)}); rebuild with `lcmtrt build-engines --batch ...`")
        self.conditions, self.settings = bench_inputs(self.pipeline.bundle), settings
        self.generate(settings.batches[0], settings.steps[0])
        self.first_image_s = time.perf_counter() - start

    def generate(self, batch: int, steps: int) -> float:
        """Runs one request; returns the seconds spent waiting for engines (the rest is host overhead)."""
        return self.pipeline.generate([PROMPT] * batch, seed=0, **self.settings.generation(steps),
                                      **self.conditions).engine_seconds

    def stage_times(self, batch: int, steps: int) -> dict[str, float]:
        generation = self.settings.generation(steps)
        return self.pipeline.stage_times(batch, generation.pop("steps"), **generation)

    def summary(self, results: dict[str, Any], settings: BenchSettings | None = None) -> dict[str, Any]:
        settings = settings or self.settings
        warm_ms = results[f"batch{settings.batches[0]}-steps{settings.steps[0]}"]["end_to_end"]["p50_ms"]
        memory_in_use = getattr(self.pipeline.backend, "memory_in_use", None)
        return {
            "environment": _environment(self.pipeline.bundle, self.pipeline.backend.device,
                                        settings.sampler(settings.steps[0])),
            "cold_start": {"load_s": self.load_s, "first_image_s": self.first_image_s,
                           "ratio_to_load_plus_warm": self.first_image_s / (self.load_s + warm_ms / 1000)},
            "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device_memory_in_use_mb": memory_in_use() / 2**20 if memory_in_use else None,
            "results": results,
        }


PER_WORKER = ("batch", "threads", "shapes")  # a peer worker's own, one worker per batch size


def default_openvino_precision(cpuinfo: Path | None = None) -> str:
    """What OpenVINO's CPU plugin runs at without a precision hint: bf16 where the CPU has it, f32 elsewhere."""
    return "bf16" if any(flag in cpu_info(cpuinfo)[1] for flag in BF16_FLAGS) else "fp32"


class OpenVinoPeerContender:
    """A CPU peer (optimum-intel's OVLatentConsistencyModelPipeline or openvino-genai's Text2ImagePipeline) on the
    bundle's checkpoint, one worker per batch size (its shapes are static), in the peer venv
    (scripts/optimum-intel-env.sh)."""

    def __init__(self, kind: str, bundle: Any, settings: BenchSettings, precision: str = "fp32"):
        from lcmtrt.bench.peers.optimum_intel import OpenVinoPeer, peer_checkpoint

        self.name, self.precision = kind, precision
        self.checkpoint = peer_checkpoint(bundle, kind)
        self.guidance_scale = bundle.default_guidance_scale
        self.peers: dict[int, Any] = {}
        try:
            for batch in settings.batches:
                self.peers[batch] = OpenVinoPeer(self.checkpoint, bundle.height, bundle.width, batch, precision,
                                                 steps=settings.steps[0], guidance_scale=self.guidance_scale,
                                                 kind=kind)
        except BaseException:
            self.close()
            raise

    def generate(self, batch: int, steps: int) -> None:
        self.peers[batch].run_once(steps, self.guidance_scale, seed=0)

    def stage_times(self, batch: int, steps: int) -> None:
        return None  # the peer's pipeline is timed whole

    def fidelity(self, batch: int, steps: int) -> dict[str, Any]:
        """This peer's images against its own fp32 ones, for lcmtrt's fidelity prompts and seed: an fp32 worker is
        loaded beside the timed one for the comparison, then closed."""
        from lcmtrt.bench.peers.optimum_intel import OpenVinoPeer

        timed = self.peers[batch]
        prompts = fidelity_prompts(batch)
        mine = timed.images(prompts, steps, self.guidance_scale, seed=0)
        with OpenVinoPeer(self.checkpoint, timed.height, timed.width, batch, "fp32", steps=steps,
                          guidance_scale=self.guidance_scale, kind=self.name) as reference:
            theirs = reference.images(prompts, steps, self.guidance_scale, seed=0)
        return {"reference": f"{self.name} fp32", "reference_precision": "fp32", "images": len(mine), "steps": steps,
                **compare_images(mine, theirs)}

    def summary(self, results: dict[str, Any]) -> dict[str, Any]:
        """What the peer's workers share, and per batch size what each worker ran with (openvino-genai falls back
        to dynamic shapes at batch > 1)."""
        first = next(iter(self.peers.values()))
        environment = {k: v for k, v in first.environment().items() if k not in PER_WORKER}
        environment["default_precision"] = default_openvino_precision()
        environment["per_batch"] = {str(batch): {k: peer.environment()[k] for k in PER_WORKER}
                                    for batch, peer in self.peers.items()}
        return {"environment": environment,
                "cold_start": {"first_image_s": first.load_s, "export_s": first.export_s, "import_s": first.import_s},
                "results": results}

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()


def run_alternating(contenders: list[Any], settings: BenchSettings) -> dict[str, dict[str, Any]]:
    """Every (batch, steps) setting timed for each contender, one request of each in turn after their warm-ups, so
    the machine's drift (other load, clocks) falls on every contender alike; then the stages one by one."""
    results: dict[str, dict[str, Any]] = {c.name: {} for c in contenders}
    for batch in settings.batches:
        for steps in settings.steps:
            for contender in contenders:
                for _ in range(settings.warmup):
                    contender.generate(batch, steps)
            latencies: dict[str, list[float]] = {c.name: [] for c in contenders}
            overheads: dict[str, list[float]] = {c.name: [] for c in contenders}
            for _ in range(settings.iterations):
                for contender in contenders:
                    start = time.perf_counter()
                    engine_s = contender.generate(batch, steps)
                    latencies[contender.name].append(time.perf_counter() - start)
                    if engine_s is not None:  # everything but waiting for the engines is runtime overhead
                        overheads[contender.name].append((latencies[contender.name][-1] - engine_s) / batch)
            for contender in contenders:
                results[contender.name][f"batch{batch}-steps{steps}"] = _summarize(
                    contender, batch, steps, latencies[contender.name], overheads[contender.name], settings)
    return results


def _summarize(contender: Any, batch: int, steps: int, latencies: list[float], overheads: list[float],
               settings: BenchSettings) -> dict[str, Any]:
    e2e = _stats(latencies)
    measured: dict[str, Any] = {"end_to_end": e2e, "images_per_s": batch / (e2e["p50_ms"] / 1000)}
    samples = [contender.stage_times(batch, steps) for _ in range(settings.iterations)]
    if samples[0] is not None:
        measured["stages"] = _stage_summary(samples)
        stage_sum = sum(measured["stages"][k]["median_ms"] for k in ("text", "denoise_total", "vae_decode"))
        # what a whole request costs beyond its engines run one at a time: thread hand-over, host work
        measured["stage_gap"] = {"sum_of_stages_ms": stage_sum, "gap_ms": e2e["p50_ms"] - stage_sum,
                                 "gap_pct": 100 * (e2e["p50_ms"] - stage_sum) / e2e["p50_ms"]}
    if overheads:
        measured["overhead_ms_per_image"] = float(np.median(overheads) * 1000)
    return measured


def bench_lcmtrt(bundle_dir: str, device: str, settings: BenchSettings) -> dict[str, Any]:
    """lcmtrt alone on one bundle."""
    contender = LcmtrtContender(bundle_dir, device, settings)
    return contender.summary(run_alternating([contender], settings)["lcmtrt"], settings)


def fidelity_prompts(batch: int) -> list[str]:
    """The prompts of a fidelity comparison: one per row of the first batch size (at most four)."""
    return FIDELITY_PROMPTS[:max(1, batch)]


def fidelity(bundle_dir: str, reference_dir: str, device: str, settings: BenchSettings) -> dict[str, Any]:
    """How close a reduced-precision bundle's images are to an fp32 bundle's for the same prompts, seed and sampler,
    at the first batch size and step count."""
    from lcmtrt.bundle import load_bundle

    reference_bundle = load_bundle(reference_dir)
    ours = Pipeline.load(bundle_dir, device)
    same = lambda b: (b.family, b.height, b.width, b.sources.get("model"), b.sources.get("loras"))
    if same(reference_bundle) != same(ours.bundle):
        raise UserError(f"--reference {reference_dir} is not the same model, LoRAs and size as {bundle_dir}")
    conditions = {**bench_inputs(ours.bundle), **settings.generation(settings.steps[0])}
    prompts = fidelity_prompts(settings.batches[0])
    mine = ours.generate(prompts, seed=0, **conditions).images
    del ours
    theirs = Pipeline.load(reference_dir).generate(prompts, seed=0, **conditions).images
    return {"reference": str(reference_dir), "reference_precision": reference_bundle.precision,
            "images": len(prompts), "steps": settings.steps[0], **compare_images(mine, theirs)}


def cpu_model(cpuinfo: Path | None = None) -> str:
    """The CPU's model name and its bf16/int8 extensions, e.g. "AMD EPYC (2 cores; avx2, no avx512_bf16/amx, no
    vnni/amx_int8)"."""
    name, flags = cpu_info(cpuinfo)
    have = [f for f in REPORTED_FLAGS if f in flags]
    lacks = "" if not flags else "".join(
        [", no avx512_bf16/amx" if not any(f in flags for f in BF16_FLAGS) else "",
         ", no vnni/amx_int8" if not any(f in flags for f in INT8_FLAGS) else ""])
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} cores; " \
           f"{', '.join(have) or 'flags unknown'}{lacks})"


def _environment(bundle: Any, device: str, sampler: SamplerChoice | None = None) -> dict[str, Any]:
    import onnxruntime

    import lcmtrt

    env = {"backend": bundle.backend, "precision": bundle.precision, "device": device,
           "model": bundle.sources.get("model"), "size": f"{bundle.width}x{bundle.height}",
           "sampler": sampler.name if sampler else bundle.sampler.scheduler,  # what every timed generation runs
           "workload": workload(bundle),  # a 9-channel inpainting bundle times inpainting, any other text-to-image
           "lcmtrt": lcmtrt.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "cpu": cpu_model()}
    if sampler and sampler.eta:
        env["eta"] = sampler.eta
    if sampler and sampler.timesteps:
        env["timesteps"] = list(sampler.timesteps)
    if bundle.backend == "tensorrt":
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    return env


class DiffusersContender:
    """The reference: diffusers' LatentConsistencyModelPipeline on the bundle's own checkpoint, timed per stage by
    wrapping its text encoders, UNet and VAE decoder."""

    name = "diffusers"

    def __init__(self, bundle_dir: str, settings: BenchSettings | None = None):
        import torch

        from lcmtrt.export.reference import reference_pipeline
        from lcmtrt.bundle import load_bundle

        self.bundle = bundle = load_bundle(bundle_dir, verify_hashes=False)
        self.settings = settings or BenchSettings((1,), (bundle.default_steps,))
        gpu = bundle.backend == "tensorrt" or bundle.build.get("ort_device") == "cuda"
        self.device = "cuda" if gpu else "cpu"
        self.dtype = torch.float16 if gpu and bundle.precision == "fp16" else torch.float32
        self.pipe = reference_pipeline(bundle.sources, bundle.family, bundle.guidance_mode == "embedding").to(
            device=self.device, dtype=self.dtype)
        self.sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        self.current: dict[str, float] = {}
        for encoder in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)):
            if encoder is not None:
                self._time(encoder, lambda: "text")
        self._time(self.pipe.unet, lambda: f"denoise[{sum(k.startswith('denoise') for k in self.current)}]")
        self._time(self.pipe.vae, lambda: "vae_decode", "decode")

    def _time(self, module: Any, label: Callable[[], str], method: str = "forward") -> None:
        original = getattr(module, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.sync()
            key = label()
            self.current[key] = self.current.get(key, 0.0) + time.perf_counter() - start  # SDXL: both text encoders
            return out

        setattr(module, method, wrapper)

    def generate(self, batch: int, steps: int) -> None:
        import torch

        self.current.clear()
        with torch.inference_mode():
            self.pipe([PROMPT] * batch, **self._schedule(steps), guidance_scale=self.bundle.default_guidance_scale,
                      height=self.bundle.height, width=self.bundle.width, generator=torch.manual_seed(0),
                      output_type="np")
        self.sync()

    def _schedule(self, steps: int) -> dict[str, Any]:
        """LCMScheduler's schedule as the bench times it on lcmtrt: custom timesteps, or `steps` of its own."""
        chosen = self.settings.sampler(steps)
        if chosen is not None and chosen.timesteps:
            return {"timesteps": list(chosen.timesteps)}
        return {"num_inference_steps": steps}

    def stage_times(self, batch: int, steps: int) -> dict[str, float]:
        self.generate(batch, steps)
        return dict(self.current)

    def summary(self, results: dict[str, Any]) -> dict[str, Any]:
        import torch

        return {"environment": {"diffusers": __import__("diffusers").__version__, "torch": torch.__version__,
                                "device": self.device, "dtype": str(self.dtype).removeprefix("torch."),
                                "threads": torch.get_num_threads()},
                "results": results}


def speedups(ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, dict[str, float]]:
    """How many times faster lcmtrt is, per figure (reference time / our time; our images/s / theirs)."""
    table = {}
    for key, mine in ours["results"].items():
        theirs = reference["results"][key]
        row = {"end_to_end_p50": theirs["end_to_end"]["p50_ms"] / mine["end_to_end"]["p50_ms"],
               "images_per_s": mine["images_per_s"] / theirs["images_per_s"]}
        if "stages" in theirs:
            for stage in ("text", "denoise_step", "vae_decode"):
                row[stage] = theirs["stages"][stage]["median_ms"] / mine["stages"][stage]["median_ms"]
        table[key] = row
    return table


def format_report(report: dict[str, Any]) -> str:
    ours = report["lcmtrt"]
    env = ours["environment"]
    lines = [f"lcmtrt bench: {env['model']} {env['size']} | {sampler_text(env)} | {env['backend']} {env['precision']} "
             f"on {env['device']} | {env['cpu']} | {env.get('workload', 'text-to-image')}",
             f"cold start: load {ours['cold_start']['load_s']:.2f} s, first image {ours['cold_start']['first_image_s']:.2f} s "
             f"({ours['cold_start']['ratio_to_load_plus_warm']:.2f}x load + warm generation); "
             f"peak host memory {ours['peak_host_memory_mb']:.0f} MB"
             + (f"; device memory in use {ours['device_memory_in_use_mb']:.0f} MB"
                if ours["device_memory_in_use_mb"] is not None else "")]
    others = [k for k in report if k not in ("lcmtrt", "speedup")]  # the contenders beside lcmtrt, in run order
    for peer in others:
        if "cold_start" in report[peer]:
            lines.append(f"{peer} cold start: {report[peer]['cold_start']['first_image_s']:.2f} s to the first image")
    for who in ["lcmtrt"] + others:
        if report[who].get("fidelity"):
            f = report[who]["fidelity"]
            lines.append(f"{who} fidelity vs {f['reference_precision']} {f['reference']} ({f['images']} images): "
                         f"PSNR {f['psnr_db']:.1f} dB, max difference {f['max_diff']}/255, "
                         f"{f['within_1_pct']:.2f}% of pixels within 1/255")
    lines.append("")
    labels = {peer: _ratio_label(peer, report[peer]["environment"]) for peer in report.get("speedup", {})}
    width = max([22, *map(len, labels.values()), *map(len, others)])
    header = f"{'setting':16s} {'who':{width}s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'img/s':>8s} " \
             f"{'text ms':>8s} {'step ms':>9s} {'vae ms':>9s} {'ovh ms/img':>10s} {'gap %':>6s}"
    lines.append(header)
    for key, mine in ours["results"].items():
        rows = [("lcmtrt", mine)] + [(peer, report[peer]["results"][key]) for peer in others]
        for who, r in rows:
            stages = r.get("stages")
            stage_cells = (f"{stages['text']['median_ms']:8.1f} {stages['denoise_step']['median_ms']:9.1f} "
                           f"{stages['vae_decode']['median_ms']:9.1f}") if stages else f"{'':8s} {'':9s} {'':9s}"
            overhead = f"{r['overhead_ms_per_image']:10.3f}" if "overhead_ms_per_image" in r else f"{'':10s}"
            gap = f"{r['stage_gap']['gap_pct']:6.1f}" if "stage_gap" in r else ""
            lines.append(f"{key:16s} {who:{width}s} {r['end_to_end']['p50_ms']:9.1f} {r['end_to_end']['p90_ms']:9.1f} "
                         f"{r['end_to_end']['p99_ms']:9.1f} {r['images_per_s']:8.2f} {stage_cells} {overhead} {gap}")
        for peer, table in report.get("speedup", {}).items():
            sp = table[key]
            stage_cells = " ".join(f"{sp[k]:{w}.2f}x" for k, w in (("text", 7), ("denoise_step", 8), ("vae_decode", 8))
                                   if k in sp)
            lines.append(f"{key:16s} {labels[peer]:{width}s} {sp['end_to_end_p50']:8.2f}x {'':9s} {'':9s} "
                         f"{sp['images_per_s']:7.2f}x {stage_cells}")
    return "\n".join(lines)


def _ratio_label(name: str, environment: dict[str, Any]) -> str:
    """A ratio line's name: the contender and the precision it ran at, e.g. "vs optimum-intel (bf16 default)" (an
    OpenVINO peer at OpenVINO's default), "vs diffusers (float32)"; "vs lcmtrt openvino fp32" names it already."""
    precision = environment.get("precision") or environment.get("dtype", "?")
    if precision == "default":
        precision = f"{environment.get('default_precision', '?')} default"
    named = name.endswith(precision) or name.startswith(f"lcmtrt {environment.get('backend')} {precision} (")
    return f"vs {name}" if named else f"vs {name} ({precision})"
