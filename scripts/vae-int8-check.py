"""What static int8 (weights and activations) would buy the VAE decoder, measured: an int8 bundle keeps the decoder
weight-only (engines/openvino_quantize.py); this quantizes an fp32 OpenVINO bundle's decoder with nncf.quantize on
latents that bundle's own pipeline generates from the built-in calibration prompts, then compares the two decoders
on the fidelity prompts' latents (PSNR, max difference, % of pixels within 1/255) and times them alternated after a
warm-up, both compiled in fp32 in this process. Nothing is written to the bundle.

usage: python scripts/vae-int8-check.py FP32_OPENVINO_BUNDLE [--samples 8] [--preset performance|mixed]
       [--rounds 4] [--keep-last-conv-fp32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import numpy as np


class _RecordLatents:
    """A vae_decode binding that keeps a copy of its input latents each time it runs."""

    def __init__(self, binding: Any, latents: Any, into: list[np.ndarray]):
        self.binding, self.latents, self.into = binding, latents, into

    def run(self) -> None:
        self.into.append(np.array(self.latents.read(), copy=True))
        self.binding.run()

    def release(self) -> None:
        self.binding.release()


class _Recorder:
    def __init__(self, backend: Any, into: list[np.ndarray]):
        self.backend, self.into = backend, into

    def bind(self, engine: str, batch: int, tensors: dict[str, Any]) -> Any:
        binding = self.backend.bind(engine, batch, tensors)
        return _RecordLatents(binding, tensors["latents"], self.into) if engine == "vae_decode" else binding

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


def main() -> None:
    import nncf
    import openvino as ov

    from lcmtrt.bundle import load_bundle
    from lcmtrt.engines.openvino_quantize import CALIBRATION_PROMPTS, FIDELITY_PROMPTS, overflow_fix_for
    from lcmtrt.runtime.backends.cpu import cpu_info
    from lcmtrt.runtime.backends.openvino import OpenVinoBackend
    from lcmtrt.runtime.images import compare_images
    from lcmtrt.runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--samples", type=int, default=8, help="calibration latents (one generation each)")
    parser.add_argument("--preset", choices=["performance", "mixed"], default="mixed",
                        help="NNCF preset: mixed quantizes activations asymmetrically")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--keep-last-conv-fp32", action="store_true")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    if bundle.backend != "openvino" or bundle.precision != "fp32":
        raise SystemExit(f"{args.bundle} is a {bundle.backend} {bundle.precision} bundle; this needs OpenVINO fp32")
    latents: list[np.ndarray] = []
    pipeline = Pipeline(bundle, _Recorder(OpenVinoBackend(bundle, "auto"), latents))
    start = time.perf_counter()
    for g in range(args.samples):
        pipeline.generate([CALIBRATION_PROMPTS[g % len(CALIBRATION_PROMPTS)]], seed=g)
    for prompt in FIDELITY_PROMPTS:
        pipeline.generate([prompt], seed=0)
    calibration, fidelity = latents[:args.samples], latents[args.samples:]
    print(f"{len(calibration)} calibration and {len(fidelity)} fidelity latents in {time.perf_counter() - start:.0f} s")

    core = ov.Core()
    model = core.read_model(str(bundle.path("ov/vae_decode.b1.xml")))
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    ignored = nncf.IgnoredScope(names=convs[-1:] if args.keep_last_conv_fp32 else [])
    overflow_fix = overflow_fix_for(cpu_info()[1])
    nncf.set_log_level(logging.WARNING)
    start = time.perf_counter()
    quantized = nncf.quantize(
        model, nncf.Dataset([{"latents": x} for x in calibration]), subset_size=len(calibration),
        preset=nncf.QuantizationPreset(args.preset), ignored_scope=ignored,
        advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix(overflow_fix)))
    print(f"nncf.quantize ({args.preset}, overflow fix {overflow_fix}) in {time.perf_counter() - start:.0f} s")

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    compiled = {"fp32": core.compile_model(model, "CPU", config), "int8": core.compile_model(quantized, "CPU", config)}
    runs_at: dict[str, int] = {}
    for op in compiled["int8"].get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Convolution", "MatMul", "FullyConnected"):
            precision = info["runtimePrecision"].astype(str)
            runs_at[precision] = runs_at.get(precision, 0) + 1
    print("int8 decoder's convolutions and matrix products run at", runs_at)
    requests = {side: c.create_infer_request() for side, c in compiled.items()}
    images = {side: np.concatenate([r.infer({"latents": x})[0].copy() for x in fidelity])
              for side, r in requests.items()}
    f = compare_images(images["int8"], images["fp32"])
    print(f"int8 decoder vs fp32 ({len(fidelity)} images): PSNR {f['psnr_db']:.1f} dB, max difference "
          f"{f['max_diff']}/255, {f['within_1_pct']:.1f}% of pixels within 1/255")
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for side in times:
        requests[side].infer({"latents": fidelity[0]})  # warm-up
    for _ in range(args.rounds):
        for side in ("fp32", "int8", "int8", "fp32"):
            start = time.perf_counter()
            requests[side].infer({"latents": fidelity[0]})
            times[side].append(time.perf_counter() - start)
    median = {side: statistics.median(t) for side, t in times.items()}
    print(f"VAE decode per call, {2 * args.rounds} each: fp32 {median['fp32'] * 1e3:.0f} ms, int8 "
          f"{median['int8'] * 1e3:.0f} ms ({median['fp32'] / median['int8']:.2f}x)")


if __name__ == "__main__":
    main()
