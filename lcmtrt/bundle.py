"""The bundle contract: `bundle.json` and the files beside it, read and validated before anything runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcmtrt.errors import UserError

SCHEMA_VERSION = 3  # 2: `inpaint` bundles, whose denoise engines take a mask; 3: the general coefficient row
OLDEST_SCHEMA = 1  # schema 1 bundles run unchanged: they are schema 2 bundles without inpainting
# The per-step coefficient row the denoise and encode graphs take (runtime/scheduler.py fills it). Bundles built
# before samplers take LCM_COLUMNS (LCM only); newer ones COEFF_COLUMNS, whose first 8 are LCM_COLUMNS.
LCM_COLUMNS = ("timestep", "c_skip", "c_out", "sqrt_alpha", "sqrt_beta", "sqrt_alpha_prev", "sqrt_beta_prev",
               "reserved")
COEFF_COLUMNS = LCM_COLUMNS + ("input_divisor", "denoised_eps", "next_eps", "next_x", "sigma", "dt", "decode_next")
SAMPLERS = ("lcm", "tcd", "euler-trailing", "ddim-trailing")  # the diffusers schedulers a general bundle runs
INPAINT_ROUTES = ("unet9", "blend")  # a 9-channel inpainting UNet, or any 4-channel UNet blending after each step
# the denoise inputs each route adds, and the engine that encodes the image and the masked image
INPAINT_INPUTS = {"unet9": ("mask", "masked_image_latents"), "blend": ("mask", "image_latents", "init_noise")}
MANIFEST = "bundle.json"
HASHED_FILE_LIMIT = 64 << 20  # files up to this size are hashed whole on load; larger ones by sample blocks


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
class SamplerDefaults:
    """The sampler a bundle runs when a request names none (its preset's); bundles built before run LCM."""

    scheduler: str = "lcm"
    eta: float | None = None  # None: the pipelines' default, 0
    timesteps: tuple[int, ...] | None = None  # a preset's custom schedule (DMD2's), used when no --steps is given

    def to_json(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, **({"eta": self.eta} if self.eta is not None else {}),
                **({"timesteps": list(self.timesteps)} if self.timesteps else {})}


@dataclass(frozen=True)
class TextConfig:
    """How prompts become token ids: one entry per tokenizer (SDXL has two)."""

    tokenizers: tuple[str, ...]  # tokenizer.json paths relative to the bundle
    pad_ids: tuple[int, ...]
    max_length: int = 77
    zero_empty_negative: bool = False  # SDXL's force_zeros_for_empty_prompt: CFG without a negative prompt uses zeros


@dataclass(frozen=True)
class SinusoidalEmbedding:
    """An embedding the runtime computes on the host in fp32 and feeds to denoise (runtime/embeddings.py)."""

    dim: int
    frequencies: tuple[float, ...]  # float32 values, exactly as diffusers computes them
    flip_sin_to_cos: bool = False  # cos half first (the UNet's time_proj)
    scale: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"dim": self.dim, "frequencies": list(self.frequencies), "flip_sin_to_cos": self.flip_sin_to_cos,
                "scale": self.scale}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SinusoidalEmbedding:
        return cls(_positive(d["dim"], "embedding dim"), tuple(float(f) for f in d["frequencies"]),
                   bool(d.get("flip_sin_to_cos", False)), float(d.get("scale", 1.0)))


@dataclass(frozen=True)
class Bundle:
    root: Path
    family: str  # sd15 | sdxl
    precision: str  # fp32 | fp16 | bf16 | int8 (bf16 and int8: OpenVINO)
    backend: str  # onnxruntime | tensorrt | openvino
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
    # denoise inputs computed on the host (time_embedding, guidance_embedding); bundles built before have none and
    # compute them inside the graph
    embeddings: dict[str, SinusoidalEmbedding] = field(default_factory=dict)
    # inpainting: "unet9" (9-channel UNet: only inpainting rows), "blend" (4-channel UNet, mask blended after each
    # step), None (no inpainting; bundles built before have none)
    inpaint: str | None = None
    coeff_columns: tuple[str, ...] = LCM_COLUMNS  # the coefficient row its graphs take (bundles built before: LCM's)
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    # the model's scheduler_config options (non-default) that diffusers' EulerDiscreteScheduler.from_config would
    # follow and lcmtrt's Euler rows do not (Karras sigmas, ...): euler-trailing is refused on such a bundle
    euler_options: dict[str, Any] = field(default_factory=dict)

    @property
    def general(self) -> bool:
        """Built with the general coefficient row: runs every sampler, not only LCM."""
        return self.coeff_columns == COEFF_COLUMNS

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def control_nets(self) -> int:
        """ControlNets fused into the denoise engines: 0, 1 (input control_image) or N (control_image_0..N-1)."""
        return control_nets(self.engines["denoise"]) if "denoise" in self.engines else 0

    def to_json(self) -> dict[str, Any]:
        return {
            # older lcmtrt refuses what it cannot run: the general row (3), inpainting (2)
            "schema_version": 3 if self.general else 2 if self.inpaint else OLDEST_SCHEMA,
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
            "defaults": {"steps": self.default_steps, "guidance_scale": self.default_guidance_scale,
                         **(self.sampler.to_json() if self.general else {})},
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
            **({"embeddings": {k: e.to_json() for k, e in self.embeddings.items()}} if self.embeddings else {}),
            **({"inpaint": self.inpaint} if self.inpaint else {}),
            **({"coeff_columns": list(self.coeff_columns)} if self.general else {}),
            **({"euler_options": self.euler_options} if self.euler_options else {}),
        }


SAMPLE_BLOCKS, SAMPLE_BLOCK = 64, 64 << 10  # load's cheap check of a large file: 64 blocks of 64 KiB, 4 MiB read


def file_digest(path: Path) -> dict[str, Any]:
    """Size, the full sha256 (checked by `lcmtrt verify`, and on load up to HASHED_FILE_LIMIT) and, for larger files,
    a sha256 of evenly spaced sample blocks that load checks instead (truncation, overwritten regions)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = {"size": path.stat().st_size, "sha256": h.hexdigest()}
    if digest["size"] > HASHED_FILE_LIMIT:
        digest["sample_sha256"] = sample_digest(path)
    return digest


def sample_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for k in range(SAMPLE_BLOCKS):
            f.seek(k * max(0, size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


CHOICES = {"family": ("sd15", "sdxl"), "precision": ("fp32", "fp16", "bf16", "int8"),
           "backend": ("onnxruntime", "tensorrt", "openvino"), "guidance_mode": ("embedding", "cfg", "none")}


def _one_of(d: dict[str, Any], key: str) -> str:
    if d[key] not in CHOICES[key]:
        raise ValueError(f"{key} is {d[key]!r}, not one of {', '.join(CHOICES[key])}")
    return d[key]


def _positive(value: Any, key: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{key} is {value!r}, not a positive integer")
    return int(value)


def _mapping(d: dict[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise TypeError(f"{key} is a {type(value).__name__}, not an object")
    return value


def _parse(root: Path, d: dict[str, Any]) -> Bundle:
    text = d["text"]
    files = _mapping(d, "files")
    for rel, digest in files.items():
        if not isinstance(digest, dict) or not isinstance(digest.get("size"), int) or ".." in Path(rel).parts:
            raise ValueError(f"files entry {rel!r} is malformed")
    bundle = Bundle(
        root=root,
        family=_one_of(d, "family"),
        precision=_one_of(d, "precision"),
        backend=_one_of(d, "backend"),
        guidance_mode=_one_of(d, "guidance_mode"),
        height=_positive(d["height"], "height"),
        width=_positive(d["width"], "width"),
        batch_sizes=tuple(_positive(b, "batch size") for b in d["batch_sizes"]),
        latent_channels=_positive(d["latent_channels"], "latent_channels"),
        vae_scale_factor=_positive(d["vae_scale_factor"], "vae_scale_factor"),
        vae_scaling_factor=float(d["vae_scaling_factor"]),
        default_steps=int(d["defaults"]["steps"]),
        default_guidance_scale=float(d["defaults"]["guidance_scale"]),
        scheduler=SchedulerConfig(**d["scheduler"]),
        text=TextConfig(tuple(text["tokenizers"]), tuple(int(p) for p in text["pad_ids"]), int(text["max_length"]),
                        bool(text["zero_empty_negative"])),
        engines={name: EngineSpec.from_json(name, e) for name, e in d["engines"].items()},
        sources=_mapping(d, "sources"),
        build=_mapping(d, "build"),
        files=files,
        embeddings={k: SinusoidalEmbedding.from_json(e) for k, e in _mapping(d, "embeddings").items()},
        inpaint=d.get("inpaint"),
        coeff_columns=tuple(d.get("coeff_columns", LCM_COLUMNS)),
        sampler=_sampler_defaults(d["defaults"]),
        euler_options=_mapping(d, "euler_options"),
    )
    _check_coefficients(bundle)
    _check_embeddings(bundle)
    _check_inpaint(bundle)
    _check_controls(bundle)
    return bundle


def _sampler_defaults(defaults: dict[str, Any]) -> SamplerDefaults:
    scheduler = defaults.get("scheduler", "lcm")
    if scheduler not in SAMPLERS:
        raise ValueError(f"defaults.scheduler is {scheduler!r}, not one of {', '.join(SAMPLERS)}")
    eta, timesteps = defaults.get("eta"), defaults.get("timesteps")
    return SamplerDefaults(scheduler, None if eta is None else float(eta),
                           None if not timesteps else tuple(int(t) for t in timesteps))


def _check_coefficients(bundle: Bundle) -> None:
    """The coefficient row is LCM's (bundles built before) or the general one, and every graph taking it agrees."""
    if bundle.coeff_columns not in (LCM_COLUMNS, COEFF_COLUMNS):
        raise ValueError(f"coeff_columns {list(bundle.coeff_columns)} is neither LCM's nor the general row")
    if not bundle.general and bundle.sampler != SamplerDefaults():
        raise ValueError("a bundle with LCM's coefficient row names another default sampler")
    for engine in bundle.engines.values():
        spec = next((t for t in engine.inputs if t.name == "coeffs"), None)
        if spec is not None and tuple(spec.shape) != (len(bundle.coeff_columns),):
            raise ValueError(f"{engine.name}.coeffs is {list(spec.shape)}, not the {len(bundle.coeff_columns)} "
                             "coefficient columns bundle.json records")


def _check_inpaint(bundle: Bundle) -> None:
    """An inpainting bundle has its encoder and denoise engines taking its route's inputs; any other bundle none."""
    if bundle.inpaint is None:
        if "inpaint_encode" in bundle.engines:
            raise ValueError("engine inpaint_encode is listed but inpaint is not set")
        return
    if bundle.inpaint not in INPAINT_ROUTES:
        raise ValueError(f"inpaint is {bundle.inpaint!r}, not one of {', '.join(INPAINT_ROUTES)}")
    if "inpaint_encode" not in bundle.engines:
        raise ValueError(f"an inpaint {bundle.inpaint!r} bundle lists no inpaint_encode engine")
    for engine in (e for name, e in bundle.engines.items() if name.startswith("denoise")):
        missing = [n for n in INPAINT_INPUTS[bundle.inpaint] if n not in engine.input_names]
        if missing:
            raise ValueError(f"{engine.name} lacks {', '.join(missing)} for inpaint {bundle.inpaint!r}")


def control_nets(engine: EngineSpec) -> int:
    """How many ControlNets a denoise engine holds, from its input names."""
    names = engine.input_names
    return 1 if "control_image" in names else sum(1 for n in names if n.startswith("control_image_"))


def _check_controls(bundle: Bundle) -> None:
    """Each denoise engine takes a control image per ControlNet named in sources (build order) and a control_scale
    of one value per row (one ControlNet) or one per row and ControlNet (several)."""
    for engine in (e for name, e in bundle.engines.items() if name.startswith("denoise")):
        nets, inputs = control_nets(engine), {t.name: t for t in engine.inputs}
        numbered = {n for n in inputs if n.startswith("control_image_")}
        if numbered and ("control_image" in inputs or len(numbered) < 2
                         or numbered != {f"control_image_{k}" for k in range(len(numbered))}):
            raise ValueError(f"{engine.name} takes control images {sorted(numbered)}: one ControlNet takes "
                             "control_image, N >= 2 take control_image_0..N-1")
        if nets != bundle.control_nets:
            raise ValueError(f"{engine.name} holds {nets} ControlNets, denoise {bundle.control_nets}")
        per_row = (nets,) if nets > 1 else ()  # [batch] for one ControlNet, [batch, N] for N
        if nets and ("control_scale" not in inputs or inputs["control_scale"].shape[1:] != per_row):
            raise ValueError(f"{engine.name}.control_scale does not take one scale per row for each of {nets} "
                             "ControlNets")
    listed = bundle.sources.get("controlnets")
    if listed is not None and (not isinstance(listed, list) or len(listed) != bundle.control_nets):
        raise ValueError(f"sources.controlnets lists {listed!r} for {bundle.control_nets} ControlNets in denoise")


def _check_embeddings(bundle: Bundle) -> None:
    """Every host-computed embedding a denoise graph takes is described in bundle.json, at the graph's width."""
    for engine in (e for name, e in bundle.engines.items() if name.startswith("denoise")):
        inputs = {t.name: t for t in engine.inputs}
        for name in ("time_embedding", "guidance_embedding"):
            if (name in inputs) != (name in bundle.embeddings):
                raise ValueError(f"{engine.name} {'takes' if name in inputs else 'lacks'} {name} but embeddings "
                                 f"{'lack' if name in inputs else 'describe'} it")
            if name in inputs and inputs[name].shape[-1] != bundle.embeddings[name].dim:
                raise ValueError(f"{engine.name}.{name} is {inputs[name].shape[-1]} wide, its embedding "
                                 f"{bundle.embeddings[name].dim}")


def load_bundle(root: str | Path, verify_hashes: bool = True, full: bool = False) -> Bundle:
    """Read and validate a bundle; any problem is a UserError that says how to rebuild. Files up to
    HASHED_FILE_LIMIT are hashed whole, larger ones by their sample blocks; `full` hashes every byte (verify)."""
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
    if version < OLDEST_SCHEMA:
        raise UserError(f"{root} uses old bundle schema {version}; {rebuild}")
    try:
        bundle = _parse(root, raw)
        _check_files(bundle, verify_hashes, full, rebuild)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{manifest} is incomplete or malformed ({type(e).__name__}: {e}); {rebuild}") from None
    return bundle


def _check_files(bundle: Bundle, verify_hashes: bool, full: bool, rebuild: str) -> None:
    root = bundle.root
    for rel, digest in bundle.files.items():
        path = root / rel
        if not path.is_file():
            raise UserError(f"bundle file {rel} is missing from {root}; {rebuild}")
        size = path.stat().st_size
        if size != digest["size"]:
            raise UserError(f"bundle file {rel} has {size} bytes, expected {digest['size']} (corrupt); {rebuild}")
        if not verify_hashes:
            continue
        if full or size <= HASHED_FILE_LIMIT:
            if file_digest(path)["sha256"] != digest["sha256"]:
                raise UserError(f"bundle file {rel} does not match its recorded hash (corrupt); {rebuild}")
        elif "sample_sha256" in digest and sample_digest(path) != digest["sample_sha256"]:
            raise UserError(f"bundle file {rel} does not match its recorded sample hash (corrupt); {rebuild}")
    for engine in bundle.engines.values():
        for rel in (engine.onnx, engine.artifact, *engine.plans):
            if rel not in bundle.files:
                raise UserError(f"bundle.json lists {rel} for engine {engine.name} but records no digest; {rebuild}")


def verify_bundle(root: str | Path) -> tuple[Bundle, list[str]]:
    """Every file hashed whole against bundle.json: the bundle and a line per damaged or missing file."""
    bundle = load_bundle(root, verify_hashes=False)  # the manifest itself, sizes and presence
    problems = []
    for rel, digest in bundle.files.items():
        path = bundle.root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != digest["size"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, expected {digest['size']}")
        elif file_digest(path)["sha256"] != digest["sha256"]:
            problems.append(f"{rel}: content differs from its recorded sha256")
    return bundle, problems
