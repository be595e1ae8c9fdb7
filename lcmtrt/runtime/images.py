"""Input images for image-to-image: read any file Pillow opens, as diffusers' load_image does, and fit it to the
bundle's size."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lcmtrt.errors import UserError

FITS = ("stretch", "crop")
MAX_PIXELS = 64_000_000  # larger inputs are refused before decoding (Pillow's own bomb limit is 89M, with a warning)


def load_image(path: str | Path, what: str = "input image") -> Image.Image:
    """RGB, EXIF orientation applied; grayscale, palette and alpha images converted like diffusers' load_image.
    `what` names the file in errors (input image, mask, control image)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise UserError(f"{what} {path} is {opened.width}x{opened.height}, more than the "
                                    f"{MAX_PIXELS // 1_000_000} megapixels lcmtrt reads; resize it first")
                opened.seek(0)  # animated images: the first frame, as diffusers' load_image
                image = ImageOps.exif_transpose(opened)
                image = image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{what} {path} has more pixels than lcmtrt decodes safely ({MAX_PIXELS // 1_000_000} "
                        "megapixels); resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise UserError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if image.width == 0 or image.height == 0:
        raise UserError(f"{what} {path} is empty ({image.width}x{image.height})")
    return image


def fit_image(image: Image.Image, width: int, height: int, fit: str = "stretch") -> np.ndarray:
    """uint8 [height, width, 3] ([height, width] for a grayscale image). `stretch` resizes like diffusers' default preprocessing (Lanczos); `crop` keeps the
    aspect ratio, covering the target and cutting the centre."""
    if fit not in FITS:
        raise UserError(f"--fit {fit!r}: choose one of {', '.join(FITS)}")
    if image.size != (width, height):
        if fit == "crop":
            scale = max(width / image.width, height / image.height)
            size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
            left, top = (size[0] - width) // 2, (size[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
        else:
            image = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def canny_map(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """The diffusers guide's canny control map: OpenCV Canny on the RGB photo, stacked to three channels."""
    try:
        import cv2
    except ImportError:
        raise UserError("--canny needs OpenCV: pip install 'lcmtrt[control]' (opencv-python-headless)") from None
    edges = cv2.Canny(np.asarray(image), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def compare_images(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How close uint8 images are to reference images of the same prompts and seeds: PSNR (dB), the largest
    difference in levels, and the share of pixel values within one level."""
    if ours.shape != reference.shape:
        raise ValueError(f"cannot compare images of shapes {ours.shape} and {reference.shape}")
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    mse = float(np.mean(diff**2))
    return {"psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
            "max_diff": int(diff.max()), "within_1_pct": float(100 * np.mean(diff <= 1))}
