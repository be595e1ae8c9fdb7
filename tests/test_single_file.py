"""Single-file checkpoints (`--model FILE.safetensors --model-config DIR_OR_ID`): the tiny SD1.5- and SDXL-class
base models written in the original Stable Diffusion layout (the inverse of diffusers' single_file_utils mapping,
checked here by running diffusers' own conversion back) build bundles whose images equal the diffusers-folder
bundles', and a pickle file, a missing config offline, an absent config folder and a config of another architecture
are each refused in one line."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lcmtrt.cli.main import main
from lcmtrt.errors import UserError

MODEL = "tiny-sd15-base"  # a base UNet, as LCM merges are (LCM-LoRA fused into a base model)
RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _ldm_unet_key(key: str, layers: int, up_attention_blocks: set[int]) -> str:
    """diffusers UNet key -> original (ldm) key: input/middle/output blocks numbered as diffusers' loader expects."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL's
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    resnet = lambda rest: ".".join(dict(RESNET).get(part, part) for part in rest.split("."))  # noqa: E731
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + block * (layers + 1) + j}.{0 if kind == 'resnets' else 1}." + (
            resnet(rest) if kind == "resnets" else rest)
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        return (f"middle_block.{2 * int(m[2])}.{resnet(m[3])}" if m[1] == "resnets"
                else f"middle_block.{2 * int(m[2]) + 1}.{m[3]}")
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{block * (layers + 1) + j}.{0 if kind == 'resnets' else 1}." + (
            resnet(rest) if kind == "resnets" else rest)
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        return f"output_blocks.{block * (layers + 1) + layers}.{2 if block in up_attention_blocks else 1}.conv.{m[2]}"
    raise AssertionError(f"no original-layout name for UNet key {key}")


def _ldm_vae_key(key: str, up_blocks: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"down_blocks\.(\d+)\.resnets", r"down.\1.block", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets", lambda m: f"up.{up_blocks - 1 - int(m[1])}.block", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{up_blocks - 1 - int(m[1])}.upsample", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    if "mid_block.attentions.0." in key:
        key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
        for new, old in VAE_ATTENTION:
            key = key.replace(f".{new}.", f".{old}.")
    return key


OPEN_CLIP = (("self_attn.", "attn."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"))


def _open_clip_layout(text_encoder_2, prefix: str) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder as the original file holds it (OpenCLIP names, q/k/v fused into in_proj, the
    projection transposed): the inverse of diffusers' convert_open_clip_checkpoint."""
    fixed = {"embeddings.position_embedding.weight": "positional_embedding",
             "embeddings.token_embedding.weight": "token_embedding.weight",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    state, fused = {}, {}
    for key, value in text_encoder_2.state_dict().items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            state[prefix + "text_projection"] = value.T
        elif key in fixed:
            state[prefix + fixed[key]] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)", key):
            rest = m[2]
            for new, old in OPEN_CLIP:
                rest = rest.replace(new, old)
            state[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = value
        elif not key.endswith("position_ids"):
            raise AssertionError(f"no original-layout name for text encoder 2 key {key}")
    for (layer, kind), qkv in fused.items():
        state[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv[c] for c in "qkv"])
    return state


def original_layout(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The models' weights under the original checkpoint's names (VAE attention as 1x1 convolutions); SDXL's two
    text encoders under conditioner.embedders.0 (CLIP) and .1 (OpenCLIP)."""
    up_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    state = {"model.diffusion_model." + _ldm_unet_key(k, unet.config.layers_per_block, up_attention): v
             for k, v in unet.state_dict().items()}
    for key, value in vae.state_dict().items():
        name = "first_stage_model." + _ldm_vae_key(key, len(vae.config.up_block_types))
        state[name] = value[:, :, None, None] if "attn_1" in name and value.ndim == 2 else value
    first = "conditioner.embedders.0.transformer." if text_encoder_2 is not None else "cond_stage_model.transformer."
    for key, value in text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            state[first + (key if key.startswith("text_model.") else "text_model." + key)] = value
    if text_encoder_2 is not None:
        state.update(_open_clip_layout(text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v.contiguous().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def single_file(lcmtrt_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd15-base as one .safetensors in the original layout; diffusers' own conversion must give it back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from lcmtrt.export.models import resolve_model

    folder = resolve_model(MODEL)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    state = original_layout(unet, vae, text_encoder)
    for model, back in ((unet, convert_ldm_unet_checkpoint(state, unet.config)),
                        (vae, convert_ldm_vae_checkpoint(state, vae.config))):
        assert back.keys() == model.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    path = tmp_path_factory.mktemp("single-file") / "tiny-merge.safetensors"
    save_file(state, str(path))
    return path


def test_single_file_bundle_equals_folder_bundle(single_file: Path, build_tiny, tmp_path: Path) -> None:
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset
    from lcmtrt.export.models import resolve_model
    from lcmtrt.runtime.pipeline import Pipeline

    preset = load_preset("tiny-sd15-samplers")
    assert preset.model == MODEL
    configs = tmp_path / "configs"  # configs, tokenizer and scheduler only: every weight must come from the file
    shutil.copytree(resolve_model(MODEL), configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    out = tmp_path / "from-file"
    build_bundle(replace(preset, model=str(single_file), model_config=str(configs)), out, backend="onnxruntime",
                 precision="fp32")
    ours, folder = Pipeline.load(out), Pipeline.load(build_tiny("tiny-sd15-samplers"))
    assert ours.bundle.sources["model_config"] == str(configs)
    assert any(name.startswith("model:tiny-merge") for name in ours.bundle.sources["files"])
    for scheduler, guidance in (("euler-trailing", 1.0), ("tcd", 2.0)):
        a = ours.generate(["a red fox"], seed=3, steps=2, scheduler=scheduler, guidance_scale=guidance)
        b = folder.generate(["a red fox"], seed=3, steps=2, scheduler=scheduler, guidance_scale=guidance)
        np.testing.assert_array_equal(a.images, b.images)


SDXL = "tiny-sdxl-base"


@pytest.fixture(scope="module")
def sdxl_single_file(lcmtrt_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sdxl-base as one original-layout .safetensors; diffusers' own conversions must give every part back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lcmtrt.export.models import resolve_model

    folder = resolve_model(SDXL)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    encoders = (CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))
    state = original_layout(unet, vae, *encoders)
    second = {k: v for k, v in state.items() if k.startswith("conditioner.embedders.1.")}
    for model, back in ((unet, convert_ldm_unet_checkpoint(state, unet.config)),
                        (vae, convert_ldm_vae_checkpoint(state, vae.config)),
                        (encoders[0], convert_ldm_clip_checkpoint(state)),
                        (encoders[1], convert_open_clip_checkpoint(encoders[1], second,
                                                                   prefix="conditioner.embedders.1.model."))):
        # CLIPTextModel's keys lose "text_model." in newer transformers; compare without it on both sides
        own = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if "position_ids" not in k}
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
        assert back.keys() == own.keys(), sorted(set(back) ^ set(own))[:4]
        assert all(torch.equal(back[k], v) for k, v in own.items())
    path = tmp_path_factory.mktemp("single-file-sdxl") / "tiny-sdxl-merge.safetensors"
    save_file(state, str(path))
    return path


def test_sdxl_single_file_bundle_equals_folder_bundle(sdxl_single_file: Path, build_tiny, tmp_path: Path) -> None:
    """An SDXL-class file: two text encoders, each converted from its own key prefix, and the UNet's added
    embeddings; its bundle's images equal the diffusers-folder bundle's for two samplers."""
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset
    from lcmtrt.export.models import resolve_model
    from lcmtrt.runtime.pipeline import Pipeline

    preset = load_preset("tiny-sdxl-samplers")
    assert preset.model == SDXL
    configs = tmp_path / "configs"  # configs, tokenizers and scheduler only: every weight must come from the file
    shutil.copytree(resolve_model(SDXL), configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    out = tmp_path / "from-file"
    build_bundle(replace(preset, model=str(sdxl_single_file), model_config=str(configs)), out,
                 backend="onnxruntime", precision="fp32")
    ours, folder = Pipeline.load(out), Pipeline.load(build_tiny("tiny-sdxl-samplers"))
    assert ours.bundle.family == "sdxl" and any(name.startswith("model:tiny-sdxl-merge")
                                                for name in ours.bundle.sources["files"])
    for scheduler, guidance in (("euler-trailing", 1.0), ("tcd", 2.0)):
        a = ours.generate(["a red fox"], seed=3, steps=2, scheduler=scheduler, guidance_scale=guidance)
        b = folder.generate(["a red fox"], seed=3, steps=2, scheduler=scheduler, guidance_scale=guidance)
        np.testing.assert_array_equal(a.images, b.images)


def _refused(capsys, *argv: str) -> str:
    code = main(["build-engines", "--preset", "tiny-sd15-samplers", "--backend", "onnxruntime", "--precision",
                 "fp32", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("lcmtrt: error:"), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("name", ["merge.ckpt", "merge.bin"])
def test_pickle_single_file_refused(name: str, tmp_path: Path, capsys) -> None:
    (tmp_path / name).write_bytes(b"not loaded")
    line = _refused(capsys, "--model", str(tmp_path / name), "--model-config", MODEL, "--out", str(tmp_path / "b"))
    assert "safetensors only" in line and name in line


def test_missing_model_config_offline_refused(single_file: Path, tmp_path: Path, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    line = _refused(capsys, "--model", str(single_file), "--out", str(tmp_path / "b"))
    assert "--model-config" in line and "single file" in line


def test_absent_model_config_folder_refused(single_file: Path, tmp_path: Path, capsys) -> None:
    line = _refused(capsys, "--model", str(single_file), "--model-config", "/nonexistent/dir", "--out",
                    str(tmp_path / "b"))
    assert "--model-config" in line and "/nonexistent/dir" in line, line


def test_wrong_model_config_refused(single_file: Path, tmp_path: Path, capsys) -> None:
    line = _refused(capsys, "--model", str(single_file), "--model-config", "tiny-sdxl-base", "--out",
                    str(tmp_path / "b"))
    assert "does not fit" in line or "has no weights" in line
    assert "tiny-sdxl-base" in line


def test_unet_only_file_loads_on_its_base_model(lcmtrt_cache: Path, tmp_path: Path) -> None:
    """`unet = "FILE.safetensors"` (SDXL-Lightning's form: diffusers keys, no config): the base model's unet/ config
    gives the architecture and every weight comes from the file."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from lcmtrt.export.models import load_checkpoint, resolve_model

    unet = UNet2DConditionModel.from_pretrained(resolve_model(MODEL), subfolder="unet")
    state = {k: v + 0.5 for k, v in unet.state_dict().items()}  # not the base's own weights
    save_file(state, str(tmp_path / "unet_4step.safetensors"))
    loaded = load_checkpoint(MODEL, unet=str(tmp_path / "unet_4step.safetensors")).unet.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(UserError, match="safetensors only"):
        load_checkpoint(MODEL, unet=str(tmp_path / "unet_4step.bin"))
