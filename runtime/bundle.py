"""The bundle contract: `bundle.json` and the files beside it, read and validated before anything runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcmtrt.runtime.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "bundle.json"
HASHED_FILE_LIMIT = 64 << 20  # files up to this size have their sha256 checked on load; larger ones only their size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int32, uint8
    shape: tuple[int | str, ...]  # "batch" takes the batch size; "2*batch" twice it (CFG's [negative; positive])

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else 2 * batch if d == "2*batch" else int(d) for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class EngineSpec:
    """One stage: its ONNX graph, the backend artifact built from it, and its I/O."""

    name: str
    onnx: str  # path relative to the bundle
    artifact: str  # ORT-optimized graph or TensorRT plan, relative to the bundle
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_sizes: tuple[int, ...]  # the batch sizes it runs at: one static TensorRT optimization profile each, in order
    refit_weights: tuple[str, ...] = ()  # weights a LoRA swap may replace (refittable builds), by parameter name
    # refittable TensorRT engines, which may have one optimization profile: one plan per batch size, in order
    plans: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx,
            "artifact": self.artifact,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "batch_sizes": list(self.batch_sizes),
            "refit_weights": list(self.refit_weights),
            **({"plans": list(self.plans)} if self.plans else {}),
        }

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> EngineSpec:
        return cls(
            name,
            d["onnx"],
            d["artifact"],
            tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            tuple(int(b) for b in d["batch_sizes"]),
            tuple(d["refit_weights"]),
            tuple(d.get("plans", ())),
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """The LCMScheduler settings the plan needs (diffusers' config names)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = True


@dataclass(frozen=True)
class TextConfig:
    """How prompts become token ids: one entry per tokenizer (SDXL has two)."""

    tokenizers: tuple[str, ...]  # tokenizer.json paths relative to the bundle
    pad_ids: tuple[int, ...]
    max_length: int = 77
    zero_empty_negative: bool = False  # SDXL's force_zeros_for_empty_prompt: CFG without a negative prompt uses zeros


@dataclass(frozen=True)
class Bundle:
    root: Path
    family: str  # sd15 | sdxl
    precision: str  # fp32 | fp16
    backend: str  # onnxruntime | tensorrt
    guidance_mode: str  # embedding (LCM-distilled UNet) | cfg (denoise + denoise_cfg engines) | none (guidance <= 1)
    height: int
    width: int
    batch_sizes: tuple[int, ...]
    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    default_steps: int
    default_guidance_scale: float
    scheduler: SchedulerConfig
    text: TextConfig
    engines: dict[str, EngineSpec]
    sources: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "family": self.family,
            "precision": self.precision,
            "backend": self.backend,
            "guidance_mode": self.guidance_mode,
            "height": self.height,
            "width": self.width,
            "batch_sizes": list(self.batch_sizes),
            "latent_channels": self.latent_channels,
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scaling_factor": self.vae_scaling_factor,
            "defaults": {"steps": self.default_steps, "guidance_scale": self.default_guidance_scale},
            "scheduler": vars(self.scheduler),
            "text": {
                "tokenizers": list(self.text.tokenizers),
                "pad_ids": list(self.text.pad_ids),
                "max_length": self.text.max_length,
                "zero_empty_negative": self.text.zero_empty_negative,
            },
            "engines": {name: e.to_json() for name, e in self.engines.items()},
            "sources": self.sources,
            "build": self.build,
            "files": self.files,
        }


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _parse(root: Path, d: dict[str, Any]) -> Bundle:
    text = d["text"]
    return Bundle(
        root=root,
        family=d["family"],
        precision=d["precision"],
        backend=d["backend"],
        guidance_mode=d["guidance_mode"],
        height=int(d["height"]),
        width=int(d["width"]),
        batch_sizes=tuple(int(b) for b in d["batch_sizes"]),
        latent_channels=int(d["latent_channels"]),
        vae_scale_factor=int(d["vae_scale_factor"]),
        vae_scaling_factor=float(d["vae_scaling_factor"]),
        default_steps=int(d["defaults"]["steps"]),
        default_guidance_scale=float(d["defaults"]["guidance_scale"]),
        scheduler=SchedulerConfig(**d["scheduler"]),
        text=TextConfig(tuple(text["tokenizers"]), tuple(int(p) for p in text["pad_ids"]), int(text["max_length"]),
                        bool(text["zero_empty_negative"])),
        engines={name: EngineSpec.from_json(name, e) for name, e in d["engines"].items()},
        sources=d.get("sources", {}),
        build=d.get("build", {}),
        files=d.get("files", {}),
    )


def load_bundle(root: str | Path, verify_hashes: bool = True) -> Bundle:
    """Read and validate a bundle; any problem is a UserError that says how to rebuild."""
    root = Path(root)
    manifest = root / MANIFEST
    rebuild = "rebuild it with `lcmtrt build-engines`"
    if not root.is_dir():
        raise UserError(f"engine bundle {root} does not exist; build one with `lcmtrt build-engines`")
    if not manifest.is_file():
        raise UserError(f"{root} is not an engine bundle (no {MANIFEST}); {rebuild}")
    try:
        raw = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{manifest} is corrupt ({e}); {rebuild}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("schema_version"), int):
        raise UserError(f"{manifest} has no schema version; {rebuild}")
    version = raw["schema_version"]
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{root} uses bundle schema {version}, newer than this lcmtrt understands ({SCHEMA_VERSION}); "
            "upgrade lcmtrt or rebuild the bundle with this version"
        )
    if version < SCHEMA_VERSION:
        raise UserError(f"{root} uses old bundle schema {version}; {rebuild}")
    try:
        bundle = _parse(root, raw)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{manifest} is incomplete or malformed ({type(e).__name__}: {e}); {rebuild}") from None
    for rel, digest in bundle.files.items():
        path = root / rel
        if not path.is_file():
            raise UserError(f"bundle file {rel} is missing from {root}; {rebuild}")
        size = path.stat().st_size
        if size != digest["size"]:
            raise UserError(f"bundle file {rel} has {size} bytes, expected {digest['size']} (corrupt); {rebuild}")
        if verify_hashes and size <= HASHED_FILE_LIMIT and file_digest(path)["sha256"] != digest["sha256"]:
            raise UserError(f"bundle file {rel} does not match its recorded hash (corrupt); {rebuild}")
    for engine in bundle.engines.values():
        for rel in (engine.onnx, engine.artifact, *engine.plans):
            if rel not in bundle.files:
                raise UserError(f"bundle.json lists {rel} for engine {engine.name} but records no digest; {rebuild}")
    return bundle
