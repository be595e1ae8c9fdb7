"""build-engines: preset -> checkpoint -> ONNX graphs -> engines -> bundle, with progress and timing per stage.

Everything is written into a staging folder beside the output and renamed into place at the end, so an
interrupted build never leaves a folder that looks like a complete bundle.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from lcmtrt.engines.preset import Preset
from lcmtrt.runtime.bundle import MANIFEST, Bundle, EngineSpec, SchedulerConfig, TextConfig, file_digest
from lcmtrt.runtime.errors import UserError

log = logging.getLogger(__name__)

EXAMPLE_BATCH = 2  # trace with batch 2 so no reshape is specialised to batch 1
PRECISIONS = ("fp32", "fp16", "bf16")


class Progress:
    """Numbered, timed log lines for each stage of a long build."""

    def __init__(self, total: int | None = None):
        self.total, self.done, self.started = total, 0, time.perf_counter()

    @contextmanager
    def stage(self, what: str) -> Iterator[None]:
        self.done += 1
        number = f"[{self.done}/{self.total}]" if self.total else f"[{self.done}]"
        log.info("%s %s ...", number, what)
        start = time.perf_counter()
        yield
        log.info("%s %s done in %.1f s", number, what, time.perf_counter() - start)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


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
    """fp32 on CPUs (the parity path), fp16 on GPUs; bf16 only where OpenVINO runs it natively."""
    if precision is None:
        gpu = backend == "tensorrt" or ort_device == "cuda" or (backend == "openvino" and ov_device.upper().startswith(("GPU", "NPU")))
        precision = "fp16" if gpu else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if backend == "tensorrt" and precision != "fp16":
        raise UserError("TensorRT bundles are built in fp16; use --backend onnxruntime or openvino for fp32")
    if backend == "onnxruntime" and precision == "bf16":
        raise UserError("--precision bf16 runs on the OpenVINO backend (--backend openvino); ONNX Runtime takes fp32 "
                        "or fp16")
    if backend == "openvino":
        from lcmtrt.engines.openvino_build import check_precision

        check_precision(precision, ov_device)
    return precision


def scheduler_config(raw: dict[str, Any]) -> SchedulerConfig:
    known = {f.name for f in fields(SchedulerConfig)}
    config = SchedulerConfig(**{k: v for k, v in raw.items() if k in known})
    for flag in ("thresholding", "clip_sample", "rescale_betas_zero_snr"):
        if raw.get(flag):
            raise UserError(f"scheduler option {flag}=true is not supported by lcmtrt's fused LCM step")
    return config


def vae_precision(checkpoint: Any, precision: str) -> str:
    """SDXL's VAE overflows in fp16 (its config says force_upcast): such a VAE runs in fp32 inside an fp16 bundle,
    as diffusers upcasts it; an fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix) keeps fp16."""
    upcast = checkpoint.family == "sdxl" and getattr(checkpoint.vae.config, "force_upcast", False)
    return "fp32" if precision == "fp16" and upcast else precision


def guidance_mode(checkpoint: Any, preset: Preset) -> str:
    """embedding: LCM-distilled UNet; cfg: a base UNet (LCM-LoRA) built for classifier-free guidance; none: one
    without, which runs at guidance <= 1 only."""
    if checkpoint.unet.config.time_cond_proj_dim is not None:
        return "embedding"
    return "cfg" if preset.cfg else "none"


def _example_inputs(checkpoint: Any, preset: Preset, scheduler: SchedulerConfig,
                    modules: dict[str, tuple[Any, list[str]]]) -> dict[str, dict[str, Any]]:
    import torch

    from lcmtrt.export.graphs import is_tiny_vae
    from lcmtrt.runtime.scheduler import step_plan

    generator = torch.Generator().manual_seed(0)
    b = EXAMPLE_BATCH
    randn = lambda *shape: torch.randn(shape, generator=generator)
    channels = checkpoint.unet.config.in_channels
    latent = (b, channels, preset.height // checkpoint.vae_scale_factor, preset.width // checkpoint.vae_scale_factor)
    length = max_length(checkpoint.tokenizer)
    encoders = [checkpoint.text_encoder] + ([checkpoint.text_encoder_2] if checkpoint.text_encoder_2 else [])
    ids = {name: torch.randint(0, e.config.vocab_size, (b, length), generator=generator, dtype=torch.int32)
           for name, e in zip(("input_ids", "input_ids_2"), encoders)}
    hidden = sum(e.config.hidden_size for e in encoders) if checkpoint.family == "sdxl" else encoders[0].config.hidden_size
    coeffs = torch.from_numpy(step_plan(scheduler, 4).coeffs[1].copy())
    size = [preset.height, preset.width]

    adapter_states = {}
    if "adapter" in modules:
        adapter_states = {f"adapter_state_{k}": randn(b, *shape) for k, shape in
                          enumerate(modules["adapter"][0].state_shapes)}

    def denoise_inputs(names: list[str], rows: int) -> dict[str, Any]:
        pool = {
            "latents": randn(*latent), "coeffs": coeffs, "noise": randn(*latent),
            "prompt_embeds": randn(rows, length, hidden), "guidance_scale": torch.tensor([8.0, 1.5]),
            "uncond_mask": torch.tensor([1.0, 0.0]),
            "text_embeds": randn(rows, checkpoint.text_encoder_2.config.projection_dim) if checkpoint.text_encoder_2 else None,
            "time_ids": torch.tensor([size + [0, 0] + size] * rows, dtype=torch.float32),
            "control_image": torch.randint(0, 256, (b, preset.height, preset.width, 3), generator=generator,
                                           dtype=torch.uint8),
            "control_scale": torch.tensor([1.0, 0.5]),
            "adapter_keep": torch.tensor([1.0, 0.0]),
            **adapter_states,
        }
        return {name: pool[name] for name in names}

    examples = {
        "text": ids,
        "adapter": {
            "adapter_image": torch.randint(0, 256, (b, preset.height, preset.width, adapter_channels(checkpoint)),
                                           generator=generator, dtype=torch.uint8),
            "adapter_scale": torch.tensor([1.0, 0.8]),
        },
        "vae_decode": {"latents": randn(*latent)},
        "vae_encode": {
            "images": torch.randint(0, 256, (b, preset.height, preset.width, 3), generator=generator,
                                    dtype=torch.uint8),
            "coeffs": coeffs,
            "noise": randn(*latent),
            **({} if is_tiny_vae(checkpoint.vae) else {"sample_noise": randn(*latent)}),
        },
    }
    for name in ("denoise", "denoise_cfg"):
        if name in modules:
            examples[name] = denoise_inputs(modules[name][0].input_names, 2 * b if name == "denoise_cfg" else b)
    return examples


def zero_empty_negative(checkpoint: Any) -> bool:
    """SDXL pipelines' force_zeros_for_empty_prompt (default True), read from the pipeline's model_index.json."""
    if checkpoint.family != "sdxl":
        return False
    index = Path(checkpoint.path) / "model_index.json"
    if index.is_file():
        return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(checkpoint.path, "model_index.json", revision=checkpoint.revision)
    except Exception:  # noqa: BLE001 - an unreadable index means the pipeline's default
        return True
    return bool(json.loads(Path(path).read_text()).get("force_zeros_for_empty_prompt", True))


def adapter_channels(checkpoint: Any) -> int:
    """A T2I-Adapter's input channels: 3 for RGB condition maps, 1 for grayscale ones."""
    return int(checkpoint.adapter.config.in_channels) if checkpoint.adapter is not None else 0


def max_length(tokenizer: Any) -> int:
    """CLIP's 77; a tokenizer folder without a config reports a huge model_max_length."""
    return tokenizer.model_max_length if tokenizer.model_max_length < 1e6 else 77


def _stage_modules(checkpoint: Any, precision: str, scheduler: SchedulerConfig, preset: Preset,
                   mode: str) -> dict[str, tuple[Any, list[str]]]:
    """The stage modules to export, in export order, with their output names."""
    import copy

    import torch

    from lcmtrt.export.graphs import (AdapterStage, DenoiseStage, DualTextStage, TextStage, VaeDecodeStage,
                                      VaeEncodeStage)

    scaling = checkpoint.vae.config.scaling_factor
    vae = vae_precision(checkpoint, precision)
    sdxl = checkpoint.family == "sdxl"
    if sdxl:
        text = (DualTextStage(checkpoint.text_encoder, checkpoint.text_encoder_2, precision),
                ["prompt_embeds", "text_embeds"])
    else:
        text = (TextStage(checkpoint.text_encoder, precision), ["prompt_embeds"])
    steps = ["next_latents", "denoised"]
    prediction = scheduler.prediction_type
    modules = {"text": text}
    control = checkpoint.controlnet
    states = 0
    if checkpoint.adapter is not None:
        adapter = AdapterStage(checkpoint.adapter, precision)
        with torch.no_grad():  # one probe run: the number and shapes of the states feed the denoise graphs
            probe = adapter(torch.zeros(1, preset.height, preset.width, adapter_channels(checkpoint),
                                        dtype=torch.uint8), torch.ones(1))
        adapter.state_shapes = [tuple(state.shape[1:]) for state in probe]
        states = len(probe)
        modules["adapter"] = (adapter, [f"adapter_state_{k}" for k in range(states)])
    if mode == "cfg":  # one graph without guidance for guidance <= 1, one with the doubled batch for > 1
        modules["denoise"] = (DenoiseStage(copy.deepcopy(checkpoint.unet), precision, prediction, "none", sdxl,
                                           copy.deepcopy(control), states), steps)
        modules["denoise_cfg"] = (DenoiseStage(checkpoint.unet, precision, prediction, "cfg", sdxl, control, states),
                                  steps)
    else:
        modules["denoise"] = (DenoiseStage(checkpoint.unet, precision, prediction, mode, sdxl, control, states), steps)
    if preset.img2img:  # its own copy: the fp16 conversion replaces norm modules in place
        modules["vae_encode"] = (VaeEncodeStage(copy.deepcopy(checkpoint.vae), vae, scaling), ["latents"])
    modules["vae_decode"] = (VaeDecodeStage(checkpoint.vae, vae, scaling), ["images"])
    return modules


REFITTABLE = ("text", "denoise", "denoise_cfg")  # the engines LoRAs change
BATCH_AXES = {
    "denoise": {"coeffs": None},
    "denoise_cfg": {"coeffs": None, "prompt_embeds": "2*batch", "text_embeds": "2*batch", "time_ids": "2*batch"},
    "vae_encode": {"coeffs": None},
}


def _source_info(checkpoint: Any) -> dict[str, Any]:
    """Ids, revision and hashes of the files the checkpoint came from (hub snapshot or local folder)."""
    folder = Path(checkpoint.path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(checkpoint.path, revision=checkpoint.revision, local_files_only=True))
    files = {
        str(p.relative_to(folder)): file_digest(p)["sha256"]
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        for p in sorted((folder / sub).glob("*"))
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt")
    }
    return {
        "model": checkpoint.source,
        "revision": checkpoint.revision or (folder.name if folder.parent.name == "snapshots" else None),
        "files": files,
    }


def build_bundle(
    preset: Preset,
    out: Path,
    backend: str = "auto",
    precision: str | None = None,
    workspace_gb: float | None = None,
    refittable: bool = False,
    device: str = "CPU",
) -> Bundle:
    """Build every engine for `preset` into the bundle folder `out` (replaced atomically when it exists).
    `refittable`: the text and denoise engines keep their LoRA-touchable weights replaceable (Pipeline.apply_loras).
    `device`: the OpenVINO device the bundle targets (CPU, GPU, NPU, ...)."""
    from lcmtrt.engines import onnxruntime_build
    from lcmtrt.export.clip_tokenizer import export_tokenizer
    from lcmtrt.export.models import load_checkpoint
    from lcmtrt.export.onnx_export import export_graph

    backend = resolve_backend(backend)
    ort_device = "cpu"
    if backend == "onnxruntime":
        ort_device = "cuda" if onnxruntime_build.cuda_usable() else "cpu"
    if backend == "openvino":
        from lcmtrt.engines import openvino_build

        openvino_build.check_device(device)
        if refittable:
            raise UserError("--refittable bundles swap LoRAs through ONNX Runtime or TensorRT; build them with "
                            "--backend onnxruntime")
    precision = resolve_precision(backend, precision, ort_device, device)
    # OpenVINO converts fp32 graphs and lowers their precision at compile time, keeping what needs fp32 in fp32
    graph_precision = "fp32" if backend == "openvino" else precision

    if preset.loras:  # a missing or damaged LoRA file is refused before minutes of model loading
        from lcmtrt.export.lora import resolve

        for spec in preset.loras:
            resolve(spec)
    progress = Progress()  # the stage count is known once the checkpoint says which engines it needs
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_bundle(out) as staging:
        with progress.stage(f"load model {preset.model}"):
            checkpoint = load_checkpoint(preset.model, preset.revision, unet=preset.unet, vae=preset.vae,
                                         controlnet=preset.controlnet, adapter=preset.adapter)
        loras = []
        if preset.loras:
            from lcmtrt.export.lora import fuse_loras

            with progress.stage(f"fuse {len(preset.loras)} LoRA(s)"):
                loras = fuse_loras(checkpoint, preset.loras)
        scale = checkpoint.vae_scale_factor
        preset = preset.validate(multiple=8 * max(1, scale // 8))
        scheduler = scheduler_config(checkpoint.scheduler_config)
        (staging / "onnx").mkdir()
        tokenizers = [("tokenizer", checkpoint.tokenizer)]
        if checkpoint.tokenizer_2 is not None:
            tokenizers.append(("tokenizer_2", checkpoint.tokenizer_2))
        text_files, pad_ids = [], []
        for folder, tokenizer in tokenizers:
            (staging / folder).mkdir(exist_ok=True)
            filename, pad_id, length = export_tokenizer(tokenizer, staging / folder)
            text_files.append(f"{folder}/{filename}")
            pad_ids.append(pad_id)
        mode = guidance_mode(checkpoint, preset)
        if preset.cfg and mode == "embedding":
            log.warning("warning: cfg is ignored: this UNet takes guidance through its embedding (LCM-distilled) "
                        "and diffusers never runs classifier-free guidance with it")
        modules = _stage_modules(checkpoint, graph_precision, scheduler, preset, mode)
        progress.total = progress.done + 2 * len(modules) + 1  # so far, export and build each engine, manifest
        examples = _example_inputs(checkpoint, preset, scheduler, modules)
        cfg_batches = tuple(sorted(set(preset.batch_sizes) | {2 * b for b in preset.batch_sizes}))
        engine_batches = {name: cfg_batches if name == "text" and mode == "cfg" else tuple(preset.batch_sizes)
                          for name in modules}
        graphs = {}
        for name in modules:
            with progress.stage(f"export {name} to ONNX ({graph_precision})"):
                module, output_names = modules[name]
                graphs[name] = export_graph(name, module, examples[name], output_names, BATCH_AXES.get(name, {}),
                                            staging / "onnx", refittable and name in REFITTABLE)
                error = graphs[name].max_abs_error
                log.info("      %s: max |onnx - torch| = %s", name, "not checked" if error is None else f"{error:.2e}")
        specs = {n: EngineSpec(n, f"onnx/{n}.onnx", "", g.inputs, g.outputs, engine_batches[n], g.refit_weights)
                 for n, g in graphs.items()}
        specs, build_info = _build_engines(specs, staging, progress, backend, precision, ort_device, device,
                                           workspace_gb, out.parent)
        with progress.stage("write bundle.json"):
            build_info.update({
                "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(),
                "duration_s": round(progress.elapsed, 1),
                "export_max_abs_error": {n: g.max_abs_error for n, g in graphs.items()},
                "vae_precision": vae_precision(checkpoint, precision),
                "graph_precision": graph_precision,
                "batch_invariant": True,  # Sin/Cos padded to whole packets (export/batch_invariance.py)
            })
            bundle = Bundle(
                root=out,
                family=checkpoint.family,
                precision=precision,
                backend=backend,
                guidance_mode=mode,
                height=preset.height,
                width=preset.width,
                batch_sizes=tuple(preset.batch_sizes),
                latent_channels=checkpoint.unet.config.in_channels,
                vae_scale_factor=scale,
                vae_scaling_factor=float(checkpoint.vae.config.scaling_factor),
                default_steps=preset.steps,
                default_guidance_scale=preset.guidance_scale,
                scheduler=scheduler,
                text=TextConfig(tuple(text_files), tuple(pad_ids), length, zero_empty_negative(checkpoint)),
                engines=specs,
                sources={"preset": preset.name, **_source_info(checkpoint),
                         **{k: v for k, v in checkpoint.extra.items() if v}, "loras": loras},
                build=build_info,
                files=_digests(staging),
            )
            (staging / MANIFEST).write_text(json.dumps(bundle.to_json(), indent=2) + "\n")
    log.info("bundle ready: %s (%.1f s)", out, progress.elapsed)
    return bundle


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
        kept = {}
        for name, spec in specs.items():
            with progress.stage(f"convert {name} to OpenVINO IR ({precision}, batch {list(spec.batch_sizes)})"):
                files = openvino_build.convert_graph(staging / spec.onnx, staging, name, spec.inputs, spec.batch_sizes,
                                                     precision)
                artifacts[name] = str(files[0].relative_to(staging))
                if precision != "fp32":
                    kept[name] = openvino_build.verify_fp32_marks(files[0], device, precision)
                    log.info("      %s: %d of %d ops marked fp32 run in fp32 on %s", name, *kept[name], device)
        if kept:
            build_info["fp32_ops_kept"] = {name: {"kept": k, "marked": m} for name, (k, m) in kept.items()}
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


def _digests(staging: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(staging)): file_digest(p) for p in sorted(staging.rglob("*")) if p.is_file()}


# build info that belongs to the ONNX graphs, not the engines
EXPORT_INFO = ("export_max_abs_error", "graph_precision", "batch_invariant")


def convert_bundle(source: Path, out: Path, backend: str = "auto", precision: str | None = None,
                   workspace_gb: float | None = None, device: str = "CPU",
                   batch_sizes: tuple[int, ...] | None = None) -> Bundle:
    """Engines for another backend, precision or set of batch sizes from an existing bundle's ONNX graphs (their
    batch axis is dynamic), without exporting again; written atomically like build_bundle."""
    from lcmtrt.engines import onnxruntime_build
    from lcmtrt.runtime.bundle import load_bundle

    src = load_bundle(source)
    graph_precision = src.build.get("graph_precision", src.precision)
    backend = resolve_backend(backend)
    ort_device = "cuda" if backend == "onnxruntime" and onnxruntime_build.cuda_usable() else "cpu"
    if backend == "openvino":
        from lcmtrt.engines import openvino_build

        openvino_build.check_device(device)
    precision = resolve_precision(backend, precision or (graph_precision if backend != "openvino" else None),
                                  ort_device, device)
    wanted = "fp32" if backend == "openvino" else precision
    if graph_precision != wanted:
        raise UserError(f"{source} holds {graph_precision} ONNX graphs but a {backend} {precision} bundle needs "
                        f"{wanted} ones; convert from a bundle built with --precision {wanted}")
    if backend == "openvino" and any(e.refit_weights for e in src.engines.values()):
        raise UserError(f"{source} is refittable (LoRA swaps through ONNX Runtime or TensorRT); convert from a bundle "
                        "built without --refittable")
    progress = Progress(total=len(src.engines) + 2)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_bundle(out) as staging:
        with progress.stage(f"copy ONNX graphs and tokenizers from {source}"):
            keep = {e.onnx for e in src.engines.values()} | set(src.text.tokenizers)
            for rel in src.files:
                if rel in keep or any(rel.startswith(k + ".") for k in keep):  # a graph's external-data file too
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(src.path(rel), staging / rel)
        batches = tuple(batch_sizes or src.batch_sizes)
        if len(set(batches)) != len(batches):
            raise UserError(f"batch sizes {list(batches)} must be distinct")
        doubled = tuple(sorted(set(batches) | {2 * b for b in batches}))  # CFG's text rows
        specs = {n: replace(e, batch_sizes=doubled if n == "text" and src.guidance_mode == "cfg" else batches)
                 for n, e in src.engines.items()}
        specs, build_info = _build_engines(specs, staging, progress, backend, precision, ort_device,
                                           device, workspace_gb, out.parent)
        with progress.stage("write bundle.json"):
            build_info.update({k: src.build[k] for k in EXPORT_INFO if k in src.build})
            build_info.update({"built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "host": platform.node(), "duration_s": round(progress.elapsed, 1),
                               "vae_precision": "fp32" if src.build.get("vae_precision") == "fp32" else precision,
                               "graph_precision": graph_precision, "converted_from": str(Path(source).resolve())})
            bundle = replace(src, root=out, backend=backend, precision=precision, engines=specs, build=build_info,
                             batch_sizes=batches, files=_digests(staging))
            (staging / MANIFEST).write_text(json.dumps(bundle.to_json(), indent=2) + "\n")
    log.info("bundle ready: %s (%.1f s)", out, progress.elapsed)
    return bundle


def _link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link a graph into the new bundle (no space used, the source is never written to); copy across devices."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


@contextmanager
def staged_bundle(out: Path) -> Iterator[Path]:
    """A staging folder beside `out`, renamed to `out` when the block finishes and removed if it fails: an
    interrupted build never leaves a folder that looks like a bundle. One build at a time per `out` (build_lock)."""
    with build_lock(out):  # before the staging folder, so a refused build leaves nothing behind
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            yield staging
            _replace_dir(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """One build at a time into `out`: a second one is refused instead of interleaving its files."""
    import fcntl

    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise UserError(f"another build is writing {out} ({holder}); wait for it or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished staging folder to `out`, replacing an older bundle only once the new one is complete."""
    if out.exists():
        if not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not an lcmtrt bundle; choose another --out")
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
