"""ONNX Runtime's intra-op spinning between engines, measured: the same bundle loaded twice, once with spinning
allowed (ONNX Runtime's default) and once without (lcmtrt's setting), requests alternated after a warm-up.

usage: python scripts/spinning-check.py BUNDLE [ITERATIONS]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from lcmtrt.runtime.backends import onnxruntime as backend_ort
from lcmtrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
from lcmtrt.bundle import load_bundle
from lcmtrt.runtime.pipeline import Pipeline


def pipeline(bundle_dir: str, spinning: str) -> Pipeline:
    original = backend_ort.ort.SessionOptions.add_session_config_entry

    def entry(options, key: str, value: str) -> None:  # lcmtrt sets "0"; this run may ask for ONNX Runtime's default
        original(options, key, spinning if key == backend_ort.NO_SPINNING else value)

    backend_ort.ort.SessionOptions.add_session_config_entry = entry
    try:
        bundle = load_bundle(bundle_dir)
        return Pipeline(bundle, OnnxRuntimeBackend(bundle))
    finally:
        backend_ort.ort.SessionOptions.add_session_config_entry = original


def main() -> None:
    bundle_dir, iterations = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    contenders = {"spinning (ORT default)": pipeline(bundle_dir, "1"), "no spinning (lcmtrt)": pipeline(bundle_dir, "0")}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    stages: dict[str, list[float]] = {name: [] for name in contenders}
    for p in contenders.values():
        for _ in range(3):
            p.generate(["a cat"], seed=0, steps=4)
    for _ in range(iterations):
        for name, p in contenders.items():
            start = time.perf_counter()
            p.generate(["a cat"], seed=0, steps=4)
            times[name].append(time.perf_counter() - start)
            stages[name].append(sum(p.stage_times(1, 4).values()))
    for name in contenders:
        e2e, parts = np.asarray(times[name]) * 1000, np.asarray(stages[name]) * 1000
        print(f"{name:24s} end to end p50 {np.median(e2e):7.2f} ms, p90 {np.percentile(e2e, 90):7.2f} ms; "
              f"sum of stages {np.median(parts):7.2f} ms; gap {100 * (1 - np.median(parts) / np.median(e2e)):5.1f}%")


if __name__ == "__main__":
    main()
