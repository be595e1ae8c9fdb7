"""What a checkpoint becomes: its scheduler config and guidance mode, the torch module and example inputs of each
engine's graph, and where it came from."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from lcmtrt.bundle import SchedulerConfig, file_digest
from lcmtrt.engines.preset import Preset
from lcmtrt.errors import UserError

log = logging.getLogger("lcmtrt.engines.build")

EXAMPLE_BATCH = 2  # trace with batch 2 so no reshape is specialised to batch 1


def scheduler_config(raw: dict[str, Any], preset: Preset | None = None) -> SchedulerConfig:
    """The settings lcmtrt's plans take from a model's scheduler_config; options no sampler follows are refused, and
    a `preset` whose default sampler is euler-trailing on a model with Euler options it would not follow."""
    known = {f.name for f in fields(SchedulerConfig)}
    config = SchedulerConfig(**{k: v for k, v in raw.items() if k in known})
    for flag in ("thresholding", "clip_sample", "rescale_betas_zero_snr"):
        if raw.get(flag):
            raise UserError(f"scheduler option {flag}=true is not supported by lcmtrt's fused LCM step")
    euler_options(raw, preset)
    return config


# EulerDiscreteScheduler's options that change its sigmas or timesteps, with their defaults (diffusers 0.3x-0.4x);
# timestep_spacing is not here: the pipelines' euler-trailing sets it
EULER_DEFAULTS: dict[str, Any] = {"interpolation_type": "linear", "use_karras_sigmas": False,
                                  "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None,
                                  "sigma_max": None, "timestep_type": "discrete", "final_sigmas_type": "zero"}


def euler_options(raw: dict[str, Any], preset: Preset | None = None) -> dict[str, Any]:
    """The options of a model's scheduler_config that EulerDiscreteScheduler.from_config(config,
    timestep_spacing="trailing") would follow and lcmtrt's Euler rows do not: those set to a non-default value.
    A `preset` whose default sampler is euler-trailing is refused on such a model."""
    from lcmtrt.runtime.scheduler import unfollowed_euler

    def default(name: str, value: Any) -> bool:
        expected = EULER_DEFAULTS[name]
        return bool(value) is expected if isinstance(expected, bool) else value == expected  # bool | None: None is off
    options = {k: v for k, v in raw.items() if k in EULER_DEFAULTS and not default(k, v)}
    if preset is not None and preset.scheduler == "euler-trailing" and options:
        raise UserError(f"preset {preset.name} runs scheduler euler-trailing, but {unfollowed_euler(options)}; "
                        "choose another scheduler in the preset")
    return options


def vae_precision(checkpoint: Any, precision: str) -> str:
    """SDXL's VAE overflows in fp16 (its config says force_upcast): such a VAE runs in fp32 inside an fp16 bundle,
    as diffusers upcasts it; an fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix) keeps fp16."""
    upcast = checkpoint.family == "sdxl" and getattr(checkpoint.vae.config, "force_upcast", False)
    return "fp32" if precision == "fp16" and upcast else precision


def guidance_mode(checkpoint: Any, preset: Preset) -> str:
    """embedding: LCM-distilled UNet; cfg: a base UNet (LCM-LoRA) built for classifier-free guidance; none: one
    without, which runs at guidance <= 1 only."""
    if checkpoint.unet.config.time_cond_proj_dim is not None:
        return "embedding"
    return "cfg" if preset.cfg else "none"


def inpaint_route(checkpoint: Any, preset: Preset) -> str | None:
    """"unet9" for an inpainting UNet (latents, mask and masked image latents in: 2 x latent channels + 1), "blend"
    for any other UNet built with inpaint = true, else None."""
    latent, channels = checkpoint.vae.config.latent_channels, checkpoint.unet.config.in_channels
    route = "unet9" if channels == 2 * latent + 1 else "blend" if preset.inpaint else None
    if route is None and channels != latent:
        raise UserError(f"this UNet takes {channels} input channels; lcmtrt runs {latent} (text-to-image) or "
                        f"{2 * latent + 1} (inpainting)")
    if route is not None and (checkpoint.controlnet is not None or checkpoint.adapter is not None):
        raise UserError("inpainting with a ControlNet or a T2I-Adapter is not supported yet; build without inpaint")
    return route


def example_inputs(checkpoint: Any, preset: Preset, scheduler: SchedulerConfig,
                    modules: dict[str, tuple[Any, list[str]]]) -> dict[str, dict[str, Any]]:
    import torch

    from lcmtrt.export.graphs import is_tiny_vae
    from lcmtrt.runtime.embeddings import guidance_embedding, time_embedding
    from lcmtrt.runtime.scheduler import step_plan

    generator = torch.Generator().manual_seed(0)
    b = EXAMPLE_BATCH
    randn = lambda *shape: torch.randn(shape, generator=generator)
    channels = checkpoint.vae.config.latent_channels
    latent = (b, channels, preset.height // checkpoint.vae_scale_factor, preset.width // checkpoint.vae_scale_factor)
    length = max_length(checkpoint.tokenizer)
    encoders = [checkpoint.text_encoder] + ([checkpoint.text_encoder_2] if checkpoint.text_encoder_2 else [])
    ids = {name: torch.randint(0, e.config.vocab_size, (b, length), generator=generator, dtype=torch.int32)
           for name, e in zip(("input_ids", "input_ids_2"), encoders)}
    hidden = sum(e.config.hidden_size for e in encoders) if checkpoint.family == "sdxl" else encoders[0].config.hidden_size
    plan = step_plan(scheduler, 4)
    coeffs = torch.from_numpy(plan.coeffs[1].copy())
    size = [preset.height, preset.width]

    adapter_states = {}
    if "adapter" in modules:
        adapter_states = {f"adapter_state_{k}": randn(b, *shape) for k, shape in
                          enumerate(modules["adapter"][0].state_shapes)}

    mask = (torch.rand(b, 1, *latent[2:], generator=generator) < 0.5).float()
    images = torch.randint(0, 256, (b, preset.height, preset.width, 3), generator=generator, dtype=torch.uint8)
    sampled = {} if is_tiny_vae(checkpoint.vae) else {"sample_noise": randn(*latent)}

    def denoise_inputs(stage: Any, rows: int) -> dict[str, Any]:
        embeddings = {"time_embedding": torch.from_numpy(time_embedding(plan.timesteps[1:2],
                                                                        stage.embeddings["time_embedding"])[0])}
        if "guidance_embedding" in stage.embeddings:
            embeddings["guidance_embedding"] = torch.from_numpy(
                guidance_embedding(np.array([8.0, 1.5]), stage.embeddings["guidance_embedding"]))
        pool = {
            "latents": randn(*latent), "coeffs": coeffs, "noise": randn(*latent), **embeddings,
            "prompt_embeds": randn(rows, length, hidden), "guidance_scale": torch.tensor([8.0, 1.5]),
            "uncond_mask": torch.tensor([1.0, 0.0]),
            "text_embeds": randn(rows, checkpoint.text_encoder_2.config.projection_dim) if checkpoint.text_encoder_2 else None,
            "time_ids": torch.tensor([size + [0, 0] + size] * rows, dtype=torch.float32),
            **{name: torch.randint(0, 256, (b, preset.height, preset.width, 3), generator=generator,
                                   dtype=torch.uint8) for name in stage.control_images},
            # one scale per row, or per row and ControlNet for several (a MultiControlNet)
            "control_scale": torch.tensor([1.0, 0.5]) if len(stage.control_images) <= 1 else
            torch.linspace(0.25, 1.0, b * len(stage.control_images)).reshape(b, -1),
            "adapter_keep": torch.tensor([1.0, 0.0]),
            "mask": mask, "masked_image_latents": randn(*latent), "image_latents": randn(*latent),
            "init_noise": randn(*latent),
            **adapter_states,
        }
        return {name: pool[name] for name in stage.input_names}

    examples = {
        "text": ids,
        "adapter": {
            "adapter_image": torch.randint(0, 256, (b, preset.height, preset.width, adapter_channels(checkpoint)),
                                           generator=generator, dtype=torch.uint8),
            "adapter_scale": torch.tensor([1.0, 0.8]),
        },
        "vae_decode": {"latents": randn(*latent)},
        "vae_encode": {"images": images, "coeffs": coeffs, "noise": randn(*latent), **sampled},
    }
    if "inpaint_encode" in modules:
        pool = {"images": images, "coeffs": coeffs, "keep_image": torch.tensor([1.0, 0.0]),
                "mask_image": (torch.rand(b, 1, preset.height, preset.width, generator=generator) < 0.5).float(),
                "init_noise": randn(*latent), "image_sample_noise": randn(*latent),
                "masked_sample_noise": randn(*latent)}
        examples["inpaint_encode"] = {name: pool[name] for name in modules["inpaint_encode"][0].input_names}
    for name in ("denoise", "denoise_cfg"):
        if name in modules:
            examples[name] = denoise_inputs(modules[name][0], 2 * b if name == "denoise_cfg" else b)
    return examples


def zero_empty_negative(checkpoint: Any) -> bool:
    """SDXL pipelines' force_zeros_for_empty_prompt (default True), read from the pipeline's model_index.json."""
    if checkpoint.family != "sdxl":
        return False
    index = Path(checkpoint.path) / "model_index.json"
    if index.is_file():
        return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(checkpoint.path, "model_index.json", revision=checkpoint.revision)
    except Exception:  # noqa: BLE001 - an unreadable index means the pipeline's default
        return True
    return bool(json.loads(Path(path).read_text()).get("force_zeros_for_empty_prompt", True))


def adapter_channels(checkpoint: Any) -> int:
    """A T2I-Adapter's input channels: 3 for RGB condition maps, 1 for grayscale ones."""
    return int(checkpoint.adapter.config.in_channels) if checkpoint.adapter is not None else 0


def max_length(tokenizer: Any) -> int:
    """CLIP's 77; a tokenizer folder without a config reports a huge model_max_length."""
    return tokenizer.model_max_length if tokenizer.model_max_length < 1e6 else 77


def stage_modules(checkpoint: Any, precision: str, scheduler: SchedulerConfig, preset: Preset,
                   mode: str) -> dict[str, tuple[Any, list[str]]]:
    """The stage modules to export, in export order, with their output names. A 9-channel UNet's bundle runs
    inpainting only: no image-to-image encoder (diffusers' img2img pipelines cannot run it either)."""
    import copy

    import torch

    from lcmtrt.export.graphs import (AdapterStage, DenoiseStage, DualTextStage, TextStage, VaeDecodeStage,
                                      VaeEncodeStage)

    scaling = checkpoint.vae.config.scaling_factor
    vae = vae_precision(checkpoint, precision)
    sdxl = checkpoint.family == "sdxl"
    if sdxl:
        text = (DualTextStage(checkpoint.text_encoder, checkpoint.text_encoder_2, precision),
                ["prompt_embeds", "text_embeds"])
    else:
        text = (TextStage(checkpoint.text_encoder, precision), ["prompt_embeds"])
    steps = ["next_latents", "denoised"]
    prediction = scheduler.prediction_type
    modules = {"text": text}
    control = checkpoint.controlnet
    states = 0
    if checkpoint.adapter is not None:
        adapter = AdapterStage(checkpoint.adapter, precision)
        with torch.no_grad():  # one probe run: the number and shapes of the states feed the denoise graphs
            probe = adapter(torch.zeros(1, preset.height, preset.width, adapter_channels(checkpoint),
                                        dtype=torch.uint8), torch.ones(1))
        adapter.state_shapes = [tuple(state.shape[1:]) for state in probe]
        states = len(probe)
        modules["adapter"] = (adapter, [f"adapter_state_{k}" for k in range(states)])
    route = inpaint_route(checkpoint, preset)
    if mode == "cfg":  # one graph without guidance for guidance <= 1, one with the doubled batch for > 1
        modules["denoise"] = (DenoiseStage(copy.deepcopy(checkpoint.unet), precision, prediction, "none", sdxl,
                                           copy.deepcopy(control), states, route), steps)
        modules["denoise_cfg"] = (DenoiseStage(checkpoint.unet, precision, prediction, "cfg", sdxl, control, states,
                                               route), steps)
    else:
        modules["denoise"] = (DenoiseStage(checkpoint.unet, precision, prediction, mode, sdxl, control, states,
                                           route), steps)
    if preset.img2img and route != "unet9":  # its own copy: the fp16 conversion replaces norm modules in place
        modules["vae_encode"] = (VaeEncodeStage(copy.deepcopy(checkpoint.vae), vae, scaling), ["latents"])
    if route is not None:
        from lcmtrt.export.inpaint import InpaintEncodeStage

        encoder = InpaintEncodeStage(copy.deepcopy(checkpoint.vae), vae, scaling, route)
        modules["inpaint_encode"] = (encoder, encoder.output_names)
    modules["vae_decode"] = (VaeDecodeStage(checkpoint.vae, vae, scaling), ["images"])
    return modules


REFITTABLE = ("text", "denoise", "denoise_cfg")  # the engines LoRAs change


BATCH_AXES = {
    "denoise": {"coeffs": None, "time_embedding": None},
    "denoise_cfg": {"coeffs": None, "time_embedding": None, "prompt_embeds": "2*batch", "text_embeds": "2*batch", "time_ids": "2*batch"},
    "vae_encode": {"coeffs": None},
    "inpaint_encode": {"coeffs": None},
}


def source_info(checkpoint: Any) -> dict[str, Any]:
    """Ids, revision and hashes of the files the checkpoint came from (hub snapshot or local folder)."""
    folder = Path(checkpoint.path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(checkpoint.path, revision=checkpoint.revision, local_files_only=True))
    files = {
        str(p.relative_to(folder)): file_digest(p)["sha256"]
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        for p in sorted((folder / sub).glob("*"))
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt")
    }
    for role in ("model", "unet"):  # single .safetensors files: their own hash beside the config folder's files
        source = checkpoint.source if role == "model" else checkpoint.extra.get("unet")
        if source and Path(source).suffix.lower() == ".safetensors" and Path(source).expanduser().is_file():
            files[f"{role}:{Path(source).name}"] = file_digest(Path(source).expanduser())["sha256"]
    return {
        "model": checkpoint.source,
        **({"model_config": checkpoint.extra["model_config"]} if checkpoint.extra.get("model_config") else {}),
        "revision": checkpoint.revision or (folder.name if folder.parent.name == "snapshots" else None),
        "files": files,
    }
