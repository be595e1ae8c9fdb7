"""LoRAs fused into a checkpoint before export, exactly as diffusers' load_lora_weights + set_adapters + fuse_lora
do: W' = W + sum_i scale * w_i * (alpha_i / r_i) * B_i A_i over the UNet and the text encoders. diffusers reads the
formats (diffusers/PEFT keys, Kohya keys with .alpha) itself, so every format it loads fuses identically here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmtrt.errors import UserError
from lcmtrt.export.models import resolve_model
from lcmtrt.export.tiny import TINY_LORAS

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class LoraSpec:
    source: str  # hub repo id (or OWNER/REPO/FILE.safetensors), local .safetensors file or folder, or a tiny LoRA
    weight: float = 1.0
    weight_name: str | None = None  # the file inside a repo or folder (diffusers' weight_name)

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`ID_OR_FILE[:WEIGHT]`, as given to --lora."""
        source, _, weight = text.rpartition(":")
        try:
            return cls(source, float(weight)) if source else cls(text)
        except ValueError:
            return cls(text)  # a colon that is part of the path

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "weight": self.weight, "weight_name": self.weight_name}


def resolve(spec: LoraSpec) -> tuple[str, str | None]:
    """(what load_lora_weights takes, weight_name); refuses pickle files, which can run code when loaded."""
    if spec.source in TINY_LORAS:
        folder = Path(resolve_model(spec.source))
        return str(folder), TINY_LORAS[spec.source]
    path = Path(spec.source).expanduser()
    name = spec.weight_name or (path.name if path.suffix else None)
    if name and Path(name).suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"LoRA {spec.source}{'/' + spec.weight_name if spec.weight_name else ''} is a pickle file; "
                        "lcmtrt loads LoRAs from .safetensors only (pickle files can run code when loaded)")
    local = spec.source.startswith((".", "/", "~")) or path.exists()
    if path.suffix and not local and spec.source.count("/") >= 2:  # OWNER/REPO/FILE.safetensors on the hub
        owner, repo, file = spec.source.split("/", 2)
        if Path(file).suffix.lower() != ".safetensors":
            raise UserError(f"LoRA {spec.source} is not a .safetensors file")
        return f"{owner}/{repo}", file
    if path.suffix:
        if not path.is_file():
            raise UserError(f"LoRA file {path} does not exist")
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"LoRA file {path} is not a .safetensors file")
        _check_safetensors(path)
        return str(path.parent), path.name
    if spec.source.startswith((".", "/", "~")) and not path.is_dir():
        raise UserError(f"LoRA folder {path} does not exist")
    return (str(path) if path.is_dir() else spec.source), spec.weight_name


def _check_safetensors(path: Path) -> None:
    """Read the file's header: a damaged or mislabelled file is refused before any model is loaded."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise UserError(f"LoRA file {path} holds no tensors")
    except (SafetensorError, OSError) as e:
        raise UserError(f"LoRA file {path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def fuse_loras(checkpoint: Any, loras: tuple[LoraSpec, ...]) -> list[dict[str, Any]]:
    """Fuse `loras` into the checkpoint's UNet and text encoders in place; returns what the bundle records."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import SafetensorError

    locations = [resolve(spec) for spec in loras]  # every file checked before the pipeline is assembled
    if checkpoint.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=checkpoint.vae, text_encoder=checkpoint.text_encoder, text_encoder_2=checkpoint.text_encoder_2,
            tokenizer=checkpoint.tokenizer, tokenizer_2=checkpoint.tokenizer_2, unet=checkpoint.unet,
            scheduler=LCMScheduler(steps_offset=1), add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(
            vae=checkpoint.vae, text_encoder=checkpoint.text_encoder, tokenizer=checkpoint.tokenizer,
            unet=checkpoint.unet, scheduler=LCMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    names, recorded = [], []
    for index, (spec, (location, weight_name)) in enumerate(zip(loras, locations)):
        adapter = f"lora_{index}"
        try:
            pipe.load_lora_weights(location, weight_name=weight_name, adapter_name=adapter, use_safetensors=True)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load LoRA {spec.source}: {first}") from None
        names.append(adapter)
        recorded.append({**spec.to_json(), "weight_name": weight_name})
        log.info("      LoRA %s (weight %g)", spec.source, spec.weight)
    pipe.set_adapters(names, adapter_weights=[spec.weight for spec in loras])
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, removes the adapter layers
    return recorded
