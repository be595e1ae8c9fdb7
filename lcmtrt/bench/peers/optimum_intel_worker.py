"""The optimum-intel peer's worker: run with the peer venv's Python (scripts/optimum-intel-env.sh), never imported
by lcmtrt. It speaks JSON lines: one request per line on stdin, one reply per line on the original stdout.

  {"cmd": "load", "checkpoint": DIR, "cache": DIR, "height": H, "width": W, "batch": B, "precision": "fp32"|"default",
   "steps": N, "guidance_scale": G, "compile_cache": false}
      ->  {"ok": true, "load_s": .., "export_s": .., "import_s": .., "versions": {..}, ...}
  {"cmd": "run", "steps": N, "guidance_scale": G, "seed": S}  ->  {"ok": true, "seconds": ..}
  {"cmd": "quit"}

A failure is answered {"ok": false, "error": "one line"}; details go to stderr, which the caller keeps in a log file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("lcmtrt.optimum_intel_worker")

ENV_SCRIPT = "scripts/optimum-intel-env.sh"
EXPORT_WEIGHT_FORMAT = "fp32"  # explicit: optimum-intel compresses models over 1B parameters to int8 by default
PROMPT = "a cinematic photo of a lighthouse on a cliff at dusk, detailed, 8k"  # bench's prompt
PRECISION_CONFIGS = {"fp32": {"INFERENCE_PRECISION_HINT": "f32"}, "default": {}}  # default: bf16 on bf16-capable CPUs


class WorkerError(Exception):
    """A failure reported to the caller as one line."""


def checkpoint_stamp(checkpoint: Path) -> str:
    """The export cache key: checkpoint path, its newest file's mtime, and the exporter's versions."""
    from importlib.metadata import version

    newest = max((p.stat().st_mtime_ns for p in checkpoint.rglob("*") if p.is_file()), default=0)
    text = "|".join([str(checkpoint.resolve()), str(newest), EXPORT_WEIGHT_FORMAT,
                     version("optimum-intel"), version("openvino")])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def exported_model(checkpoint: Path, cache: Path) -> tuple[Path, float]:
    """The checkpoint exported to OpenVINO IR (once per stamp; written to a staging folder, then renamed)."""
    target = cache / f"{checkpoint.name}-{checkpoint_stamp(checkpoint)}"
    if (target / "model_index.json").is_file():
        return target, 0.0
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    cli = Path(sys.executable).with_name("optimum-cli")
    command = [str(cli), "export", "openvino", "--model", str(checkpoint), "--task", "text-to-image",
               "--weight-format", EXPORT_WEIGHT_FORMAT, str(staging)]
    log.info("exporting %s to OpenVINO IR: %s", checkpoint, " ".join(command))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0 or not (staging / "model_index.json").is_file():
            raise WorkerError(f"`optimum-cli export openvino` of {checkpoint} failed (exit {done.returncode})")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target, time.perf_counter() - start


class Peer:
    def __init__(self) -> None:
        self.pipe: Any = None
        self.batch = 0
        self.height = self.width = 0

    def load(self, request: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            if importlib.util.find_spec("optimum") is None:  # say so before spending seconds on importing torch
                raise ImportError("no module named optimum")
            import torch
            from optimum.intel import OVLatentConsistencyModelPipeline
        except Exception as e:  # a venv without optimum-intel, or a broken one
            raise WorkerError(f"{sys.executable} cannot import optimum-intel ({type(e).__name__}: {e}); "
                              f"create the peer venv with `{ENV_SCRIPT}`") from e
        import_s = time.perf_counter() - start
        checkpoint = Path(request["checkpoint"])
        if request["precision"] not in PRECISION_CONFIGS:
            raise WorkerError(f"precision {request['precision']!r} is not one of {sorted(PRECISION_CONFIGS)}")
        start = time.perf_counter()
        model_dir, export_s = exported_model(checkpoint, Path(request["cache"]))
        self.batch, self.height, self.width = request["batch"], request["height"], request["width"]
        ov_config = dict(PRECISION_CONFIGS[request["precision"]])
        if request.get("compile_cache"):  # optimum-intel sets OpenVINO's compiled-model cache only for GPUs by default
            ov_config["CACHE_DIR"] = str(model_dir / "model_cache")
        self.pipe = OVLatentConsistencyModelPipeline.from_pretrained(str(model_dir), ov_config=ov_config, compile=False)
        # a batch is one prompt's num_images_per_prompt: optimum-intel's static reshape gives the VAE decoder that
        # batch, not batch_size (batch_size=2 with num_images_per_prompt=1 fails in the decoder)
        self.pipe.reshape(batch_size=1, height=self.height, width=self.width, num_images_per_prompt=self.batch)
        self.pipe.compile()
        self.pipe.set_progress_bar_config(disable=True)
        self.generate(request["steps"], request["guidance_scale"], 0)
        load_s = time.perf_counter() - start
        from importlib.metadata import version

        versions = {name: version(name) for name in ("optimum-intel", "optimum", "openvino", "diffusers",
                                                      "transformers", "huggingface-hub", "torch")}
        return {"load_s": load_s, "export_s": export_s, "import_s": import_s, "model_dir": str(model_dir),
                "versions": versions, "threads": torch.get_num_threads()}

    def generate(self, steps: int, guidance_scale: float, seed: int) -> float:
        import torch

        generator = torch.Generator("cpu").manual_seed(seed)
        start = time.perf_counter()
        images = self.pipe(PROMPT, num_images_per_prompt=self.batch, num_inference_steps=steps,
                           guidance_scale=guidance_scale, height=self.height, width=self.width, generator=generator,
                           output_type="np").images
        seconds = time.perf_counter() - start
        if images.shape[0] != self.batch:
            raise WorkerError(f"optimum-intel returned {images.shape[0]} images for a batch of {self.batch}")
        return seconds

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["cmd"] == "load":
            return self.load(request)
        if self.pipe is None:
            raise WorkerError("the peer is not loaded")
        if request["cmd"] == "run":
            return {"seconds": self.generate(request["steps"], request["guidance_scale"], request["seed"])}
        raise WorkerError(f"unknown command {request['cmd']!r}")


def protocol_stream() -> TextIO:
    """The original stdout, kept for replies; fd 1 then points at stderr so library prints cannot corrupt it."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return replies


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    replies = protocol_stream()
    peer = Peer()
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        try:
            reply = {"ok": True, **peer.handle(request)}
        except WorkerError as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # anything else: one line for the caller, the traceback in the log
            traceback.print_exc()
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reply = {"ok": False, "error": f"{type(e).__name__}: {first_line}"}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
