"""The diffusers pipeline a bundle reproduces: its checkpoint with LCMScheduler and its LoRAs fused, for parity
checks and the bench's diffusers contender."""

from __future__ import annotations

from typing import Any

from lcmtrt.export.lora import LoraSpec, resolve
from lcmtrt.export.models import SAFE, load_unet, load_vae, quiet_libraries, resolve_model


def reference_pipeline(sources: dict[str, Any], family: str, embedding: bool = True, inpaint: bool = False) -> Any:
    """diffusers' text-to-image pipeline for a bundle's checkpoint with LCMScheduler and the bundle's LoRAs fused:
    what the bundle reproduces. `embedding`: the UNet takes guidance through time_cond_proj_dim (else CFG).
    `inpaint`: StableDiffusion(XL)InpaintPipeline instead (AutoPipelineForInpainting's choice)."""
    from diffusers import (LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)

    quiet_libraries()
    parts = {}
    if sources.get("unet"):
        parts["unet"] = load_unet(sources["unet"], None)
    if sources.get("vae"):
        parts["vae"] = load_vae(sources["vae"])
    path = resolve_model(sources["model"])
    if family == "sdxl":
        cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
        pipe = cls.from_pretrained(path, add_watermarker=False, **SAFE, **parts)
    else:
        cls = LatentConsistencyModelPipeline if embedding else StableDiffusionPipeline
        cls = StableDiffusionInpaintPipeline if inpaint else cls
        pipe = cls.from_pretrained(path, safety_checker=None, requires_safety_checker=False, **SAFE, **parts)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    loras = [LoraSpec(**entry) for entry in sources.get("loras", [])]
    for index, spec in enumerate(loras):
        location, weight_name = resolve(spec)
        pipe.load_lora_weights(location, weight_name=weight_name, adapter_name=f"lora_{index}", use_safetensors=True)
    if loras:
        pipe.set_adapters([f"lora_{i}" for i in range(len(loras))], adapter_weights=[spec.weight for spec in loras])
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe
