"""Presets: TOML files in configs/ (or any file passed with --config) describing what to build."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lcmtrt.export.lora import LoraSpec
from lcmtrt.bundle import SAMPLERS
from lcmtrt.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # hub id, local diffusers folder, a tiny model name, or one .safetensors file (original SD layout)
    height: int
    width: int
    batch_sizes: tuple[int, ...] = (1,)
    steps: int = 4
    guidance_scale: float = 8.0
    revision: str | None = None
    unet: str | None = None  # replaces the model's UNet (e.g. an LCM-distilled UNet on its base pipeline); a folder,
    # hub id, or a UNet .safetensors file (local or OWNER/REPO/FILE), its architecture the model's unet/ config
    model_config: str | None = None  # a single-file model's architecture: a diffusers folder or hub id
    vae: str | None = None  # replaces the model's VAE: "taesd"/"taesdxl" (TAESD), a hub id or a folder
    img2img: bool = True  # also build the vae_encode engine
    inpaint: bool = False  # also build inpainting (a 9-channel UNet is an inpainting bundle by itself)
    cfg: bool = False  # a UNet without guidance embedding (LCM-LoRA): also build classifier-free guidance
    # ControlNet(s) fused into the denoise engines (hub id, folder or tiny name); several: a MultiControlNet, in order
    controlnet: str | tuple[str, ...] | None = None
    adapter: str | None = None  # a T2I-Adapter: its own engine, run once per request
    loras: tuple[LoraSpec, ...] = ()  # fused at export, in order, like diffusers' set_adapters + fuse_lora
    scheduler: str = "lcm"  # the sampler requests run unless they name one (bundle.SAMPLERS)
    eta: float | None = None  # its default eta (tcd, ddim-trailing); None: the pipelines' 0
    timesteps: tuple[int, ...] | None = None  # a custom default schedule (DMD2's), used when no --steps is given
    description: str = ""

    def validate(self, multiple: int = 8) -> Preset:
        for label, value in (("height", self.height), ("width", self.width)):
            if value <= 0 or value % multiple:
                raise UserError(f"{label} {value} is not a positive multiple of {multiple}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes) or len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise UserError(f"batch sizes {list(self.batch_sizes)} must be distinct positive integers")
        if self.steps < 1:
            raise UserError(f"steps {self.steps} must be at least 1")
        for flag in ("img2img", "inpaint", "cfg"):  # a string such as "no" would be truthy: refused, not guessed
            if not isinstance(getattr(self, flag), bool):
                raise UserError(f"{flag} {getattr(self, flag)!r} must be true or false")
        if self.scheduler not in SAMPLERS:
            raise UserError(f"scheduler {self.scheduler!r} is not one of {', '.join(SAMPLERS)}")
        if self.timesteps is not None and len(self.timesteps) != self.steps:
            raise UserError(f"timesteps {list(self.timesteps)} are {len(self.timesteps)}, steps {self.steps}: "
                            "make steps the number of timesteps")
        if isinstance(self.controlnet, tuple) and (not self.controlnet or not all(
                isinstance(c, str) and c for c in self.controlnet)):
            raise UserError(f"controlnet {list(self.controlnet)} must name one or more ControlNets")
        return self

    @property
    def controlnets(self) -> tuple[str, ...]:
        """The ControlNets to fuse, in order (one entry per control image the bundle will take)."""
        if self.controlnet is None:
            return ()
        return (self.controlnet,) if isinstance(self.controlnet, str) else tuple(self.controlnet)

    def with_overrides(self, **overrides: Any) -> Preset:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("lcmtrt.configs").iterdir() if p.name.endswith(".toml"))


def _from_toml(name: str, text: str, origin: str) -> Preset:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{origin} is not valid TOML: {e}") from None
    known = {f.name for f in fields(Preset)} - {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{origin}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for required in ("model", "height", "width"):
        if required not in data:
            raise UserError(f"{origin}: missing required setting {required!r}")
    for listed in ("batch_sizes", "timesteps"):
        if listed in data:
            data[listed] = tuple(data[listed])
    if isinstance(data.get("controlnet"), list):  # a MultiControlNet: the ControlNets in build order
        data["controlnet"] = tuple(data["controlnet"])
    if "loras" in data:
        try:
            data["loras"] = tuple(LoraSpec(**entry) for entry in data["loras"])
        except TypeError as e:
            raise UserError(f"{origin}: each [[loras]] takes source, weight and weight_name ({e})") from None
    try:
        return Preset(name=name, **data).validate()
    except TypeError as e:
        raise UserError(f"{origin}: {e}") from None


def load_preset(name: str | None = None, config: str | Path | None = None) -> Preset:
    """A built-in preset by name, or a TOML file by path."""
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        return _from_toml(path.stem, path.read_text(), str(path))
    if name not in preset_names():
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    text = resources.files("lcmtrt.configs").joinpath(f"{name}.toml").read_text()
    return _from_toml(name, text, f"preset {name}")
