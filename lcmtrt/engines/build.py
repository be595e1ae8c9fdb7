"""build-engines: preset -> checkpoint -> ONNX graphs -> engines -> bundle, with progress and timing per stage.

Everything is written into a staging folder beside the output and renamed into place at the end, so an
interrupted build never leaves a folder that looks like a complete bundle.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lcmtrt.bundle import COEFF_COLUMNS, MANIFEST, Bundle, EngineSpec, SamplerDefaults, TextConfig
from lcmtrt.engines.checkpoint import (BATCH_AXES, REFITTABLE, euler_options, example_inputs, guidance_mode,
                                       inpaint_route, scheduler_config, source_info, stage_modules, vae_precision,
                                       zero_empty_negative)
from lcmtrt.engines.preset import Preset
from lcmtrt.engines.staging import Progress, digests, link_or_copy, staged_bundle
from lcmtrt.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def resolve_backend(backend: str) -> str:
    """`auto`: TensorRT when it and a GPU are present, else ONNX Runtime's CUDA provider on a GPU, else OpenVINO
    when it is installed (the fastest CPU path), else ONNX Runtime on the CPU. Says which it picked and why (and
    why TensorRT cannot run when it is installed)."""
    from lcmtrt.engines import onnxruntime_build
    from lcmtrt.engines.openvino_build import openvino_available
    from lcmtrt.engines.tensorrt_build import tensorrt_unavailable_reason

    if backend == "openvino" and not openvino_available():
        raise UserError("--backend openvino needs OpenVINO: pip install 'lcmtrt[openvino]'")
    if backend not in ("auto", "tensorrt"):
        return backend
    reason = tensorrt_unavailable_reason()
    if backend == "tensorrt":
        if reason is not None:
            raise UserError(f"--backend tensorrt cannot run here: {reason}; install 'lcmtrt[tensorrt]' (CUDA 12) or "
                            "'lcmtrt[tensorrt-cu13]' (CUDA 13) on a CUDA GPU host, or use --backend onnxruntime")
        return backend
    if reason is not None and not reason.startswith("tensorrt and cuda-python do not import"):
        log.warning("warning: TensorRT is installed but cannot run (%s)", reason)
    if reason is None:
        chosen, why = "tensorrt", "TensorRT and a CUDA GPU are present"
    elif onnxruntime_build.cuda_usable():
        chosen, why = "onnxruntime", "ONNX Runtime's CUDA provider runs here and TensorRT does not"
    elif openvino_available():
        chosen, why = "openvino", "no GPU here; OpenVINO is installed"
    else:
        chosen, why = "onnxruntime", "no GPU and no OpenVINO here (pip install 'lcmtrt[openvino]' is faster on CPUs)"
    log.info("backend auto: %s (%s)", chosen, why)
    return chosen


def resolve_precision(backend: str, precision: str | None, ort_device: str, ov_device: str) -> str:
    """fp32 on CPUs (the parity path), fp16 on GPUs; bf16 only where OpenVINO runs it natively; int8 on OpenVINO's
    CPU with NNCF."""
    if precision is None:
        gpu = backend == "tensorrt" or ort_device == "cuda" or (backend == "openvino" and ov_device.upper().startswith(("GPU", "NPU")))
        precision = "fp16" if gpu else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if precision == "int8" and backend != "openvino":
        raise UserError(f"--precision int8 is OpenVINO's (quantized with NNCF): use --backend openvino; {backend} "
                        f"takes {'fp16' if backend == 'tensorrt' else 'fp32 or fp16'}")
    if backend == "tensorrt" and precision != "fp16":
        raise UserError("TensorRT bundles are built in fp16; use --backend onnxruntime or openvino for fp32")
    if backend == "onnxruntime" and precision == "bf16":
        raise UserError("--precision bf16 runs on the OpenVINO backend (--backend openvino); ONNX Runtime takes fp32 "
                        "or fp16")
    if backend == "openvino":
        from lcmtrt.engines.openvino_build import check_precision

        check_precision(precision, ov_device)
    return precision


def checkpoint_sources(preset: Preset) -> dict[str, Any]:
    """load_checkpoint's arguments from a preset: the model (folder, hub id or single file) and what replaces parts."""
    return {"model": preset.model, "revision": preset.revision, "unet": preset.unet, "vae": preset.vae,
            "controlnet": preset.controlnets or None, "adapter": preset.adapter, "model_config": preset.model_config}


def build_bundle(
    preset: Preset,
    out: Path,
    backend: str = "auto",
    precision: str | None = None,
    workspace_gb: float | None = None,
    refittable: bool = False,
    device: str = "auto",
    int8_vae: str | None = None,
) -> Bundle:
    """Build every engine for `preset` into the bundle folder `out` (replaced atomically when it exists).
    `refittable`: the text and denoise engines keep their LoRA-touchable weights replaceable (export/refit.py).
    `device`: OpenVINO's target (CPU, GPU, ...); `int8_vae`: openvino_quantize.VAE_DECODE_MODES (default weights)."""
    from lcmtrt.export.models import load_checkpoint
    target = _resolve_target(backend, precision, device, refittable, int8_vae)
    if preset.loras:  # a missing or damaged LoRA file is refused before minutes of model loading
        from lcmtrt.export.lora import resolve

        for spec in preset.loras:
            resolve(spec)
    progress = Progress()  # the stage count is known once the checkpoint says which engines it needs
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_bundle(out) as staging:
        with progress.stage(f"load model {preset.model}"):
            checkpoint = load_checkpoint(**checkpoint_sources(preset))
        loras = []
        if preset.loras:
            from lcmtrt.export.lora import fuse_loras

            with progress.stage(f"fuse {len(preset.loras)} LoRA(s)"):
                loras = fuse_loras(checkpoint, preset.loras)
        preset = preset.validate(multiple=8 * max(1, checkpoint.vae_scale_factor // 8))
        scheduler = scheduler_config(checkpoint.scheduler_config, preset)
        text = _export_tokenizers(checkpoint, staging)
        mode = guidance_mode(checkpoint, preset)
        if preset.cfg and mode == "embedding":
            log.warning("warning: cfg is ignored: this UNet takes guidance through its embedding (LCM-distilled) "
                        "and diffusers never runs classifier-free guidance with it")
        graphs, embeddings = _export_graphs(checkpoint, preset, scheduler, mode, target, staging, progress,
                                            refittable)
        engine_batches = _engine_batches(graphs, preset, mode)
        specs = {n: EngineSpec(n, f"onnx/{n}.onnx", "", g.inputs, g.outputs, engine_batches[n], g.refit_weights)
                 for n, g in graphs.items()}
        specs, build_info = _build_engines(specs, staging, progress, target.backend, target.precision,
                                           target.ort_device, target.ov_device, workspace_gb, out.parent)
        build_info.update(_export_info(graphs, checkpoint, target))
        build_info["batch_invariance"] = _batch_invariance(build_info, target.backend, target.precision)
        bundle = _quantized(Bundle(
            root=out,
            family=checkpoint.family,
            precision=target.precision,
            backend=target.backend,
            guidance_mode=mode,
            height=preset.height,
            width=preset.width,
            batch_sizes=tuple(preset.batch_sizes),
            latent_channels=checkpoint.vae.config.latent_channels,  # a 9-channel UNet's latents have the VAE's
            vae_scale_factor=checkpoint.vae_scale_factor,
            vae_scaling_factor=float(checkpoint.vae.config.scaling_factor),
            default_steps=preset.steps,
            default_guidance_scale=preset.guidance_scale,
            scheduler=scheduler,
            text=TextConfig(*text, zero_empty_negative(checkpoint)),
            engines=specs,
            sources={"preset": preset.name, **source_info(checkpoint),
                     **{k: v for k, v in checkpoint.extra.items() if v}, "loras": loras},
            build=build_info,
            files={},
            embeddings=embeddings,
            inpaint=inpaint_route(checkpoint, preset),
            coeff_columns=COEFF_COLUMNS,  # the general step: every sampler, chosen per request
            sampler=SamplerDefaults(preset.scheduler, preset.eta, preset.timesteps),
            euler_options=euler_options(checkpoint.scheduler_config),
        ), staging, progress, target.int8_vae)
        with progress.stage("write bundle.json"):
            bundle.build["duration_s"] = round(progress.elapsed, 1)
            (staging / MANIFEST).write_text(json.dumps(bundle.to_json(), indent=2) + "\n")
    log.info("bundle ready: %s (%.1f s)", out, progress.elapsed)
    return bundle


def _quantized(bundle: Bundle, staging: Path, progress: Progress, int8_vae: str) -> Bundle:
    """int8: the staged fp32 IR quantized in place (openvino_quantize.py; `int8_vae`: what of the VAE decoder), its
    calibration and fidelity recorded in build.int8; then every staged file's digest."""
    if bundle.precision == "int8":
        from lcmtrt.engines.openvino_quantize import Int8Settings, quantize_bundle

        bundle.build["int8"] = quantize_bundle(replace(bundle, root=staging), staging, progress,
                                               Int8Settings(vae_decode=int8_vae))
    return replace(bundle, files=digests(staging))


def _export_info(graphs: dict[str, Any], checkpoint: Any, target: _Target) -> dict[str, Any]:
    """What bundle.json's build section records about the export."""
    return {
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "export_max_abs_error": {n: g.max_abs_error for n, g in graphs.items()},
        "vae_precision": vae_precision(checkpoint, target.precision),
        "graph_precision": target.graph_precision,
        "batch_invariant_graphs": True,  # Sin/Cos padded to whole packets (export/batch_invariance.py)
    }


def _batch_invariance(build_info: dict[str, Any], backend: str, precision: str) -> str:
    """Whether a row's result is independent of its batch on the device these engines are built for: "verified"
    where the tests check it bit for bit, "unverified" elsewhere, "absent" for graphs exported without the rewrite."""
    from lcmtrt.runtime.backends import batch_invariance

    device = "cuda" if backend == "tensorrt" else build_info.get("ort_device") or build_info.get("ov_device", "CPU")
    return batch_invariance(build_info, backend, device, precision)


@dataclass(frozen=True)
class _Target:
    """Where and in what precision the engines are built."""

    backend: str
    precision: str
    graph_precision: str  # OpenVINO converts fp32 graphs and lowers their precision at compile time
    ort_device: str
    ov_device: str = "CPU"  # OpenVINO's name of the device an OpenVINO bundle targets
    int8_vae: str = "weights"  # what an int8 bundle quantizes of the VAE decoder


def build_devices(backend: str, device: str) -> tuple[str, str]:
    """--device of build-engines in the one vocabulary (runtime/backends/devices.py), for the chosen backend:
    (ONNX Runtime's provider, OpenVINO's device name). auto: CUDA where ONNX Runtime can use it, OpenVINO's CPU."""
    from lcmtrt.engines import onnxruntime_build
    from lcmtrt.runtime.backends.devices import onnxruntime_device, tensorrt_device

    if backend == "tensorrt":
        tensorrt_device(device)  # a plan is built on, and for, the first visible CUDA GPU
        return "cpu", "CPU"
    if backend == "onnxruntime":
        usable = onnxruntime_build.cuda_usable()
        return onnxruntime_device(device, "cuda" if usable else "cpu", usable), "CPU"
    from lcmtrt.engines import openvino_build

    return "cpu", openvino_build.check_device(device)


def _resolve_target(backend: str, precision: str | None, device: str, refittable: bool,
                    int8_vae: str | None = None) -> _Target:
    """The backend and precisions to build, refusing combinations that cannot work before any model loads."""
    backend = resolve_backend(backend)
    ort_device, device = build_devices(backend, device)
    if backend == "openvino":
        if refittable:
            raise UserError("--refittable bundles swap LoRAs through ONNX Runtime or TensorRT; build them with "
                            "--backend onnxruntime")
    precision = resolve_precision(backend, precision, ort_device, device)
    # OpenVINO keeps what needs fp32 in fp32 when it lowers an fp32 graph, so it always gets fp32 graphs
    return _Target(backend, precision, "fp32" if backend == "openvino" else precision, ort_device, device,
                   resolve_int8_vae(int8_vae, precision))


def resolve_int8_vae(int8_vae: str | None, precision: str) -> str:
    """What an int8 bundle quantizes of the VAE decoder: weights only unless asked; asked of another precision,
    refused."""
    if int8_vae is None:
        return "weights"
    if precision != "int8":
        raise UserError(f"--int8-vae sets what an int8 bundle quantizes of the VAE decoder; this build is {precision}: "
                        "add --precision int8 (and --backend openvino)")
    from lcmtrt.engines.openvino_quantize import VAE_DECODE_MODES

    if int8_vae not in VAE_DECODE_MODES:
        raise UserError(f"unknown --int8-vae {int8_vae!r}; choose {' or '.join(VAE_DECODE_MODES)}")
    return int8_vae


def _export_tokenizers(checkpoint: Any, staging: Path) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    """Each tokenizer as tokenizer.json in the bundle: (files, pad ids, max length)."""
    from lcmtrt.export.clip_tokenizer import export_tokenizer

    tokenizers = [("tokenizer", checkpoint.tokenizer)]
    if checkpoint.tokenizer_2 is not None:
        tokenizers.append(("tokenizer_2", checkpoint.tokenizer_2))
    files, pad_ids, length = [], [], 0
    for folder, tokenizer in tokenizers:
        (staging / folder).mkdir(exist_ok=True)
        filename, pad_id, length = export_tokenizer(tokenizer, staging / folder)
        files.append(f"{folder}/{filename}")
        pad_ids.append(pad_id)
    return tuple(files), tuple(pad_ids), length


def _export_graphs(checkpoint: Any, preset: Preset, scheduler: Any, mode: str, target: _Target, staging: Path,
                   progress: Progress, refittable: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every engine's ONNX graph in staging/onnx, each checked against torch where it can be, and the embeddings
    the runtime computes for the denoise graphs."""
    from lcmtrt.export.onnx_export import export_graph

    (staging / "onnx").mkdir()
    modules = stage_modules(checkpoint, target.graph_precision, scheduler, preset, mode)
    progress.total = progress.done + 2 * len(modules) + 1  # so far, export and build each engine, manifest
    if target.precision == "int8":
        from lcmtrt.engines.openvino_quantize import Int8Settings, int8_stages

        progress.total += int8_stages(modules, Int8Settings(vae_decode=target.int8_vae))
    examples = example_inputs(checkpoint, preset, scheduler, modules)
    graphs = {}
    for name, (module, output_names) in modules.items():
        with progress.stage(f"export {name} to ONNX ({target.graph_precision})"):
            graphs[name] = export_graph(name, module, examples[name], output_names, BATCH_AXES.get(name, {}),
                                        staging / "onnx", refittable and name in REFITTABLE)
            error = graphs[name].max_abs_error
            log.info("      %s: max |onnx - torch| = %s", name, "not checked" if error is None else f"{error:.2e}")
    return graphs, modules["denoise"][0].embeddings


def _engine_batches(graphs: dict[str, Any], preset: Preset, mode: str) -> dict[str, tuple[int, ...]]:
    """The batch sizes each engine is built for: under CFG the text engine also runs 2 x batch rows."""
    cfg_batches = tuple(sorted(set(preset.batch_sizes) | {2 * b for b in preset.batch_sizes}))
    return {name: cfg_batches if name == "text" and mode == "cfg" else tuple(preset.batch_sizes) for name in graphs}


def _build_engines(specs: dict[str, EngineSpec], staging: Path, progress: Progress, backend: str, precision: str,
                   ort_device: str, device: str, workspace_gb: float | None,
                   cache_dir: Path) -> tuple[dict[str, EngineSpec], dict[str, Any]]:
    """Each engine's backend artifact from its ONNX graph in `staging`; returns the specs with their artifacts and
    the backend's build info."""
    from lcmtrt.engines import onnxruntime_build

    artifacts: dict[str, str] = {}
    build_info: dict[str, Any] = {"backend": backend}
    plans: dict[str, tuple[str, ...]] = {}  # refittable TensorRT engines: one plan per batch size
    if backend == "tensorrt":
        from lcmtrt.engines.tensorrt_build import build_plan, device_info, plan_layout, timing_cache_path

        (staging / "trt").mkdir()
        build_info.update(device_info())
        workspace = int(workspace_gb * (1 << 30)) if workspace_gb else None
        for name, spec in specs.items():
            layout = plan_layout(name, spec.batch_sizes, bool(spec.refit_weights))
            with progress.stage(f"build TensorRT plan{'s' if len(layout) > 1 else ''} for {name}"):
                for artifact, batches in layout:
                    profiles = [{t.name: t.concrete(b) for t in spec.inputs} for b in batches]
                    build_plan(staging / spec.onnx, staging / artifact, profiles, workspace,
                               timing_cache=timing_cache_path(cache_dir), refittable=bool(spec.refit_weights))
                artifacts[name] = layout[0][0]
                if len(layout) > 1:
                    plans[name] = tuple(artifact for artifact, _ in layout)
    elif backend == "openvino":
        from lcmtrt.engines import openvino_build

        (staging / "ov").mkdir()
        build_info.update({"openvino_version": openvino_build.openvino_version(), "ov_device": device})
        runs_at = {}
        for name, spec in specs.items():
            with progress.stage(f"convert {name} to OpenVINO IR ({precision}, batch {list(spec.batch_sizes)})"):
                files = openvino_build.convert_graph(staging / spec.onnx, staging, name, spec.inputs,
                                                     spec.batch_sizes, precision)
                artifacts[name] = str(files[0].relative_to(staging))
                if precision not in ("fp32", "int8"):  # int8: measured once quantized (openvino_quantize.py)
                    runs_at[name] = openvino_build.compiled_precisions(files[0], device, precision)
                    log.info("      %s: convolutions and matrix products run at %s on %s", name,
                             ", ".join(f"{n} {p}" for p, n in sorted(runs_at[name].items())), device)
        if runs_at:
            build_info["heavy_op_precisions"] = runs_at
    else:
        import onnxruntime

        (staging / "ort").mkdir()
        build_info.update({"onnxruntime_version": onnxruntime.__version__, "ort_device": ort_device})
        for name, spec in specs.items():
            with progress.stage(f"optimize {name} for ONNX Runtime ({ort_device})"):
                if spec.refit_weights:  # overrides must reach the graph before ONNX Runtime folds anything
                    artifacts[name] = spec.onnx
                    continue
                onnxruntime_build.optimize_graph(staging / spec.onnx, staging / "ort" / f"{name}.onnx", ort_device)
                artifacts[name] = f"ort/{name}.onnx"
    return {n: replace(spec, artifact=artifacts[n], plans=plans.get(n, ())) for n, spec in specs.items()}, build_info


# build info that belongs to the ONNX graphs, not the engines
EXPORT_INFO = ("export_max_abs_error", "graph_precision", "batch_invariant_graphs")


def convert_bundle(source: Path, out: Path, backend: str = "auto", precision: str | None = None,
                   workspace_gb: float | None = None, device: str = "auto",
                   batch_sizes: tuple[int, ...] | None = None, int8_vae: str | None = None) -> Bundle:
    """Engines for another backend, precision or set of batch sizes from an existing bundle's ONNX graphs (their
    batch axis is dynamic), without exporting again; written atomically like build_bundle."""
    from lcmtrt.bundle import load_bundle

    src = load_bundle(source)
    graph_precision = src.build.get("graph_precision", src.precision)
    backend = resolve_backend(backend)
    ort_device, device = build_devices(backend, device)
    precision = resolve_precision(backend, precision or (graph_precision if backend != "openvino" else None),
                                  ort_device, device)
    int8_vae = resolve_int8_vae(int8_vae, precision)
    wanted = "fp32" if backend == "openvino" else precision
    if graph_precision != wanted:
        raise UserError(f"{source} holds {graph_precision} ONNX graphs but a {backend} {precision} bundle needs "
                        f"{wanted} ones; convert from a bundle built with --precision {wanted}")
    if backend == "openvino" and any(e.refit_weights for e in src.engines.values()):
        raise UserError(f"{source} is refittable (LoRA swaps through ONNX Runtime or TensorRT); convert from a bundle "
                        "built without --refittable")
    if precision != "fp32" and not src.embeddings:
        log.warning("warning: %s computes the timestep and guidance embeddings inside its graphs (exported before "
                    "lcmtrt fed them in fp32), so %s rounds their arguments and loses fidelity; re-export it "
                    "(build-engines --preset/--config) for the full %s image", source, precision, precision)
    progress = Progress(total=len(src.engines) + 2)
    if precision == "int8":
        from lcmtrt.engines.openvino_quantize import Int8Settings, int8_stages

        progress.total += int8_stages(src.engines, Int8Settings(vae_decode=int8_vae))
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_bundle(out) as staging:
        with progress.stage(f"copy ONNX graphs and tokenizers from {source}"):
            keep = {e.onnx for e in src.engines.values()} | set(src.text.tokenizers)
            for rel in src.files:
                if rel in keep or any(rel.startswith(k + ".") for k in keep):  # a graph's external-data file too
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(src.path(rel), staging / rel)
        batches = tuple(batch_sizes or src.batch_sizes)
        if len(set(batches)) != len(batches):
            raise UserError(f"batch sizes {list(batches)} must be distinct")
        doubled = tuple(sorted(set(batches) | {2 * b for b in batches}))  # CFG's text rows
        specs = {n: replace(e, batch_sizes=doubled if n == "text" and src.guidance_mode == "cfg" else batches)
                 for n, e in src.engines.items()}
        specs, build_info = _build_engines(specs, staging, progress, backend, precision, ort_device,
                                           device, workspace_gb, out.parent)
        build_info.update({k: src.build[k] for k in EXPORT_INFO if k in src.build})
        if src.build.get("batch_invariant") is True:  # older bundles' name for the same rewrite
            build_info["batch_invariant_graphs"] = True
        build_info.update({"built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "host": platform.node(),
                           "vae_precision": precision if precision == "int8" or src.build.get("vae_precision") != "fp32"
                           else "fp32",
                           "graph_precision": graph_precision, "converted_from": str(Path(source).resolve())})
        build_info["batch_invariance"] = _batch_invariance(build_info, backend, precision)
        bundle = _quantized(replace(src, root=out, backend=backend, precision=precision, engines=specs,
                                    build=build_info, batch_sizes=batches), staging, progress, int8_vae)
        with progress.stage("write bundle.json"):
            bundle.build["duration_s"] = round(progress.elapsed, 1)
            (staging / MANIFEST).write_text(json.dumps(bundle.to_json(), indent=2) + "\n")
    log.info("bundle ready: %s (%.1f s)", out, progress.elapsed)
    return bundle


