"""Load a diffusers checkpoint (hub id, local folder, or a built-in tiny model) into the parts the exporter needs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcmtrt.export.single_file import is_single_file, load_pipeline_file, load_unet_file
from lcmtrt.export.tiny import TINY_LORAS, TINY_MODELS, tiny_checkpoint
from lcmtrt.errors import UserError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where tiny checkpoints are written: $LCMTRT_CACHE, else ~/.cache/lcmtrt."""
    return Path(os.environ.get("LCMTRT_CACHE", Path.home() / ".cache" / "lcmtrt"))


@dataclass
class Checkpoint:
    source: str  # what the user named: hub id, folder or tiny model name
    path: str  # what diffusers loads from
    revision: str | None
    family: str  # sd15 | sdxl
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    text_encoder_2: Any = None  # SDXL-class: CLIPTextModelWithProjection (pooled, projected text embeddings)
    controlnet: Any = None  # fused into the denoise graphs: a ControlNetModel, or a ModuleList of several in order
    adapter: Any = None  # T2I-Adapter: its own engine, states fed to the denoise graphs
    tokenizer_2: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def family_of(unet_config: Any) -> str:
    """SDXL-class UNets (SDXL, SSD-1B) condition on pooled text and time ids; SD1.5-class ones do not."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def quiet_libraries() -> None:
    """Keep the build log to our own stage lines: no per-file progress bars or library chatter."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def resolve_model(model: str, label: str = "model") -> str:
    """A tiny model name becomes its offline folder; hub ids, local folders and single files pass through; a local
    path that is not a folder is refused naming `label` (the setting that gave it)."""
    if model in TINY_MODELS or model in TINY_LORAS:
        return str(tiny_checkpoint(model, cache_dir() / "tiny"))
    if is_single_file(model):  # checked (safetensors, present) where it is loaded
        return model
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise UserError(f"{label} folder {model} does not exist")
    return str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model


# Weights only from safetensors (pickle files can run code when loaded); never remote code or hub pipelines.
SAFE = {"use_safetensors": True}
VAE_ALIASES = {"taesd": "madebyollin/taesd", "taesdxl": "madebyollin/taesdxl"}


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_unet(source: str, revision: str | None, config: str | None = None) -> Any:
    """A UNet from a pipeline repo's unet/ folder, from a bare UNet repo (like latent-consistency/lcm-sdxl), or from
    one .safetensors file whose architecture is `config`'s unet/ config."""
    from diffusers import UNet2DConditionModel

    if is_single_file(source):  # a UNet-only file: its architecture from the base model's unet/ config
        return load_unet_file(source, resolve_model(config) if config else None)
    path = resolve_model(source)
    kwargs = {"revision": revision, **SAFE} if revision else dict(SAFE)
    try:
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
    except (OSError, ValueError) as in_unet_folder:
        try:
            return UNet2DConditionModel.from_pretrained(path, **kwargs)
        except (OSError, ValueError):
            if "safetensors" in str(in_unet_folder):  # a unet/ folder with pickle weights only says so best
                raise in_unet_folder from None
            raise


def load_vae(source: str) -> Any:
    """A bare VAE repo or folder: AutoencoderKL, or AutoencoderTiny (TAESD) as its config names it."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    path = resolve_model(VAE_ALIASES.get(source, source))
    config = AutoencoderKL.load_config(path)
    cls = AutoencoderTiny if config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL
    return cls.from_pretrained(path, **SAFE)


def load_checkpoint(model: str, revision: str | None = None, unet: str | None = None,
                    vae: str | None = None, controlnet: str | tuple[str, ...] | None = None,
                    adapter: str | None = None, model_config: str | None = None) -> Checkpoint:
    """Load UNet, VAE, text encoder, tokenizer and LCM scheduler config from a diffusers pipeline layout, or from a
    single .safetensors file in the original layout whose architecture `model_config` (folder or hub id) gives;
    `unet` and `vae` replace the pipeline's own (hub id, folder, tiny name, a UNet .safetensors file, or
    "taesd"/"taesdxl" for the VAE). Several `controlnet`s are a MultiControlNet: a ModuleList in the order given."""
    from diffusers import AutoencoderKL, LCMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_libraries()
    path, parts = resolve_model(model), {}
    if is_single_file(model):  # the file's weights; configs, tokenizers and scheduler from the config folder
        config = resolve_model(model_config, "--model-config") if model_config else None
        path, parts = load_pipeline_file(model, config, family_of)
    kwargs = {"revision": revision} if revision else {}
    weights = {**kwargs, **SAFE}  # tokenizers and scheduler configs have no weights
    try:
        unet_model = load_unet(unet, None, path) if unet else parts.get("unet") or load_unet(path, revision)
        vae_model = load_vae(vae) if vae else parts.get("vae") or AutoencoderKL.from_pretrained(
            path, subfolder="vae", **weights)
        text_encoder = parts.get("text_encoder") or CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                                                  **weights)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kwargs)
        # LCMScheduler.from_config semantics: a base model's other scheduler config keeps only the shared settings
        scheduler = LCMScheduler.from_pretrained(path, subfolder="scheduler", **kwargs)
        family = family_of(unet_model.config)
        second = {}
        if family == "sdxl":
            second = {
                "text_encoder_2": (parts.get("text_encoder_2") or CLIPTextModelWithProjection.from_pretrained(
                    path, subfolder="text_encoder_2", **weights)).eval(),
                "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kwargs),
            }
        if controlnet:
            second["controlnet"] = _load_controlnets(controlnet)
        if adapter:
            from diffusers import T2IAdapter

            second["adapter"] = T2IAdapter.from_pretrained(resolve_model(adapter), **SAFE).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        if "safetensors" in str(e).lower():
            raise UserError(f"model {model!r} has no safetensors weights for one of its parts; lcmtrt loads "
                            "safetensors only (pickle .bin files can run code when loaded): convert it first") from None
        raise UserError(f"could not load model {model!r}: {_first_line(e)}") from None
    return Checkpoint(
        source=model,
        path=path,
        revision=revision,
        family=family,
        unet=unet_model.eval(),
        vae=vae_model.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler_config=dict(scheduler.config),
        **second,
        extra={"unet": unet, "model_config": model_config, "vae": VAE_ALIASES.get(vae, vae) if vae else None,
               **_controlnet_sources(controlnet),
               "adapter": adapter},
    )


def _load_controlnets(controlnet: str | tuple[str, ...]) -> Any:
    """One ControlNetModel, or several in a ModuleList (summed in this order, as diffusers' MultiControlNetModel)."""
    import torch
    from diffusers import ControlNetModel

    names = (controlnet,) if isinstance(controlnet, str) else tuple(controlnet)
    nets = [ControlNetModel.from_pretrained(resolve_model(name), **SAFE).eval() for name in names]
    if len(nets) == 1:
        return nets[0]
    return torch.nn.ModuleList(nets).eval()


def _controlnet_sources(controlnet: str | tuple[str, ...] | None) -> dict[str, Any]:
    """bundle.json's record of the ControlNet(s): `controlnet` for one (as bundles always had), `controlnets` in
    build order for several."""
    names = () if not controlnet else (controlnet,) if isinstance(controlnet, str) else tuple(controlnet)
    return {"controlnet": names[0]} if len(names) == 1 else {"controlnets": list(names)} if names else {}
