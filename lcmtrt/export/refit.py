"""LoRA swaps without a rebuild: the bundle's checkpoint fused again with another LoRA set, as refit weights for a
pipeline whose engines were built with --refittable."""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import numpy as np

from lcmtrt.errors import UserError
from lcmtrt.export.lora import LoraSpec, fuse_loras
from lcmtrt.export.models import load_checkpoint


def apply_loras(pipeline: Any, loras: Sequence[LoraSpec]) -> None:
    """Replace a Pipeline's LoRA set with `loras` without rebuilding; an empty list gives the base model. The
    pipeline's checks run before the (slow) fuse; see Pipeline.refit for what a failed swap leaves."""
    pipeline.require_refittable()
    if not all(importlib.util.find_spec(name) for name in ("torch", "diffusers")):
        raise UserError("swapping LoRAs needs the export extra: pip install 'lcmtrt[export]'")
    pipeline.refit(fused_weights(pipeline.bundle, tuple(loras)))


def fused_weights(bundle: Any, loras: tuple[LoraSpec, ...]) -> dict[str, dict[str, Any]]:
    """{engine: {weight name: numpy array}} for a refittable bundle with `loras` fused instead of its own: the
    bundle's source checkpoint is loaded again and fused by the same diffusers code as the build, so swapping
    A -> B -> A gives exactly A's weights (nothing is applied on top of earlier swaps)."""
    sources = bundle.sources
    checkpoint = load_checkpoint(sources["model"], sources.get("revision"), unet=sources.get("unet"),
                                 vae=sources.get("vae"))
    if loras:
        fuse_loras(checkpoint, loras)
    roots = {"unet": checkpoint.unet, "text_encoder": checkpoint.text_encoder,
             "text_encoder_2": checkpoint.text_encoder_2}
    dtype = np.float16 if bundle.precision == "fp16" else np.float32
    weights: dict[str, dict[str, Any]] = {}
    for engine in bundle.engines.values():
        if not engine.refit_weights:
            continue
        weights[engine.name] = {}
        for name in engine.refit_weights:
            root, _, parameter = name.partition(".")
            tensor = roots[root].get_parameter(parameter)
            weights[engine.name][name] = np.ascontiguousarray(tensor.detach().numpy().astype(dtype))
    return weights
