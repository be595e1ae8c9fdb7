"""The inpainting encoder graph: the source image's and the masked image's latents and the start latents, with
diffusers' inpaint pipelines' VAE sampling and first add_noise inside."""

from __future__ import annotations

import torch
from torch import nn

from lcmtrt.export.graphs import VaeEncodeStage


class InpaintEncodeStage(VaeEncodeStage):
    """uint8 NHWC images + binarized full-size mask -> start latents and the route's latents.

    `latents` = add_noise(image latents, init_noise, t0) where keep_image is 1 (strength < 1), else init_noise
    itself (diffusers' is_strength_max). "unet9" also encodes the masked image, `images * (mask < 0.5)` after
    normalisation, into `masked_image_latents`; "blend" returns the image latents as `image_latents`. Inputs by
    name: images, mask_image ("unet9"), coeffs (the plan's first row), keep_image [batch], init_noise, and for a
    sampling VAE image_sample_noise and masked_sample_noise ("unet9"). diffusers' inpaint pipelines scale encoded
    latents by the scaling factor only (no latents_mean/std), and so does this graph.
    """

    def __init__(self, vae: nn.Module, precision: str, scaling_factor: float, route: str):
        super().__init__(vae, precision, scaling_factor)
        self.statistics = None  # _encode_vae_image of the inpaint pipelines: scaling_factor * latents
        self.route = route
        sampled = [] if self.deterministic else ["image_sample_noise"]
        masked = ([] if self.deterministic else ["masked_sample_noise"]) if route == "unet9" else []
        self.input_names = ["images", *(["mask_image"] if route == "unet9" else []), "coeffs", "keep_image",
                            "init_noise", *sampled, *masked]
        self.output_names = ["latents", "masked_image_latents" if route == "unet9" else "image_latents"]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = dict(zip(self.input_names, tensors))
        pixels = 2.0 * (x["images"].permute(0, 3, 1, 2).float() / 255.0) - 1.0
        image_latents = self.encode_pixels(pixels, x.get("image_sample_noise"))
        coeffs, keep = x["coeffs"], x["keep_image"][:, None, None, None]
        start = coeffs[3] * image_latents + coeffs[4] * x["init_noise"]
        latents = keep * start + (1 - keep) * x["init_noise"]
        if self.route == "blend":
            return latents, image_latents
        masked = pixels * (x["mask_image"] < 0.5).float()  # diffusers: init_image * (mask_condition < 0.5)
        return latents, self.encode_pixels(masked, x.get("masked_sample_noise"))
