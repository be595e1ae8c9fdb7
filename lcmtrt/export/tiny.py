"""Tiny, deterministic, randomly initialised diffusers checkpoints for offline tests and the demo preset.

They are written with `save_pretrained` in the hub's folder layout, so tiny and real models share all loading code.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from lcmtrt.export.clip_tokenizer import write_clip_tokenizer

log = logging.getLogger(__name__)

TINY_MODELS = ("tiny-sd15", "sd15-random", "tiny-taesd", "taesd-random", "tiny-sdxl", "tiny-ssd1b",
               "tiny-sd15-base", "tiny-sdxl-base", "tiny-controlnet-sd15", "tiny-controlnet-sd15-b",
               "tiny-t2i-adapter-sdxl", "tiny-sd15-inpaint", "tiny-sdxl-inpaint")
# tiny LoRA name -> the file its folder holds: PEFT-format (diffusers keys) LCM-LoRAs, Kohya-format style LoRAs
TINY_LORAS = {
    "tiny-lcm-lora-sd15": "pytorch_lora_weights.safetensors",
    "tiny-style-lora-sd15": "style_kohya.safetensors",
    "tiny-lcm-lora-sdxl": "pytorch_lora_weights.safetensors",
    "tiny-style-lora-sdxl": "style_kohya.safetensors",
}
CLIP_VOCAB_SIZE = 49408  # the real CLIP BPE vocabulary, so tokenizer and embedding ids are realistic


def _tiny_text_encoder(projection: bool = False):
    """A tiny CLIP text encoder; `projection` gives CLIPTextModelWithProjection, SDXL's second encoder."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1 if projection else 0)
    config = CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        projection_dim=32,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _tiny_lcm_unet(guidance_embedding: bool = True, in_channels: int = 4):
    """The tiny SD1.5-like UNet: LCM-distilled (with time_cond_proj_dim) or a base UNet for LCM-LoRA; 9 input
    channels make it an inpainting UNet (latents, mask, masked image latents)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
        time_cond_proj_dim=32 if guidance_embedding else None,
    ).eval()


def _tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    ).eval()


def _tiny_sdxl_unet(transformer_layers: tuple, reverse_layers: tuple | None = None, guidance_embedding: bool = True,
                    in_channels: int = 4):
    """An SDXL-like LCM UNet: text_time added conditioning (6 time ids x 8 + 32 pooled = 80), linear projections,
    cross-attention over both encoders' 32 + 32 features, guidance embedding."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=transformer_layers,
        reverse_transformer_layers_per_block=reverse_layers, projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, time_cond_proj_dim=32 if guidance_embedding else None,
    ).eval()


def _write_sdxl_pipeline(dest: Path, unet) -> Path:
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    vae = _tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's VAE scaling
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer"))
        # SDXL's second tokenizer pads with "!" (id 0), not with the end-of-text token
        tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer_2", pad_token="!"))
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=_tiny_text_encoder(), text_encoder_2=_tiny_text_encoder(projection=True),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=LCMScheduler(),
            add_watermarker=False,
        )
        pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def write_tiny_sdxl(dest: Path) -> Path:
    return _write_sdxl_pipeline(dest, _tiny_sdxl_unet((1, 2)))


def write_tiny_ssd1b(dest: Path) -> Path:
    """SSD-1B-like: a different transformer depth per block and per up-block layer, as SSD-1B's config has."""
    return _write_sdxl_pipeline(dest, _tiny_sdxl_unet((1, 3), ((3, 2, 1), (1, 1, 1))))


def write_tiny_sd15_base(dest: Path) -> Path:
    """The tiny SD1.5-like pipeline with a base UNet (no guidance embedding): LCM-LoRA's starting point."""
    return _write_lcm_pipeline(dest, _tiny_vae(), _tiny_text_encoder(), _tiny_lcm_unet(guidance_embedding=False))


def write_tiny_sdxl_base(dest: Path) -> Path:
    return _write_sdxl_pipeline(dest, _tiny_sdxl_unet((1, 2), guidance_embedding=False))


def write_tiny_sd15_inpaint(dest: Path) -> Path:
    """stable-diffusion-inpainting in miniature: the tiny base UNet with 9 input channels (for LCM-LoRA + CFG)."""
    return _write_lcm_pipeline(dest, _tiny_vae(), _tiny_text_encoder(),
                               _tiny_lcm_unet(guidance_embedding=False, in_channels=9))


def write_tiny_sdxl_inpaint(dest: Path) -> Path:
    """stable-diffusion-xl-1.0-inpainting-0.1 in miniature: the tiny SDXL base UNet with 9 input channels."""
    return _write_sdxl_pipeline(dest, _tiny_sdxl_unet((1, 2), guidance_embedding=False, in_channels=9))


UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                     "time_emb_proj"]  # attention, feed-forward, ResNet convolutions, time projections
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _random_lora(module, targets: list[str], rank: int, seed: int) -> dict:
    """A PEFT LoRA with random A and B (PEFT zero-initialises B, which would make the LoRA a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets), module)
    with torch.no_grad():
        state = {k: v * 0.5 for k, v in get_peft_model_state_dict(module).items()}
    return state


def _kohya(state: dict, prefix: str, alpha: float) -> dict:
    """PEFT keys (a.b.lora_A.weight) -> Kohya keys (prefix_a_b.lora_down.weight, .lora_up.weight, .alpha)."""
    import torch

    out = {}
    for key, value in state.items():
        module, which = key.rsplit(".lora_", 1)
        name = f"{prefix}_{module.replace('.', '_')}"
        out[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _write_loras(dest: Path, sdxl: bool, style: bool) -> Path:
    """LCM-LoRA stand-in: PEFT format, rank 8, UNet only. Style LoRA: Kohya format, rank 4 with alpha 8, UNet and
    text encoder(s)."""
    from safetensors.torch import save_file

    unet = _tiny_sdxl_unet((1, 2), guidance_embedding=False) if sdxl else _tiny_lcm_unet(guidance_embedding=False)
    dest.mkdir(parents=True, exist_ok=True)
    if not style:
        state = _random_lora(unet, UNET_LORA_TARGETS, rank=8, seed=11)
        save_file({f"unet.{k}": v.contiguous() for k, v in state.items()}, dest / "pytorch_lora_weights.safetensors")
        return dest
    tensors = _kohya(_random_lora(unet, UNET_LORA_TARGETS, rank=4, seed=12), "lora_unet", alpha=8.0)
    encoders = [("lora_te1", False), ("lora_te2", True)] if sdxl else [("lora_te", False)]
    for seed, (prefix, projection) in enumerate(encoders, start=13):
        state = _random_lora(_tiny_text_encoder(projection), TEXT_LORA_TARGETS, rank=4, seed=seed)
        tensors.update(_kohya(state, prefix, alpha=8.0))
    save_file(tensors, dest / "style_kohya.safetensors")
    return dest


def write_tiny_controlnet(dest: Path, seed: int = 0) -> Path:
    """A tiny SD1.5-like ControlNet for the tiny UNet. Its output convolutions are zero-initialised in diffusers,
    which would make every residual zero: they are randomised here so the control path is really tested. Another
    `seed` gives another ControlNet of the same shape (MultiControlNet tests)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel(
        block_out_channels=(4, 8), layers_per_block=1, in_channels=4, cross_attention_dim=32, norm_num_groups=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), conditioning_embedding_out_channels=(16, 32),
    ).eval()
    zero_initialised = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                        controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for layer in zero_initialised:
            torch.nn.init.normal_(layer.weight, std=0.3)
            torch.nn.init.normal_(layer.bias, std=0.1)
    controlnet.save_pretrained(dest, safe_serialization=True)
    return dest


def write_tiny_adapter(dest: Path) -> Path:
    """A tiny full_adapter_xl T2I-Adapter matching the tiny SDXL UNet's down blocks (32 and 64 channels)."""
    import torch
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=4,
               adapter_type="full_adapter_xl").eval().save_pretrained(dest, safe_serialization=True)
    return dest


def write_tiny_taesd(dest: Path) -> Path:
    """A tiny AutoencoderTiny (TAESD) with the tiny UNet's latent size (factor 2), as a bare diffusers model folder."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4,
    ).eval().save_pretrained(dest, safe_serialization=True)
    return dest


def write_taesd_random(dest: Path) -> Path:
    """TAESD's architecture (AutoencoderTiny's defaults) with random weights, for real-size offline benchmarks."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny().eval().save_pretrained(dest, safe_serialization=True)
    return dest


def _sd15_random_parts() -> tuple:
    """SD1.5's exact architecture (LCM_Dreamshaper_v7's UNet config) with random weights: real-size benchmarks
    offline. Default diffusers configs are SD1.5's; only what differs is set."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )).eval()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, time_cond_proj_dim=256).eval()
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    ).eval()
    return vae, text_encoder, unet


def _write_lcm_pipeline(dest: Path, vae, text_encoder, unet) -> Path:
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = write_clip_tokenizer(Path(tmp) / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        pipe = LatentConsistencyModelPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=LCMScheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def write_tiny_sd15(dest: Path) -> Path:
    """A tiny SD1.5-like LCM pipeline (UNet with time_cond_proj_dim) in diffusers format."""
    return _write_lcm_pipeline(dest, _tiny_vae(), _tiny_text_encoder(), _tiny_lcm_unet())


def write_sd15_random(dest: Path) -> Path:
    return _write_lcm_pipeline(dest, *_sd15_random_parts())


_WRITERS = {"tiny-sd15": write_tiny_sd15, "sd15-random": write_sd15_random, "tiny-taesd": write_tiny_taesd,
            "taesd-random": write_taesd_random, "tiny-sdxl": write_tiny_sdxl, "tiny-ssd1b": write_tiny_ssd1b,
            "tiny-sd15-base": write_tiny_sd15_base, "tiny-controlnet-sd15": write_tiny_controlnet,
            "tiny-controlnet-sd15-b": lambda d: write_tiny_controlnet(d, seed=1),
            "tiny-t2i-adapter-sdxl": write_tiny_adapter, "tiny-sdxl-base": write_tiny_sdxl_base,
            "tiny-sd15-inpaint": write_tiny_sd15_inpaint, "tiny-sdxl-inpaint": write_tiny_sdxl_inpaint,
            "tiny-lcm-lora-sd15": lambda d: _write_loras(d, sdxl=False, style=False),
            "tiny-style-lora-sd15": lambda d: _write_loras(d, sdxl=False, style=True),
            "tiny-lcm-lora-sdxl": lambda d: _write_loras(d, sdxl=True, style=False),
            "tiny-style-lora-sdxl": lambda d: _write_loras(d, sdxl=True, style=True)}


def tiny_checkpoint(name: str, cache_dir: Path) -> Path:
    """Path of tiny model `name` under cache_dir, written on first use (atomically: temp folder, then rename)."""
    dest = cache_dir / name
    markers = ("model_index.json", "config.json", *TINY_LORAS.values())
    if any((dest / marker).is_file() for marker in markers):
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        _WRITERS[name](staging)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("wrote tiny checkpoint %s to %s", name, dest)
    return dest
