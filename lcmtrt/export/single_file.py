"""Single-file checkpoints: one `.safetensors` in the original Stable Diffusion layout (most community models, LCM
merges included), or a UNet alone (SDXL-Lightning's), loaded with diffusers' `from_single_file`. The architecture
comes from a diffusers folder or hub id whose configs match (`--model-config`); safetensors only, as everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lcmtrt.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt"]  # what diffusers' own single-file loader fetches
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIXES = {"text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
                 "text_encoder_2": ("conditioner.embedders.1.",)}


def is_single_file(source: str | None) -> bool:
    """A model/UNet source naming one weights file (local, or OWNER/REPO/FILE on the hub) rather than a folder."""
    return bool(source) and Path(source).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)


def local_file(source: str, label: str) -> Path:
    """The file on disk: a local path, or OWNER/REPO/FILE.safetensors fetched into the hub cache; pickles refused."""
    path = Path(source).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{label} {source} is not a .safetensors file; lcmtrt loads safetensors only (pickle "
                        ".ckpt/.bin files can run code when loaded): convert it first")
    if path.is_file():
        return path
    if source.startswith((".", "/", "~")) or source.count("/") < 2:
        raise UserError(f"{label} file {source} does not exist")
    from huggingface_hub import hf_hub_download

    owner, repo, name = source.split("/", 2)
    try:
        return Path(hf_hub_download(f"{owner}/{repo}", name))
    except Exception as e:  # noqa: BLE001 - offline, missing or gated: one line either way
        raise UserError(f"{label} {source}: could not fetch {name} from {owner}/{repo} "
                        f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None


def config_folder(model_config: str | None, state: dict[str, Any], label: str) -> str:
    """A local folder with the diffusers configs: --model-config's folder (tiny names already resolved by the
    caller), or its (or the keys' guessed) hub id's configs fetched without weights, as diffusers' from_single_file
    does."""
    if model_config is not None:
        if Path(model_config).is_dir():
            return model_config
        try:
            return _fetch_configs(model_config)
        except Exception as e:  # noqa: BLE001 - any failure is a bad or unreachable config source
            raise UserError(f"--model-config {model_config} is neither a diffusers folder nor a hub id whose configs "
                            f"can be fetched ({_first_line(e)})") from None
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    guess = fetch_diffusers_config(state)["pretrained_model_name_or_path"]
    try:
        return _fetch_configs(guess)
    except Exception:  # noqa: BLE001 - offline without the guessed configs cached: the flag is the way out
        raise UserError(f"{label} is a single file without its architecture: pass --model-config DIR_OR_ID (a "
                        f"diffusers folder or hub id with the same architecture; {guess}, guessed from its keys, "
                        "is not in the hub cache)") from None


def _fetch_configs(hub_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:  # the cache first: offline it is all there is, online it spares a round trip
        return snapshot_download(hub_id, allow_patterns=CONFIG_PATTERNS, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: fetch the configs
        return snapshot_download(hub_id, allow_patterns=CONFIG_PATTERNS)


def _first_line(e: Exception) -> str:
    if isinstance(e, KeyError):  # diffusers' key mapping met a tensor the file does not have
        return f"the file has no tensor {e.args[0]}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _no_meta(module: Any, part: str, source: str, config: str) -> Any:
    """from_single_file leaves weights the file lacks uninitialised (on the meta device) instead of failing."""
    missing = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if missing:
        raise UserError(f"{source} has no weights for {len(missing)} tensor(s) of the {part} the configs of {config} "
                        f"describe (first: {missing[0]}): --model-config must name a model of the file's architecture")
    return module.eval()


def load_unet_file(source: str, config_source: str | None) -> Any:
    """A UNet-only file (diffusers or original keys), its architecture from `config_source`'s unet/ configs."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    state = load_file(str(local_file(source, "unet")))
    config = config_folder(config_source, state, f"unet {source}")
    try:
        unet = UNet2DConditionModel.from_single_file(state, config=config, subfolder="unet", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a key or shape mismatch is a config that does not fit the file
        raise UserError(f"unet {source} does not fit the UNet config of {config_source or config}: "
                        f"{_first_line(e)}") from None
    return _no_meta(unet, "UNet", source, config_source or config)


def load_pipeline_file(source: str, model_config: str | None, family_of: Any) -> tuple[str, dict[str, Any]]:
    """(config folder, parts) of a whole-pipeline file: unet, vae, text encoder(s); `family_of` reads the UNet
    config. The text encoders are converted from their own key prefixes only, so an SDXL file's two encoders of one
    width are never mixed up by diffusers' shape-based guess."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    state = load_file(str(local_file(source, "model")))
    if not any(key.startswith(UNET_PREFIX) for key in state):
        raise UserError(f"model {source} has no UNet in the original Stable Diffusion layout ({UNET_PREFIX}...); "
                        "a UNet-only file goes in `unet` (--unet) on its base model")
    config = config_folder(model_config, state, f"model {source}")
    label = model_config or config
    try:
        family = family_of(UNet2DConditionModel.load_config(config, subfolder="unet"))
        parts = {"unet": UNet2DConditionModel.from_single_file(state, config=config, subfolder="unet",
                                                               local_files_only=True),
                 "vae": AutoencoderKL.from_single_file(state, config=config, subfolder="vae", local_files_only=True)}
        encoders = {"text_encoder": CLIPTextModel}
        if family == "sdxl":
            encoders["text_encoder_2"] = CLIPTextModelWithProjection
        for name, cls in encoders.items():
            own = {k: v for k, v in state.items() if k.startswith(TEXT_PREFIXES[name])}
            parts[name] = create_diffusers_clip_model_from_ldm(cls, own, config=config, subfolder=name,
                                                               local_files_only=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a key or shape mismatch is a config that does not fit the file
        raise UserError(f"model {source} does not fit the configs of --model-config {label}: {_first_line(e)}") from None
    parts = {name: _no_meta(module, name, source, label) for name, module in parts.items()}
    return config, {"family": family, **parts}
