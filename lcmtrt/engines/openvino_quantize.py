"""int8 OpenVINO bundles: the bundle's own fp32 IR quantized by NNCF at build time.

- `denoise` (and `denoise_cfg`): weights and activations in int8 (`nncf.quantize`) on a calibration set the build
  makes itself, with nothing downloaded: the fp32 IR's pipeline runs CALIBRATION_PROMPTS at the bundle's default
  steps, each denoise engine at a guidance that runs it (calibration_guidances), each generation from its own fixed
  seed, and every denoise call's inputs are recorded. The settings are NNCF's recipe for LCM UNets (its LCM
  notebook, the 1.32x anchor): model type TRANSFORMER (SmoothQuant on the matrix products, attention kept as
  OpenVINO fuses it), bias correction off.
- `text`, `vae_decode`, `vae_encode`, `inpaint_encode`: weight-only int8 (`nncf.compress_weights`, INT8_ASYM, per
  output channel), as optimum-intel's hybrid mode does: they run once per image, and static int8 activations in the
  VAE cost the most pixels (sd15-random's decoder alone: 38 dB from fp32, max 22 levels). No activation is
  quantized in their IR, but OpenVINO's CPU plugin runs matrix products with int8 weights through dynamic
  quantization (u8 activations per group at run time): the text encoder's (fc1 among them) and the VAE's attention
  projections do run int8 arithmetic; convolutions run in floating point.
- `vae_decode` with `vae_decode="activations"` (`build-engines --int8-vae activations`): weights and activations int8
  (`nncf.quantize`, preset MIXED: asymmetric activations after SiLU) on the calibration generations' final latents,
  one per generation (both passes of a CFG bundle's calibration), recorded where the calibration skips decoding;
  not in the weight-only list then. ~2x faster decoder on a CPU without VNNI, for those pixels.
- What is not quantized runs at the device's default inference precision (bf16 on CPUs with avx512_bf16 or AMX,
  f32 elsewhere; runtime/backends/openvino.py sets no hint for int8).

The int8 images are then compared with the fp32 IR's on FIDELITY_PROMPTS, and bundle.json records the calibration
(prompts, seeds, guidances and the noise source: the same seeds draw other noise with numpy than with torch) and that
fidelity under build.int8. Two builds on the same machine with the same OpenVINO, NNCF and noise source give the same
weights. nncf (and the torch it imports) is imported here only: never by the runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AbstractSet, Any, Iterator

import numpy as np

from lcmtrt.bundle import Bundle, EngineSpec
from lcmtrt.engines.openvino_build import (compiled_precisions, ir_name, reshape, runtime_precisions,
                                          save_ir)
from lcmtrt.engines.staging import Progress
from lcmtrt.runtime.backends.cpu import INT8_FLAGS, cpu_info
from lcmtrt.runtime.conditioning import condition_images
from lcmtrt.runtime.images import compare_images
from lcmtrt.runtime.settings import GenerationSettings

log = logging.getLogger("lcmtrt.engines.build")  # progress lines under the build's name, as users see them

# varied subjects, media and lighting, so the activation ranges are not those of one kind of picture
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a windowsill, soft morning light",
    "a lighthouse on a rocky cliff at dusk, dramatic clouds",
    "portrait of an old fisherman, oil painting, detailed wrinkles",
    "a bowl of fruit on a wooden table, still life",
    "a futuristic city skyline at night, neon lights, rain",
    "a snowy mountain village, warm lights in the windows",
    "a red vintage car parked on a cobblestone street",
    "an astronaut riding a horse on the moon, digital art",
    "a watercolor painting of a forest in autumn",
    "close-up of a hummingbird drinking from a flower, macro photo",
    "a cozy library with tall bookshelves and a fireplace",
    "a bowl of ramen with egg and scallions, food photography",
    "a medieval castle on a hill, fantasy illustration",
    "a golden retriever puppy playing in the grass",
    "an underwater coral reef with colorful fish",
    "sand dunes under a starry sky, long exposure",
    "a steaming cup of coffee on a cafe table, bokeh",
    "pencil sketch of a sailing ship on rough seas",
    "a field of sunflowers under a blue sky, impressionist",
    "a robot reading a newspaper in a park, 3d render",
    "a japanese garden with a red bridge and a koi pond",
    "a black and white photo of a busy train station",
    "a bouquet of roses in a glass vase, studio lighting",
    "an abstract painting with bold geometric shapes",
)
FIDELITY_PROMPTS: tuple[str, ...] = ("a photo of a cat", "a cinematic photo of a lighthouse on a cliff at dusk")
WEIGHT_ONLY = ("text", "vae_decode", "vae_encode", "inpaint_encode")  # weight-only int8; the adapter (T2I) stays
VAE_DECODE_MODES = ("weights", "activations")  # what int8 quantizes of the VAE decoder
# the guidance denoise_cfg is calibrated at when the bundle's default (LCM-LoRA: 1.0) runs no classifier-free guidance
CFG_CALIBRATION_GUIDANCE = 4.0


@dataclass(frozen=True)
class Int8Settings:
    """How an int8 bundle is calibrated and checked (all fixed: two builds of one model on one machine, with the same
    OpenVINO, NNCF and noise source, give the same weights)."""

    samples: int = 32  # denoise calls in the calibration set (NNCF's subset_size): samples / steps generations
    first_seed: int = 0  # calibration generation g draws its noise from seed first_seed + g
    fidelity_prompts: tuple[str, ...] = FIDELITY_PROMPTS
    fidelity_seed: int = 0
    vae_decode: str = "weights"  # VAE_DECODE_MODES: weight-only int8, or weights and activations

    def __post_init__(self) -> None:
        if self.vae_decode not in VAE_DECODE_MODES:
            raise ValueError(f"vae_decode must be one of {VAE_DECODE_MODES}, not {self.vae_decode!r}")


def int8_stages(engines: dict[str, EngineSpec], settings: Int8Settings = Int8Settings()) -> int:
    """Progress stages quantize_bundle adds: capture, one per denoise engine (and the VAE decoder when its
    activations are quantized), weight compression, fidelity."""
    return 3 + sum(name.startswith("denoise") for name in engines) + (settings.vae_decode == "activations")


class _Recorded:
    """A denoise binding that keeps a copy of its inputs each time it runs (until `limit` are kept)."""

    def __init__(self, binding: Any, inputs: dict[str, Any], into: list[dict[str, np.ndarray]], limit: int):
        self.binding, self.inputs, self.into, self.limit = binding, inputs, into, limit

    def run(self) -> None:
        if len(self.into) < self.limit:
            self.into.append({name: np.array(buffer.read(), copy=True) for name, buffer in self.inputs.items()})
        self.binding.run()

    def release(self) -> None:
        self.binding.release()


class _Skippable:
    """The VAE decoder's binding, skipped while the calibration runs (it needs the denoise inputs, not pictures),
    keeping a copy of the latents it would decode when the owner records them."""

    def __init__(self, binding: Any, owner: _CalibrationBackend, latents: Any):
        self.binding, self.owner, self.latents = binding, owner, latents

    def run(self) -> None:
        if self.owner.decode:
            self.binding.run()
        elif self.owner.record_latents:
            self.owner.latents.append(np.array(self.latents.read(), copy=True))

    def release(self) -> None:
        self.binding.release()


class _CalibrationBackend:
    """The fp32 OpenVINO backend with every denoise engine's inputs recorded and the VAE decoder switchable."""

    def __init__(self, backend: Any, bundle: Bundle, limit: int):
        self.backend, self.bundle, self.limit = backend, bundle, limit
        self.samples: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in bundle.engines if n.startswith("denoise")}
        self.decode = True
        self.record_latents = False  # the VAE decoder's inputs, for static int8 activations there
        self.latents: list[np.ndarray] = []

    def bind(self, engine: str, batch: int, tensors: dict[str, Any]) -> Any:
        binding = self.backend.bind(engine, batch, tensors)
        if engine in self.samples:
            inputs = {t.name: tensors[t.name] for t in self.bundle.engines[engine].inputs}
            return _Recorded(binding, inputs, self.samples[engine], self.limit)
        return _Skippable(binding, self, tensors["latents"]) if engine == "vae_decode" else binding

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs per op and draws progress bars on stdout, where the CLI prints only the bundle's path; the build's
    own stage lines say what runs and for how long."""
    import nncf

    nncf.set_log_level(logging.WARNING)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _pipeline(view: Bundle, precision: str, calibration_limit: int | None = None) -> Any:
    """A pipeline over the staged IR at `precision`, outside OpenVINO's model cache (this IR is about to change)."""
    from lcmtrt.runtime.backends.openvino import OpenVinoBackend
    from lcmtrt.runtime.pipeline import Pipeline

    bundle = replace(view, precision=precision)
    backend: Any = OpenVinoBackend(bundle, "auto", cache=False)
    if calibration_limit is not None:
        backend = _CalibrationBackend(backend, bundle, calibration_limit)
    return Pipeline(bundle, backend)


def calibration_guidances(view: Bundle) -> dict[str, float]:
    """The guidance scale each denoise engine is calibrated at: one that runs it (the pipeline takes denoise_cfg iff
    guidance > 1 on a bundle without a guidance embedding), the bundle's default where that one does."""
    default = view.default_guidance_scale
    if view.guidance_mode == "embedding":
        return {"denoise": default}
    guidances = {"denoise": default if default <= 1.0 else 1.0}
    if "denoise_cfg" in view.engines:
        guidances["denoise_cfg"] = default if default > 1.0 else CFG_CALIBRATION_GUIDANCE
    return guidances


def _noise_source(pipeline: Any) -> str:
    """How the calibration's noise was drawn: the seeds alone do not fix it (torch and numpy draw differently)."""
    if pipeline.noise == "torch":
        import torch

        return f"torch.Generator().manual_seed(seed), torch {torch.__version__}"
    return f"numpy.random.Generator(PCG64(seed)), numpy {np.__version__}"


def capture_calibration(view: Bundle, settings: Int8Settings) -> tuple[dict[str, list[dict[str, np.ndarray]]],
                                                                       np.ndarray, dict[str, Any]]:
    """Run the fp32 IR over CALIBRATION_PROMPTS and record each denoise call's inputs (at most settings.samples per
    denoise engine, each run at a guidance that takes it: calibration_guidances) and, when the VAE decoder's
    activations are quantized, each generation's final latents (as "vae_decode" samples); then the fp32 images of the
    fidelity prompts. A 9-channel inpainting bundle repaints a blank image under a full mask (Pipeline.runnable).
    Returns (samples per engine, those images, what the calibration was)."""
    pipeline = _pipeline(view, "fp32", settings.samples)
    recorder: _CalibrationBackend = pipeline.backend
    conditions = condition_images(view)
    steps = view.default_steps
    generations = -(-settings.samples // steps)
    guidances = calibration_guidances(view)
    recorder.decode = False
    recorder.record_latents = settings.vae_decode == "activations"
    seeds = []
    for guidance in dict.fromkeys(guidances.values()):  # one pass per distinct guidance
        for g in range(generations):
            seeds.append(settings.first_seed + g)
            run = pipeline.runnable(GenerationSettings(steps=steps, guidance_scale=guidance, **conditions))
            pipeline.generate([CALIBRATION_PROMPTS[g % len(CALIBRATION_PROMPTS)]], seed=seeds[-1], settings=run)
    recorder.decode, recorder.record_latents = True, False
    prompts = list(settings.fidelity_prompts)
    reference = pipeline.generate(prompts, seed=settings.fidelity_seed, settings=fidelity_settings(pipeline)).images
    missing = [name for name, kept in recorder.samples.items() if not kept]
    if missing:
        raise RuntimeError(f"the calibration ran no {missing[0]} step")  # calibration_guidances runs each one
    info = {"samples": {name: len(kept) for name, kept in recorder.samples.items()}, "generations": len(seeds),
            "prompts": min(generations, len(CALIBRATION_PROMPTS)), "seeds": sorted(set(seeds)), "steps": steps,
            "guidance_scales": guidances, "noise": _noise_source(pipeline)}
    if view.inpaint == "unet9":
        info["inpainting"] = "a black image under a mask repainting everything"
    samples = dict(recorder.samples)
    if settings.vae_decode == "activations":
        samples["vae_decode"] = [{"latents": latents} for latents in recorder.latents]
        info["samples"]["vae_decode"] = len(recorder.latents)
    return samples, reference, info


def fidelity_settings(pipeline: Any) -> GenerationSettings:
    """The fidelity images' settings: the bundle's defaults (a 9-channel inpainting bundle: a full repaint)."""
    view = pipeline.bundle
    return pipeline.runnable(GenerationSettings(steps=view.default_steps, **condition_images(view)))


def _unit_head_projections(model: Any) -> list[str]:
    """Matrix products whose output is split into attention heads of width 1 (only tiny test models have them):
    OpenVINO's CPU plugin fails to compile a quantized graph that moves their dequantization through that reshape
    (ReshapeTransformation), so NNCF leaves them in floating point."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Reshape":
            continue
        source, before, after = op.input_value(0).get_node(), op.get_input_partial_shape(0), op.get_output_partial_shape(0)
        if (source.get_type_name() == "MatMul" and after.rank.get_length() == before.rank.get_length() + 1
                and after[-1] == 1):
            names.append(source.get_friendly_name())
    return names


def quantize_denoise(staging: Path, spec: EngineSpec, samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """nncf.quantize the engine's IR at the batch size the calibration ran, then the same quantized graph reshaped
    for every built batch size (one set of quantization parameters: a row's numbers do not depend on its batch)."""
    import nncf
    import openvino as ov

    batch = int(samples[0]["latents"].shape[0])
    model = ov.Core().read_model(str(staging / ir_name(spec.name, batch)))
    ignored = _unit_head_projections(model)
    overflow_fix = overflow_fix_for(cpu_info()[1])
    with _quiet_nncf():
        quantized = nncf.quantize(
            model, nncf.Dataset(samples), subset_size=len(samples), model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                disable_bias_correction=True, overflow_fix=nncf.OverflowFix(overflow_fix)))
    first_bin = None
    for b in spec.batch_sizes:
        reshape(quantized, spec.inputs, b)
        first_bin = save_ir(quantized, staging / ir_name(spec.name, b), first_bin)
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    return {"method": "nncf.quantize (model_type TRANSFORMER, SmoothQuant, no bias correction)",
            "calibration_batch": batch, "fake_quantize_ops": fake_quantize, "left_in_floating_point": len(ignored),
            "overflow_fix": overflow_fix}


def quantize_vae_decode(staging: Path, spec: EngineSpec, samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Weights and activations int8 for the VAE decoder (`nncf.quantize`, preset MIXED: the SiLU outputs its
    convolutions read are far from symmetric), at the batch size the calibration ran, then reshaped for every built
    batch size."""
    import nncf
    import openvino as ov

    batch = int(samples[0]["latents"].shape[0])
    model = ov.Core().read_model(str(staging / ir_name(spec.name, batch)))
    overflow_fix = overflow_fix_for(cpu_info()[1])
    with _quiet_nncf():
        quantized = nncf.quantize(
            model, nncf.Dataset(samples), subset_size=len(samples), preset=nncf.QuantizationPreset.MIXED,
            advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix(overflow_fix)))
    first_bin = None
    for b in spec.batch_sizes:
        reshape(quantized, spec.inputs, b)
        first_bin = save_ir(quantized, staging / ir_name(spec.name, b), first_bin)
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    return {"method": "nncf.quantize (preset MIXED, weights and activations)", "calibration_batch": batch,
            "fake_quantize_ops": fake_quantize, "overflow_fix": overflow_fix}


def overflow_fix_for(flags: AbstractSet[str]) -> str:
    """NNCF's overflow fix for the building CPU: without VNNI or AMX int8, oneDNN sums u8 x s8 pairs in 16 bits
    (vpmaddubsw), which saturate unless every layer's weights keep to 7 bits ("enable"; measured on an AMD EPYC Zen 3,
    tiny-sd15: 42.0 dB and max 12 against fp32 without, 46.4 dB and max 7 with, as a VNNI CPU gets); with int8 dot
    products, NNCF's default ("first_layer_only") keeps 8-bit weights. Unknown flags: the safe "enable"."""
    return "first_layer_only" if any(flag in flags for flag in INT8_FLAGS) else "enable"


def compress_weights(staging: Path, spec: EngineSpec) -> dict[str, Any]:
    """Weight-only int8 (INT8_ASYM, per output channel) for every batch size's IR of the engine."""
    import nncf
    import openvino as ov

    first_bin, layers = None, 0
    for b in spec.batch_sizes:
        xml = staging / ir_name(spec.name, b)
        with _quiet_nncf():
            compressed = nncf.compress_weights(ov.Core().read_model(str(xml)), mode=nncf.CompressWeightsMode.INT8_ASYM)
        layers = sum(_int8_weight(op) for op in compressed.get_ordered_ops())
        first_bin = save_ir(compressed, xml, first_bin)
    return {"method": "nncf.compress_weights (INT8_ASYM, weight-only)", "int8_weight_layers": layers}


def _int8_weight(op: Any) -> bool:
    """A compressed weight: a u8/i8 constant decompressed by a Convert (zero points are u8 constants too, and are
    not counted: they feed a Convert into a Subtract, not the weights' own chain to a Multiply)."""
    if op.get_type_name() != "Constant" or op.get_element_type().get_type_name() not in ("u8", "i8"):
        return False
    consumers = [t.get_node() for t in op.output(0).get_target_inputs()]
    return any(c.get_type_name() == "Convert" and any(t.get_node().get_type_name() == "Subtract" and t.get_index() == 0
                                                      for t in c.output(0).get_target_inputs()) for c in consumers)


def heavy_op_precisions(view: Bundle, staging: Path, compiled: dict[tuple[str, int], Any]) -> dict[str, dict[str, int]]:
    """Every engine's convolutions and matrix products by the precision they run at: from the models the fidelity
    run compiled, and the engines it never ran (vae_encode, denoise_cfg at guidance 1, ...) compiled here."""
    runs_at = {name: runtime_precisions(model) for (name, _), model in compiled.items()}
    device = view.build.get("ov_device", "CPU")
    for name, spec in view.engines.items():
        if name not in runs_at:
            runs_at[name] = compiled_precisions(staging / ir_name(name, spec.batch_sizes[0]), device, "int8")
    return {name: runs_at[name] for name in view.engines}


@contextlib.contextmanager
def _timed(progress: Progress, what: str, record: dict[str, Any]) -> Iterator[None]:
    """A progress stage whose seconds are also written into `record` (bundle.json keeps what each step cost)."""
    start = time.perf_counter()
    with progress.stage(what):
        yield
    record["seconds"] = round(time.perf_counter() - start, 1)


def quantize_bundle(view: Bundle, staging: Path, progress: Progress,
                    settings: Int8Settings = Int8Settings()) -> dict[str, Any]:
    """Quantize the fp32 IR staged for `view` (a bundle rooted at `staging`) in place; returns build.int8 and sets
    build.heavy_op_precisions. Each step is a progress stage with its time."""
    import nncf

    info: dict[str, Any] = {"nncf_version": nncf.__version__, "vae_decode_int8": settings.vae_decode,
                            "calibration": {}, "weight_only": {}, "fidelity": {}}
    with _timed(progress, f"capture the int8 calibration set ({settings.samples} denoise calls, fp32 IR)",
                info["calibration"]):
        samples, reference, calibration = capture_calibration(view, settings)
    info["calibration"].update(calibration)
    for name, kept in samples.items():
        info[name] = {}
        what = "weights and activations" if name == "vae_decode" else ""
        with _timed(progress, f"quantize {name} {what + ' ' if what else ''}to int8 with NNCF ({len(kept)} "
                    f"calibration samples)", info[name]):
            quantize = quantize_vae_decode if name == "vae_decode" else quantize_denoise
            info[name].update(quantize(staging, view.engines[name], kept))
    weight_only = [name for name in WEIGHT_ONLY if name in view.engines and name not in samples]
    with _timed(progress, f"compress the weights of {', '.join(weight_only)} to int8", info["weight_only"]):
        info["weight_only"]["engines"] = {name: compress_weights(staging, view.engines[name]) for name in weight_only}
    with _timed(progress, "compare int8 with the fp32 IR", info["fidelity"]):
        pipeline = _pipeline(view, "int8")
        prompts = list(settings.fidelity_prompts)
        ours = pipeline.generate(prompts, seed=settings.fidelity_seed, settings=fidelity_settings(pipeline)).images
        info["fidelity"].update({"reference": "fp32 IR", "prompts": prompts, "seed": settings.fidelity_seed,
                                 "steps": view.default_steps, **compare_images(ours, reference)})
        view.build["heavy_op_precisions"] = heavy_op_precisions(view, staging, pipeline.backend.compiled)
        f = info["fidelity"]
        log.info("      int8 against fp32 (%d prompts, seed %d, %d steps): PSNR %.1f dB, max difference %d/255, "
                 "%.2f%% of pixels within 1/255", len(prompts), settings.fidelity_seed, view.default_steps,
                 f["psnr_db"], f["max_diff"], f["within_1_pct"])
        for name, runs_at in view.build["heavy_op_precisions"].items():
            log.info("      %s: convolutions and matrix products run at %s", name,
                     ", ".join(f"{n} {p}" for p, n in sorted(runs_at.items())))
    return info
