"""bench's CPU peers, run on the same checkpoint, size, batch and steps in a worker process so lcmtrt never imports
torch, optimum or openvino_genai:

  optimum-intel    optimum-intel's OVLatentConsistencyModelPipeline
  openvino-genai   openvino_genai.Text2ImagePipeline on the same optimum-intel export (LCMScheduler)

optimum-intel pins older diffusers, transformers and huggingface-hub than lcmtrt's exporter, so both live in one venv
of their own (scripts/optimum-intel-env.sh); the worker (optimum_intel_worker.py) runs with that venv's Python and
answers JSON lines. bench times a peer's request in lcmtrt's process, as it times lcmtrt's own: around the whole
round trip to the worker, so each figure also holds the pipe's two JSON lines (a request, a reply; not measured
apart); the worker measures only the cold start (load_s, export_s, import_s) and run_once's seconds,
which bench does not use.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lcmtrt.errors import UserError

log = logging.getLogger(__name__)

ENV_SCRIPT = "scripts/optimum-intel-env.sh"
DEFAULT_VENV = ".venv-optimum"
PRECISIONS = ("fp32", "default")  # fp32: INFERENCE_PRECISION_HINT f32; default: OpenVINO's own (bf16 on bf16 CPUs)
WORKER = Path(__file__).with_name("optimum_intel_worker.py")
KINDS = {"optimum-intel": "optimum-intel OVLatentConsistencyModelPipeline",
         "openvino-genai": "openvino-genai Text2ImagePipeline"}


def default_peer_python() -> Path:
    """$LCMTRT_OPTIMUM_PYTHON, else the Python of .venv-optimum (the env script's default) in the source checkout
    lcmtrt runs from, else in the current folder (an installed lcmtrt has no checkout)."""
    if os.environ.get("LCMTRT_OPTIMUM_PYTHON"):
        return Path(os.environ["LCMTRT_OPTIMUM_PYTHON"])
    candidates = [root / DEFAULT_VENV / "bin" / "python" for root in (Path(__file__).resolve().parents[3], Path.cwd())]
    return next((c for c in candidates if c.is_file()), candidates[0])


def optimum_cache_dir() -> Path:
    """Where exported OpenVINO IR and the worker's log go: $LCMTRT_CACHE/optimum, else ~/.cache/lcmtrt/optimum."""
    return Path(os.environ.get("LCMTRT_CACHE", Path.home() / ".cache" / "lcmtrt")) / "optimum"


def peer_checkpoint(bundle: Any, kind: str = "optimum-intel") -> Path:
    """The local diffusers folder of a bundle's checkpoint, or a UserError for a bundle the peer cannot reproduce."""
    from lcmtrt.export.models import resolve_model

    if bundle.family != "sd15" or bundle.guidance_mode != "embedding":
        raise UserError(f"--compare {kind} covers SD1.5-family LCM checkpoints (guidance embedding) only; "
                        f"this bundle is {bundle.family} with {bundle.guidance_mode} guidance")
    extras = sorted(k for k, v in bundle.sources.items() if v and k not in ("preset", "model", "revision", "files"))
    if extras:
        raise UserError(f"--compare {kind} runs the plain checkpoint; this bundle adds {', '.join(extras)}")
    path = Path(resolve_model(bundle.sources["model"]))
    if not path.is_dir():  # a hub id: its snapshot in the local hub cache, as the build used it
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(path), revision=bundle.sources.get("revision"), local_files_only=True))
        except Exception as e:
            raise UserError(f"--compare {kind} needs {bundle.sources['model']} on disk ({type(e).__name__}); "
                            "download it first, or build the bundle with --model DIR") from e
    return path


class OpenVinoPeer:
    """One loaded peer pipeline of a `kind` (KINDS) at a (batch, height, width), in a worker in the peer venv; static
    shapes where the peer can (`shapes` says which).

    load_s: cold start measured in the worker: export to IR (0 when cached) + load + reshape + compile + first image.
    export_s, import_s (the peer's imports) and versions come with it. compile_cache: use OpenVINO's compiled-model
    cache as lcmtrt's OpenVINO backend does (optimum-intel on a CPU does not by default, so each load compiles); steps
    and guidance_scale are the first image's.
    """

    def __init__(self, checkpoint_dir: Path, height: int, width: int, batch: int, precision: str = "fp32",
                 python: Path | None = None, steps: int = 4, guidance_scale: float = 8.5,
                 cache_dir: Path | None = None, compile_cache: bool = False, kind: str = "optimum-intel") -> None:
        python = Path(python) if python else default_peer_python()
        checkpoint_dir = Path(checkpoint_dir)
        if kind not in KINDS:
            raise UserError(f"peer {kind!r} is not one of {', '.join(KINDS)}")
        self.kind = kind
        if precision not in PRECISIONS:
            raise UserError(f"{kind} peer precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if not (checkpoint_dir / "model_index.json").is_file():
            raise UserError(f"{checkpoint_dir} is not a diffusers checkpoint folder (no model_index.json)")
        if not python.is_file():
            raise UserError(f"the {kind} peer needs its own venv and {python} does not exist; "
                            f"create it with `{ENV_SCRIPT}` (or point LCMTRT_OPTIMUM_PYTHON at its python)")
        self.precision, self.batch, self.height, self.width = precision, batch, height, width
        self.compile_cache = compile_cache
        cache = Path(cache_dir) if cache_dir else optimum_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        self.cache = cache
        self.log_path = cache / f"worker-{kind}-{precision}-b{batch}-{width}x{height}.log"  # one per configuration
        log.info("starting the %s peer with %s (log: %s)", kind, python, self.log_path)
        with open(self.log_path, "w") as log_file:  # the child keeps its own descriptor
            self._process: subprocess.Popen | None = subprocess.Popen(
                [str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                text=True, bufsize=1, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        try:
            reply = self._ask({"cmd": "load", "kind": kind, "checkpoint": str(checkpoint_dir.resolve()),
                               "cache": str(cache), "height": height, "width": width, "batch": batch,
                               "precision": precision,
                               "steps": steps, "guidance_scale": guidance_scale, "compile_cache": compile_cache})
        except BaseException:
            self.close()
            raise
        self.load_s: float = reply["load_s"]
        self.export_s: float = reply["export_s"]
        self.import_s: float = reply["import_s"]
        self.versions: dict[str, str] = reply["versions"]
        self.threads: int = reply["threads"]
        self.shapes: str = reply["shapes"]
        log.info("%s peer loaded in %.2f s (export %.2f s, imports %.2f s)", kind, self.load_s, self.export_s,
                 self.import_s)

    def run_once(self, steps: int, guidance_scale: float, seed: int) -> float:
        """Seconds for one pipeline call (batch images, output_type="np"), timed in the worker."""
        reply = self._ask({"cmd": "run", "steps": steps, "guidance_scale": guidance_scale, "seed": seed})
        return float(reply["seconds"])

    def images(self, prompts: list[str], steps: int, guidance_scale: float, seed: int) -> np.ndarray:
        """Each prompt's batch of images (uint8 NHWC, prompt after prompt), drawn with torch.manual_seed(seed)."""
        fd, name = tempfile.mkstemp(suffix=".npy", dir=self.cache)
        os.close(fd)
        try:
            self._ask({"cmd": "images", "prompts": prompts, "steps": steps, "guidance_scale": guidance_scale,
                       "seed": seed, "out": name})
            return np.load(name)
        finally:
            os.unlink(name)

    def environment(self) -> dict[str, Any]:
        """What bench's JSON records about the peer."""
        return {"peer": KINDS[self.kind], "precision": self.precision, "size": f"{self.width}x{self.height}",
                "batch": self.batch, "threads": self.threads, "shapes": self.shapes,
                "export_s": self.export_s, "import_s": self.import_s, "compile_cache": self.compile_cache,
                **self.versions}

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        process = self._process
        if process is None:
            raise UserError(f"the {self.kind} peer was closed")
        try:
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:  # the worker died: its log says why
            code = process.wait()
            raise UserError(f"the {self.kind} peer exited (code {code}) {self._log_tail()}; "
                            f"see {self.log_path}; recreate its venv with `{ENV_SCRIPT}` if it is broken")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise UserError(f"{self.kind} peer: {reply['error']} (log: {self.log_path})")
        return reply

    def _log_tail(self) -> str:
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return f"after: {lines[-1][:300]}" if lines else "without a word"

    def close(self) -> None:
        """Stop the worker (politely, then for sure)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            process.stdin.close()
            process.wait(timeout=30)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        process.stdout.close()

    def __enter__(self) -> OpenVinoPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
