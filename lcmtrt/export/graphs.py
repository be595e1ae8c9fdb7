"""The torch modules exported as engines: one forward per stage, with all LCM step math inside `denoise`.

Inter-engine tensors are float32 (token ids int32, images uint8); an fp16 graph casts to fp16 at its entry and
back at its exit, so the runtime is precision-agnostic and the scheduler arithmetic always runs in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lcmtrt.bundle import SinusoidalEmbedding
from lcmtrt.errors import UserError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


class Fp32Norm(nn.Module):
    """Runs a GroupNorm/LayerNorm in fp32 inside an fp16 graph: strongly typed TensorRT computes norms in their
    input type, and fp16 variance overflows."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def to_precision(module: nn.Module, precision: str) -> nn.Module:
    """Cast weights to the precision; under fp16 keep every norm in fp32 (see Fp32Norm)."""
    dtype = PRECISIONS[precision]
    module = module.to(dtype)
    if dtype == torch.float32:
        return module
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (nn.GroupNorm, nn.LayerNorm)):
                setattr(parent, child_name, Fp32Norm(child))
    return module


class GivenEmbedding(nn.Module):
    """Stands in for a UNet's (or ControlNet's) time_proj: returns the timestep embedding the runtime computed on the
    host in fp32 (runtime/embeddings.py), so no reduced-precision graph ever rounds the sinusoid's arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None  # [1, dim], set by DenoiseStage.forward for the call it makes

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.value.expand(timesteps.shape[0], -1)


def time_embedding_spec(time_proj: nn.Module) -> SinusoidalEmbedding:
    """The float32 frequencies of diffusers' get_timestep_embedding for this Timesteps module, computed exactly as
    diffusers computes them (max_period 10000)."""
    dim, shift = int(time_proj.num_channels), float(time_proj.downscale_freq_shift)
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32)
    frequencies = torch.exp(exponent / (half - shift))
    return SinusoidalEmbedding(dim, tuple(float(f) for f in frequencies), bool(time_proj.flip_sin_to_cos),
                               float(getattr(time_proj, "scale", 1.0)))


def guidance_embedding_spec(dim: int) -> SinusoidalEmbedding:
    """The float32 frequencies of diffusers' get_guidance_scale_embedding (LCM pipelines) for `dim`."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    return SinusoidalEmbedding(dim, tuple(float(f) for f in frequencies))


def sinusoidal_reference(spec: SinusoidalEmbedding, arguments: torch.Tensor) -> torch.Tensor:
    """What diffusers computes from `spec` for these arguments (timesteps, or (w - 1) * 1000), in torch fp32."""
    angles = arguments.float()[:, None] * torch.tensor(spec.frequencies, dtype=torch.float32)[None, :] * spec.scale
    halves = [torch.cos(angles), torch.sin(angles)] if spec.flip_sin_to_cos else [torch.sin(angles), torch.cos(angles)]
    return nn.functional.pad(torch.cat(halves, dim=1), (0, spec.dim - 2 * len(spec.frequencies)))


def checked_time_embedding_spec(time_proj: nn.Module) -> SinusoidalEmbedding:
    """time_embedding_spec, refused unless it reproduces this time_proj (a custom one would be computed wrongly)."""
    spec = time_embedding_spec(time_proj)
    timesteps = torch.tensor([0, 1, 259, 999])
    with torch.no_grad():
        expected = time_proj(timesteps).float()
    if not torch.allclose(sinusoidal_reference(spec, timesteps), expected, atol=1e-5, rtol=0):
        raise UserError("this UNet's time_proj is not diffusers' get_timestep_embedding; lcmtrt cannot compute it")
    return spec


def _time_proj_config(module: nn.Module) -> tuple:
    proj = module.time_proj
    return proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, getattr(proj, "scale", 1.0)


def is_tiny_vae(vae: nn.Module) -> bool:
    """AutoencoderTiny (TAESD) encodes deterministically: no latent distribution, no sample draw."""
    return type(vae).__name__ == "AutoencoderTiny"


class TextStage(nn.Module):
    """Token ids -> prompt embeddings (the CLIP encoder's last hidden state after its final LayerNorm)."""

    def __init__(self, text_encoder: nn.Module, precision: str):
        super().__init__()
        self.text_encoder = to_precision(text_encoder, precision)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(torch.int64))[0].float()


class DualTextStage(nn.Module):
    """SDXL's two encoders: the penultimate hidden states of both, concatenated (768 + 1280 for SDXL), and the
    second encoder's projected pooled embedding (diffusers' `pooled_prompt_embeds`)."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module, precision: str):
        super().__init__()
        self.text_encoder = to_precision(text_encoder, precision)
        self.text_encoder_2 = to_precision(text_encoder_2, precision)

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True)
        second = self.text_encoder_2(input_ids_2.to(torch.int64), output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return embeds.float(), second.text_embeds.float()


def general_step(prediction_type: str, coeffs: torch.Tensor, latents: torch.Tensor, model_output: torch.Tensor,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of any sampler from its coefficient row (bundle.COEFF_COLUMNS), in the float32 op order of
    diffusers' schedulers, so that each one's row reproduces it bit for bit (runtime/scheduler.py apply_step is
    the numpy twin): x0 and eps from the prediction type; denoised = (c_out x0 + c_skip x) + denoised_eps eps (LCM's
    boundary condition, TCD's x_s, DDIM's and Euler's x0); next = ((next_denoised denoised + next_eps eps) +
    next_noise noise) + (next_x x + ((x - denoised) / sigma) dt) (LCM, TCD and DDIM use the first part, Euler the
    second; the unused part is an exact zero); the output decoded is next where decode_next is set (DDIM's and
    Euler's pipelines decode the last next sample), else denoised."""
    c_skip, c_out, sqrt_alpha, sqrt_beta, next_denoised, next_noise = (coeffs[i] for i in range(1, 7))
    denoised_eps, next_eps, next_x, sigma, dt, decode_next = (coeffs[i] for i in range(9, 15))
    if prediction_type == "epsilon":
        x0, eps = (latents - sqrt_beta * model_output) / sqrt_alpha, model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (latents - sqrt_alpha * x0) / sqrt_beta
    else:
        x0 = sqrt_alpha * latents - sqrt_beta * model_output
        eps = sqrt_alpha * model_output + sqrt_beta * latents
    denoised = (c_out * x0 + c_skip * latents) + denoised_eps * eps
    euler = next_x * latents + ((latents - denoised) / sigma) * dt
    next_latents = ((next_denoised * denoised + next_eps * eps) + next_noise * noise) + euler
    return next_latents, torch.where(decode_next > 0, next_latents, denoised)


class DenoiseStage(nn.Module):
    """One whole sampler step: UNet, guidance, x0, the sampler's update (LCM boundary condition, TCD, Euler, DDIM), noise.

    `coeffs` is one row of the runtime's step plan (bundle.COEFF_COLUMNS, see general_step): for LCM timestep,
    c_skip, c_out, sqrt(a_t), sqrt(1-a_t), sqrt(a_prev), sqrt(1-a_prev) (1 and 0 on the last step, so the output is
    exactly `denoised` there), then the columns that make it TCD's, Euler's or DDIM's step.
    `time_embedding` is that step's sinusoidal timestep embedding [dim], computed on the host in fp32 (it replaces
    the UNet's and the ControlNet's time_proj). Guidance is one of three `modes`: "embedding" (LCM-distilled
    UNet: `guidance_embedding`, diffusers' w_embedding computed on the host in fp32 per row, feeds its
    time_cond_proj_dim), "cfg" (classifier-free guidance: prompt_embeds/text_embeds/time_ids hold
    [negative; positive] rows, uncond_mask zeroes the negative embeddings per row as SDXL's
    force_zeros_for_empty_prompt does) or "none" (a UNet without embedding at guidance <= 1: no guidance input).
    SDXL-class graphs also take text_embeds (pooled) and time_ids. Inpainting (`inpaint`): "unet9" concatenates
    `mask` and `masked_image_latents` after the latents for a 9-channel UNet; "blend" replaces, after the step, the
    latents outside `mask` with `image_latents` noised with `init_noise` to the next timestep (sqrt_alpha_prev,
    sqrt_beta_prev: 1 and 0 on the last step, the image latents as they are), as diffusers' inpaint pipelines do
    for 4-channel UNets; its `denoised` output is blended the same way, since that is what is decoded.
    """

    def __init__(self, unet: nn.Module, precision: str, prediction_type: str, mode: str, sdxl: bool,
                 controlnet: nn.Module | None = None, adapter_states: int = 0, inpaint: str | None = None):
        super().__init__()
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise UserError(f"unsupported prediction_type {prediction_type!r} (epsilon, sample or v_prediction)")
        if (mode == "embedding") != (unet.config.time_cond_proj_dim is not None):
            raise ValueError(f"guidance mode {mode!r} does not fit this UNet's time_cond_proj_dim")
        # one ControlNetModel, or a ModuleList of several (export/models.py: a MultiControlNet in build order)
        nets = list(controlnet) if isinstance(controlnet, nn.ModuleList) else [] if controlnet is None else [controlnet]
        if any(_time_proj_config(net) != _time_proj_config(unet) for net in nets):
            raise UserError("the ControlNet's timestep embedding differs from the UNet's; lcmtrt feeds both one")
        self.embeddings = {"time_embedding": checked_time_embedding_spec(unet.time_proj)}
        if mode == "embedding":
            self.embeddings["guidance_embedding"] = guidance_embedding_spec(unet.config.time_cond_proj_dim)
        self.unet = to_precision(unet, precision)
        self.dtype = PRECISIONS[precision]
        self.prediction_type, self.mode = prediction_type, mode
        self.given_time = GivenEmbedding()
        self.unet.time_proj = self.given_time
        self.input_names = ["latents", "coeffs", "time_embedding", "noise", "prompt_embeds"]
        self.input_names += {"embedding": ["guidance_embedding"], "cfg": ["guidance_scale", "uncond_mask"],
                             "none": []}[mode]
        self.input_names += ["text_embeds", "time_ids"] if sdxl else []
        # ControlNet: uint8 NHWC control image (diffusers' [0, 1] control preprocessing inside) and this step's
        # scale (conditioning scale x diffusers' controlnet_keep for the step); no guidance embedding for it.
        # Several (a ModuleList): control_image_0..N-1 and control_scale [batch, N], residuals summed in order
        self.controlnet = to_precision(controlnet, precision) if controlnet is not None else None
        for net in nets:
            net.time_proj = self.given_time
        self.control_images = ["control_image"] if len(nets) == 1 else [f"control_image_{k}" for k in range(len(nets))]
        self.input_names += self.control_images + ["control_scale"] if nets else []
        # T2I-Adapter: the adapter engine's scaled states, and this step's keep (1 for the first
        # int(N * adapter_conditioning_factor) steps, else 0: adding zeros equals diffusers passing none)
        self.adapter_states = [f"adapter_state_{k}" for k in range(adapter_states)]
        self.input_names += self.adapter_states + (["adapter_keep"] if adapter_states else [])
        self.inpaint = inpaint
        self.input_names += {"unet9": ["mask", "masked_image_latents"], "blend": ["mask", "image_latents", "init_noise"],
                             None: []}[inpaint]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = dict(zip(self.input_names, tensors))
        latents, coeffs = x["latents"], x["coeffs"]
        timestep = coeffs[0:1]
        embeds, pooled = x["prompt_embeds"], x.get("text_embeds")
        # the model sees latents / input_divisor (Euler's scale_model_input; 1 for the others: exact)
        cond, sample = None, latents / coeffs[8]
        self.given_time.value = x["time_embedding"][None, :]
        if self.mode == "embedding":
            cond = x["guidance_embedding"].to(self.dtype)
        elif self.mode == "cfg":
            keep = x["uncond_mask"][:, None, None]
            rows = latents.shape[0]
            embeds = torch.cat([embeds[:rows] * keep, embeds[rows:]])
            if pooled is not None:
                pooled = torch.cat([pooled[:rows] * keep[:, :, 0], pooled[rows:]])
            sample = torch.cat([sample, sample])
        added = None
        if pooled is not None:
            added = {"text_embeds": pooled.to(self.dtype), "time_ids": x["time_ids"].to(self.dtype)}
        residuals = self._control(x, sample, timestep, embeds, added) if self.controlnet is not None else {}
        if self.adapter_states:
            keep = x["adapter_keep"][:, None, None, None]
            states = [x[name] * keep for name in self.adapter_states]
            if self.mode == "cfg":
                states = [torch.cat([state, state]) for state in states]
            residuals["down_intrablock_additional_residuals"] = [state.to(self.dtype) for state in states]
        unet_sample = sample
        if self.inpaint == "unet9":  # diffusers: cat([latents (x2 under CFG), mask, masked_image_latents], dim=1)
            extra = torch.cat([x["mask"], x["masked_image_latents"]], dim=1)
            unet_sample = torch.cat([sample, torch.cat([extra, extra]) if self.mode == "cfg" else extra], dim=1)
        model_output = self.unet(
            unet_sample.to(self.dtype), timestep, embeds.to(self.dtype), timestep_cond=cond, added_cond_kwargs=added,
            **residuals,
        ).sample.float()
        if self.mode == "cfg":
            uncond, text = model_output.chunk(2)
            model_output = uncond + x["guidance_scale"][:, None, None, None] * (text - uncond)
        next_latents, denoised = general_step(self.prediction_type, coeffs, latents, model_output, x["noise"])
        sqrt_alpha_prev, sqrt_beta_prev = coeffs[5], coeffs[6]
        if self.inpaint == "blend":
            mask = x["mask"]
            proper = sqrt_alpha_prev * x["image_latents"] + sqrt_beta_prev * x["init_noise"]  # add_noise(t_next)
            next_latents = (1 - mask) * proper + mask * next_latents
            denoised = (1 - mask) * proper + mask * denoised
        return next_latents, denoised

    def _control(self, x: dict[str, torch.Tensor], sample: torch.Tensor, timestep: torch.Tensor,
                 embeds: torch.Tensor, added: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """The ControlNet residuals, each net's scaled by its per-row scale and summed in build order as diffusers'
        MultiControlNetModel sums them."""
        nets = list(self.controlnet) if isinstance(self.controlnet, nn.ModuleList) else [self.controlnet]
        down_sum, mid_sum = None, None
        for k, (net, name) in enumerate(zip(nets, self.control_images)):
            image = (x[name].permute(0, 3, 1, 2).float() / 255.0).to(self.dtype)
            scale = x["control_scale"] if len(nets) == 1 else x["control_scale"][:, k]
            if self.mode == "cfg":  # diffusers doubles the control image for CFG (no guess mode)
                image, scale = torch.cat([image, image]), torch.cat([scale, scale])
            down, mid = net(sample.to(self.dtype), timestep, encoder_hidden_states=embeds.to(self.dtype),
                            controlnet_cond=image, conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
            scale = scale.to(self.dtype)[:, None, None, None]
            down, mid = [d * scale for d in down], mid * scale
            down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down)]
            mid_sum = mid if mid_sum is None else mid_sum + mid
        return {"down_block_additional_residuals": down_sum, "mid_block_additional_residual": mid_sum}


class AdapterStage(nn.Module):
    """T2I-Adapter, once per request: uint8 NHWC condition image ([0, 1] inside, as diffusers' adapter
    preprocessing) -> its down-block states, each times the per-row adapter_conditioning_scale."""

    def __init__(self, adapter: nn.Module, precision: str):
        super().__init__()
        self.adapter = to_precision(adapter, precision)
        self.dtype = PRECISIONS[precision]

    def forward(self, adapter_image: torch.Tensor, adapter_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pixels = (adapter_image.permute(0, 3, 1, 2).float() / 255.0).to(self.dtype)
        scale = adapter_scale[:, None, None, None]
        return tuple(state.float() * scale for state in self.adapter(pixels))


def latent_statistics(vae: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-channel latents_mean/latents_std some VAEs configure (diffusers then uses them around scaling)."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


class VaeDecodeStage(nn.Module):
    """Denoised latents -> uint8 NHWC images, with diffusers' scaling and postprocessing inside."""

    def __init__(self, vae: nn.Module, precision: str, scaling_factor: float):
        super().__init__()
        self.statistics = latent_statistics(vae)
        self.vae = to_precision(vae, precision)
        self.dtype = PRECISIONS[precision]
        self.scaling_factor = scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.statistics is None:
            latents = latents / self.scaling_factor
        else:
            mean, std = self.statistics
            latents = latents * std / self.scaling_factor + mean
        image = self.vae.decode(latents.to(self.dtype)).sample.float()
        image = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        # diffusers rounds half to even in numpy; ONNX Round does the same.
        return torch.round(image * 255.0).clamp(0, 255).to(torch.uint8)


class VaeEncodeStage(nn.Module):
    """uint8 NHWC images -> noised initial latents: diffusers' preprocessing, VAE encoding and sampling
    (mean + std * sample_noise; AutoencoderTiny encodes deterministically and takes no sample noise), the scaling
    factor, then add_noise at the first timestep with `coeffs` = that step's plan row (sqrt(a_t), sqrt(1-a_t))."""

    def __init__(self, vae: nn.Module, precision: str, scaling_factor: float):
        super().__init__()
        self.deterministic = is_tiny_vae(vae)
        self.statistics = latent_statistics(vae)
        self.vae = to_precision(vae, precision)
        self.dtype = PRECISIONS[precision]
        self.scaling_factor = scaling_factor

    def encode(self, images: torch.Tensor, sample_noise: torch.Tensor | None) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).float() / 255.0
        return self.encode_pixels(2.0 * pixels - 1.0, sample_noise)

    def encode_pixels(self, pixels: torch.Tensor, sample_noise: torch.Tensor | None) -> torch.Tensor:
        """fp32 NCHW pixels in [-1, 1] -> scaled latents (mean + std * sample_noise, or TAESD's latents)."""
        pixels = pixels.to(self.dtype)
        if self.deterministic:
            latents = self.vae.encode(pixels).latents.float()
        else:
            dist = self.vae.encode(pixels).latent_dist
            latents = dist.mean.float() + dist.std.float() * sample_noise
        if self.statistics is None:
            return self.scaling_factor * latents
        mean, std = self.statistics
        return (latents - mean) * self.scaling_factor / std

    def forward(self, images: torch.Tensor, coeffs: torch.Tensor, noise: torch.Tensor,
                sample_noise: torch.Tensor | None = None) -> torch.Tensor:
        return coeffs[3] * self.encode(images, sample_noise) + coeffs[4] * noise
