"""Inpainting inputs: masks made as diffusers' mask processor makes them, the draws each route makes in diffusers'
order, and the inputs its engines take.

A mask is white where the image is repainted. diffusers' VaeImageProcessor(do_binarize, do_convert_grayscale)
resizes the mask (Lanczos, like the image), converts it to grayscale, divides by 255 and binarises at 0.5; the
UNet's mask is that mask resized to the latents with nearest interpolation, which at the integer VAE factor is
every factor-th pixel. Routes: "unet9" (a 9-channel inpainting UNet takes mask and masked image latents) and
"blend" (a 4-channel UNet; after each step the source latents, noised to the next timestep, replace the latents
outside the mask).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np

from lcmtrt.bundle import Bundle
from lcmtrt.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

# the inpaint pipelines' generator draws before the steps, in order: the source image's VAE sample, the start
# noise, the masked image's VAE sample (a deterministic VAE, TAESD, draws only the noise)
SAMPLED_DRAWS = ("image_sample_noise", "init_noise", "masked_sample_noise")


def draw_names(bundle: Bundle) -> tuple[str, ...]:
    """The leading draws of an inpainting request on this bundle, named as the encoder inputs they fill."""
    encoder = bundle.engines["inpaint_encode"].input_names
    return SAMPLED_DRAWS if "image_sample_noise" in encoder else ("init_noise",)


def skipped_draws(route: str, strength: float) -> frozenset[str]:
    """At strength 1 the start latents are the noise itself: a 9-channel UNet's pipeline then never encodes the
    image (no draw); the blend route always encodes it, for the blending."""
    return frozenset({"image_sample_noise"}) if route == "unet9" and strength == 1.0 else frozenset()


def binarize(masks: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """float32 [n, 1, H, W] of 0 and 1 from uint8 grayscale masks [H, W] (or [H, W, 1]) at the bundle's size:
    diffusers' value / 255 >= 0.5. One line for a mask of another size, an empty one or a full one on blend."""
    out = np.empty((len(masks), 1, height, width), np.float32)
    for index, mask in enumerate(masks):
        array = np.asarray(mask)
        array = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
        if array.shape != (height, width):
            raise UserError(f"mask {index} is {'x'.join(map(str, np.shape(mask)))}; masks must be grayscale "
                            f"{height}x{width} (the bundle's size, as the image)")
        if array.dtype != np.uint8:
            raise UserError(f"mask {index} holds {array.dtype} values; masks are uint8 grayscale (white = repaint)")
        out[index, 0] = (array.astype(np.float32) / np.float32(255.0) >= 0.5).astype(np.float32)
        if not out[index].any():
            raise UserError(f"mask {index} is all black: nothing to repaint (white marks what is repainted)")
    return out


def latent_mask(masks: np.ndarray, factor: int) -> np.ndarray:
    """torch's nearest interpolation to the latent size at an integer factor: pixel (factor*i, factor*j)."""
    return np.ascontiguousarray(masks[:, :, ::factor, ::factor])


def warn_full_masks(masks: np.ndarray, route: str) -> None:
    """An all-white mask on the blend route keeps nothing of the source: as diffusers, an image-to-image-like run."""
    if route == "blend" and any(bool(m.all()) for m in masks):
        log.warning("warning: a mask is all white: nothing of the source image is kept outside it (diffusers "
                    "runs the same)")


def fit_mask(image: "Image.Image", width: int, height: int, fit: str = "stretch") -> np.ndarray:
    """uint8 [H, W] from a mask read like an input image (images.load_image: RGB), fitted to the bundle's size
    like the image (Lanczos on RGB: diffusers' mask processor resizes before converting), then grayscale."""
    from PIL import Image

    from lcmtrt.runtime.images import fit_image

    rgb = fit_image(image, width, height, fit)
    return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)


def neutral_inputs(bundle: Bundle, rows: int) -> dict[str, np.ndarray]:
    """What a blend bundle's denoise takes for rows without inpainting: mask 1 everywhere, which keeps the step's
    latents exactly ((1 - 1) x finite + 1 x latents), and finite zeros for the rest."""
    latent = (rows, *bundle.latent_shape)
    return {"mask": np.ones((rows, 1, *bundle.latent_shape[1:]), np.float32),
            "image_latents": np.zeros(latent, np.float32), "init_noise": np.zeros(latent, np.float32)}
