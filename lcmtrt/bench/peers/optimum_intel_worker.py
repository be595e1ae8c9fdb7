"""The worker of bench's OpenVINO peers: run with the peer venv's Python (scripts/optimum-intel-env.sh), never imported
by lcmtrt. One worker holds one peer of one kind on the checkpoint's optimum-intel export:

  optimum-intel    optimum-intel's OVLatentConsistencyModelPipeline
  openvino-genai   openvino_genai.Text2ImagePipeline (C++ pipeline, LCMScheduler read from the export's
                   scheduler_config.json; its tokenizer is the export's openvino_tokenizer.xml)

Both draw their noise with torch.manual_seed(seed) as diffusers does (genai through openvino_genai.TorchGenerator: its
own rng_seed draws other numbers), so the same seed gives the same image up to arithmetic. It speaks JSON lines: one
request per line on stdin, one reply per line on the original stdout.

  {"cmd": "load", "kind": "optimum-intel"|"openvino-genai", "checkpoint": DIR, "cache": DIR, "height": H, "width": W,
   "batch": B, "precision": "fp32"|"default", "steps": N, "guidance_scale": G, "compile_cache": false}
      ->  {"ok": true, "load_s": .., "export_s": .., "import_s": .., "versions": {..}, ...}
  {"cmd": "run", "steps": N, "guidance_scale": G, "seed": S}  ->  {"ok": true, "seconds": ..}
  {"cmd": "images", "prompts": [..], "steps": N, "guidance_scale": G, "seed": S, "out": FILE.npy}
      ->  {"ok": true, "shape": [..]}: every prompt's batch of images, uint8 NHWC, saved with numpy
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
from abc import ABC, abstractmethod
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


class Peer(ABC):
    """What both kinds share: the export, the precision, the static shapes, the first image and the timing."""

    module = ""  # what the kind imports; a venv without it is told to rerun the env script
    versions_of: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.pipe: Any = None
        self.batch = 0
        self.height = self.width = 0

    def load(self, request: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            if importlib.util.find_spec(self.module.split(".")[0]) is None:  # before seconds of importing torch
                raise ImportError(f"no module named {self.module}")
            self.import_modules()
        except Exception as e:  # a venv without the peer, or a broken one
            raise WorkerError(f"{sys.executable} cannot import {self.module} ({type(e).__name__}: {e}); "
                              f"create the peer venv with `{ENV_SCRIPT}`") from e
        import_s = time.perf_counter() - start
        checkpoint = Path(request["checkpoint"])
        if request["precision"] not in PRECISION_CONFIGS:
            raise WorkerError(f"precision {request['precision']!r} is not one of {sorted(PRECISION_CONFIGS)}")
        start = time.perf_counter()
        model_dir, export_s = exported_model(checkpoint, Path(request["cache"]))
        self.batch, self.height, self.width = request["batch"], request["height"], request["width"]
        config = dict(PRECISION_CONFIGS[request["precision"]])
        if request.get("compile_cache"):  # optimum-intel sets OpenVINO's compiled-model cache only for GPUs by default
            config["CACHE_DIR"] = str(model_dir / "model_cache")
        described = self.open(model_dir, config, request["guidance_scale"])
        self.run(request["steps"], request["guidance_scale"], 0)
        load_s = time.perf_counter() - start
        from importlib.metadata import version

        return {"load_s": load_s, "export_s": export_s, "import_s": import_s, "model_dir": str(model_dir),
                "versions": {name: version(name) for name in self.versions_of}, **described}

    def run(self, steps: int, guidance_scale: float, seed: int) -> float:
        """Seconds for one pipeline call of `batch` images of bench's prompt."""
        start = time.perf_counter()
        images = self.generate(PROMPT, steps, guidance_scale, seed)
        seconds = time.perf_counter() - start
        if images.shape[0] != self.batch:  # numpy (optimum-intel) or an OpenVINO tensor (genai), NHWC
            raise WorkerError(f"{self.module} returned {images.shape[0]} images for a batch of {self.batch}")
        return seconds

    def images(self, request: dict[str, Any]) -> dict[str, Any]:
        """Each prompt's batch of images as uint8 NHWC, saved to request["out"] (numpy's .npy)."""
        import numpy as np

        images = np.concatenate([self.to_uint8(self.generate(prompt, request["steps"], request["guidance_scale"],
                                                             request["seed"])) for prompt in request["prompts"]])
        np.save(request["out"], images)
        return {"shape": list(images.shape)}

    @abstractmethod
    def import_modules(self) -> None:
        """Imports what the kind needs (ImportError when the venv lacks it)."""

    @abstractmethod
    def open(self, model_dir: Path, config: dict[str, str], guidance_scale: float) -> dict[str, Any]:
        """Loads and compiles the pipeline at static shapes; returns what the environment records (threads, ...)."""

    @abstractmethod
    def generate(self, prompt: str, steps: int, guidance_scale: float, seed: int) -> Any:
        """One pipeline call: `batch` images of one prompt, in the pipeline's own output type."""

    @abstractmethod
    def to_uint8(self, images: Any) -> Any:
        """generate()'s images as a uint8 NHWC numpy array."""

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["cmd"] == "load":
            return self.load(request)
        if self.pipe is None:
            raise WorkerError("the peer is not loaded")
        if request["cmd"] == "run":
            return {"seconds": self.run(request["steps"], request["guidance_scale"], request["seed"])}
        if request["cmd"] == "images":
            return self.images(request)
        raise WorkerError(f"unknown command {request['cmd']!r}")


class OptimumIntel(Peer):
    module = "optimum.intel"
    versions_of = ("optimum-intel", "optimum", "openvino", "diffusers", "transformers", "huggingface-hub", "torch")

    def import_modules(self) -> None:
        import torch  # noqa: F401
        from optimum.intel import OVLatentConsistencyModelPipeline  # noqa: F401

    def open(self, model_dir: Path, config: dict[str, str], guidance_scale: float) -> dict[str, Any]:
        import torch
        from optimum.intel import OVLatentConsistencyModelPipeline

        self.pipe = OVLatentConsistencyModelPipeline.from_pretrained(str(model_dir), ov_config=config, compile=False)
        # a batch is one prompt's num_images_per_prompt: optimum-intel's static reshape gives the VAE decoder that
        # batch, not batch_size (batch_size=2 with num_images_per_prompt=1 fails in the decoder)
        self.pipe.reshape(batch_size=1, height=self.height, width=self.width, num_images_per_prompt=self.batch)
        self.pipe.compile()
        self.pipe.set_progress_bar_config(disable=True)
        return {"threads": torch.get_num_threads(), "shapes": "static"}

    def generate(self, prompt: str, steps: int, guidance_scale: float, seed: int) -> Any:
        import torch

        generator = torch.Generator("cpu").manual_seed(seed)
        return self.pipe(prompt, num_images_per_prompt=self.batch, num_inference_steps=steps,
                         guidance_scale=guidance_scale, height=self.height, width=self.width, generator=generator,
                         output_type="np").images

    def to_uint8(self, images: Any) -> Any:
        import numpy as np

        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil


class OpenVinoGenai(Peer):
    module = "openvino_genai"
    versions_of = ("openvino-genai", "openvino", "openvino-tokenizers", "optimum-intel", "torch")

    def import_modules(self) -> None:
        import openvino_genai  # noqa: F401
        import torch  # noqa: F401  (TorchGenerator draws through it)

    def open(self, model_dir: Path, config: dict[str, str], guidance_scale: float) -> dict[str, Any]:
        import openvino_genai

        for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml"):
            if not (model_dir / "tokenizer" / name).is_file():  # optimum-cli writes them when openvino-tokenizers is in
                raise WorkerError(f"the export {model_dir} has no tokenizer/{name}: install openvino-tokenizers in "
                                  f"the peer venv (`{ENV_SCRIPT}`) and delete the export to redo it")
        self.pipe = openvino_genai.Text2ImagePipeline(str(model_dir))
        # openvino-genai 2026.4's static reshape keeps the LCM guidance embedding (timestep_cond) at batch 1, so
        # the UNet rejects it at more than one image per prompt: larger batches keep dynamic shapes
        shapes = "static" if self.batch == 1 else "dynamic (genai's static LCM reshape fails at batch > 1)"
        if self.batch == 1:
            self.pipe.reshape(self.batch, self.height, self.width, guidance_scale)
        self.pipe.compile("CPU", **config)
        return {"threads": len(os.sched_getaffinity(0)), "shapes": shapes}  # OpenVINO's CPU plugin uses every core

    def generate(self, prompt: str, steps: int, guidance_scale: float, seed: int) -> Any:
        import openvino_genai

        return self.pipe.generate(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                                  num_images_per_prompt=self.batch, height=self.height, width=self.width,
                                  generator=openvino_genai.TorchGenerator(seed))

    def to_uint8(self, images: Any) -> Any:
        import numpy as np

        return np.array(images.data, copy=True)  # the tensor's memory is the pipeline's, reused by the next call


KINDS: dict[str, type[Peer]] = {"optimum-intel": OptimumIntel, "openvino-genai": OpenVinoGenai}


def protocol_stream() -> TextIO:
    """The original stdout, kept for replies; fd 1 then points at stderr so library prints cannot corrupt it."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return replies


def answer(peer: Peer | None, request: dict[str, Any]) -> tuple[Peer | None, dict[str, Any]]:
    """The reply to one request, and the worker's peer after it (a load makes the peer of the kind asked for)."""
    try:
        if request["cmd"] == "load":
            if request.get("kind", "optimum-intel") not in KINDS:
                raise WorkerError(f"peer kind {request.get('kind')!r} is not one of {sorted(KINDS)}")
            peer = KINDS[request.get("kind", "optimum-intel")]()
        if peer is None:
            raise WorkerError("the peer is not loaded")
        return peer, {"ok": True, **peer.handle(request)}
    except WorkerError as e:
        return peer, {"ok": False, "error": str(e)}
    except Exception as e:  # anything else: one line for the caller, the traceback in the log
        traceback.print_exc()
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return peer, {"ok": False, "error": f"{type(e).__name__}: {first_line}"}


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    replies = protocol_stream()
    peer: Peer | None = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        peer, reply = answer(peer, request)
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
