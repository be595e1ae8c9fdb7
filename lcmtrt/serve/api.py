"""The OpenAI Images API surface of `lcmtrt serve`: request models, OpenAI-shaped errors, input images and the
mapping of a request onto `Pipeline.prepare` exactly as `lcmtrt infer` calls it for the same settings."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError

from lcmtrt import limits
from lcmtrt.bundle import SAMPLERS, Bundle
from lcmtrt.errors import UserError
from lcmtrt.runtime.images import fit_image
from lcmtrt.runtime.inpaint import fit_mask
from lcmtrt.runtime.settings import GenerationSettings

MAX_PROMPT_CHARS = 32000  # OpenAI's gpt-image-1 limit; CLIP reads the first 77 tokens anyway
MAX_INPUT_PIXELS = 4096 * 4096  # larger input images are refused before decoding (decompression bombs)
MAX_SEED = 2**63 - 1
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


Finite = dict(allow_inf_nan=False)
MAX_CONTROLNETS = 16  # control_image / control_scale / start / end lists: one entry per ControlNet of a bundle


def per_net(name: str) -> Any:
    """A field given once, or as a list with one entry per ControlNet of a MultiControlNet bundle: control_image
    (base64 strings) or a number checked against limits.LIMITS[name]. One validator, so a wrong value gets one
    plain message rather than one per branch of a union."""

    def check(value: Any) -> Any:
        if value is None and name == "control_image":  # as omitted
            return None
        values = value if isinstance(value, list) else [value]
        if not 1 <= len(values) <= MAX_CONTROLNETS:
            raise ValueError(f"give one value or a list of 1 to {MAX_CONTROLNETS} (one per ControlNet)")
        if name == "control_image":
            if not all(isinstance(v, str) for v in values):
                raise ValueError("give a base64 image, or a list of them (one per ControlNet)")
            return value
        try:
            numbers = [limits.checked_values({name: v})[name] for v in values]
        except UserError as e:
            raise ValueError(str(e)) from None
        return numbers if isinstance(value, list) else numbers[0]

    return Annotated[Any, PlainValidator(check)]


class GenerationRequest(BaseModel):
    """POST /v1/images/generations; lcmtrt's own fields come through the openai client's `extra_body`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = Field(None, max_length=256)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100, **Finite)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    original_inference_steps: int | None = Field(None, ge=1, le=1000)
    # the sampler, per request on the same model (bundle.SAMPLERS; default: the model's preset's)
    scheduler: Literal["lcm", "tcd", "euler-trailing", "ddim-trailing"] | None = None
    eta: float | None = Field(None, ge=0, le=1, **Finite)
    timesteps: list[int] | None = Field(None, min_length=1, max_length=1000)
    # base64; a MultiControlNet model takes one map per ControlNet in build order, and each number once or per net
    control_image: per_net("control_image") = None
    control_scale: per_net("control_scale") = 1.0
    control_start: per_net("control_start") = 0.0
    control_end: per_net("control_end") = 1.0
    adapter_scale: float = Field(1.0, ge=0, le=10, **Finite)
    adapter_factor: float = Field(1.0, ge=0, le=1, **Finite)


class EditRequest(GenerationRequest):
    """POST /v1/images/edits (multipart): image-to-image, or inpainting with a mask; the image and the mask arrive
    as file parts."""

    strength: float | None = Field(None, gt=0, le=1, **Finite)  # None: 0.8, or 1.0 with a mask (as infer)
    img2img_mode: Literal["classic", "lcm"] = "classic"


def validated(model: type[BaseModel], data: Any, strict: bool) -> Any:
    """The request model, or a 400 naming the first bad field (never FastAPI's 422)."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        given = "" if first["type"] == "missing" else f" (got {_short(first.get('input'))})"
        message = ("unknown field; remove it" if first["type"] == "extra_forbidden" else first["msg"])
        raise ApiError(400, f"{param}: {message}{given}", param=param, code="invalid_value") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def decode_image(data: bytes, param: str, alpha: bool = False) -> Image.Image:
    """RGB, EXIF orientation applied, as infer's load_image; sizes over MAX_INPUT_PIXELS refused before decoding.
    With `alpha`: RGBA, and an image without an alpha channel (OpenAI's masks need one) is refused."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_INPUT_PIXELS:
                raise ApiError(400, f"{param} is {opened.width}x{opened.height}; send at most {MAX_INPUT_PIXELS} "
                                    "pixels", param=param, code="image_too_large")
            if alpha and not opened.has_transparency_data:
                raise ApiError(400, f"{param} has no alpha channel ({opened.mode}): send a PNG whose fully "
                                    "transparent pixels (alpha 0) mark the area to repaint, as OpenAI's edits",
                               param=param, code="invalid_image")
            image = ImageOps.exif_transpose(opened).convert("RGBA" if alpha else "RGB")
    except ApiError:
        raise
    except UnidentifiedImageError:  # Pillow's message names the in-memory file object (a BytesIO repr): say why
        raise ApiError(400, f"{param} is not a readable image (PNG, JPEG, WebP, ...): no image format recognises "
                            "its bytes", param=param, code="invalid_image") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ApiError(400, f"{param} is not a readable image (PNG, JPEG, WebP, ...): "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", param=param,
                       code="invalid_image") from None
    if image.width == 0 or image.height == 0:
        raise ApiError(400, f"{param} is empty", param=param, code="invalid_image")
    return image


def decode_base64_image(text: str, param: str) -> Image.Image:
    if text.startswith("data:") and "," in text:  # a data URL
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} must be a base64-encoded image", param=param, code="invalid_image") from None
    return decode_image(data, param)


@dataclass(frozen=True)
class ModelCard:
    """What a request is checked against: the loaded bundle's facts."""

    name: str
    bundle: Bundle

    @property
    def size(self) -> str:
        return f"{self.bundle.width}x{self.bundle.height}"

    @property
    def conditioning(self) -> str | None:
        engines = self.bundle.engines
        if "adapter" in engines:
            return "T2I-Adapter"
        return "ControlNet" if self.bundle.control_nets else None

    def describe(self) -> dict[str, Any]:
        b = self.bundle
        return {"id": self.name, "object": "model", "created": int(b.root.stat().st_mtime), "owned_by": "lcmtrt",
                "family": b.family, "size": self.size, "batch_sizes": list(b.batch_sizes), "backend": b.backend,
                "precision": b.precision, "default_steps": b.default_steps, "scheduler": b.sampler.scheduler,
                "schedulers": list(SAMPLERS) if b.general else ["lcm"],
                "default_guidance_scale": b.default_guidance_scale, "guidance_mode": b.guidance_mode,
                "conditioning": self.conditioning, "controlnets": b.control_nets, "img2img": "vae_encode" in b.engines,
                "inpaint": b.inpaint}


def prepare_arguments(card: ModelCard, request: GenerationRequest, seed: int, max_n: int,
                      image: Image.Image | None = None, mask: Image.Image | None = None) -> dict[str, Any]:
    """Keyword arguments of Pipeline.prepare for this request, checked against the model: what infer would pass."""
    b = card.bundle
    if request.response_format == "url":
        raise ApiError(400, "response_format 'url' is not supported (lcmtrt keeps no file store); use 'b64_json'",
                       param="response_format", code="unsupported_value")
    if request.n > max_n:
        raise ApiError(400, f"n: at most {max_n} images per request (got {request.n})", param="n",
                       code="invalid_value")
    if request.size not in (None, "auto", card.size):
        raise ApiError(400, f"size {request.size!r} is not built for model {card.name}; it has {card.size}",
                       param="size", code="unsupported_value")
    steps = request.num_inference_steps  # None: the model's default (its steps, or its preset's timesteps)
    original = request.original_inference_steps or b.scheduler.original_inference_steps
    lcm = (request.scheduler or b.sampler.scheduler) == "lcm" and request.timesteps is None
    if lcm and (steps or b.default_steps) > original:
        raise ApiError(400, f"num_inference_steps {steps or b.default_steps} is more than original_inference_steps "
                            f"{original}; use at "
                            f"most {original}", param="num_inference_steps", code="invalid_value")
    start, end = request.control_start, request.control_end
    if isinstance(start, float) and isinstance(end, float) and not start < end:  # lists: per ControlNet, below
        raise ApiError(400, f"control_start {start} must be below control_end {end}", param="control_start",
                       code="invalid_value")
    settings: dict[str, Any] = dict(
        steps=steps, guidance_scale=request.guidance_scale, original_inference_steps=request.original_inference_steps,
        negative_prompts=[request.negative_prompt] if request.negative_prompt else None,
        scheduler=request.scheduler, eta=request.eta,
        timesteps=None if request.timesteps is None else tuple(request.timesteps))
    if mask is not None:
        settings.update(inpaint_settings(card, request, image, mask))
    elif b.inpaint == "unet9":  # diffusers' text-to-image and image-to-image pipelines cannot run it either
        raise ApiError(400, f"model {card.name} holds a 9-channel inpainting UNet, which only inpaints: send an image "
                            "and a mask to /v1/images/edits", param="mask" if image is not None else None,
                       code="unsupported_value")
    elif image is not None:
        if "vae_encode" not in b.engines:
            raise ApiError(400, f"model {card.name} was built without image-to-image (img2img = true)",
                           param="image", code="unsupported_value")
        settings.update(images=[fit_image(image, b.width, b.height)], strength=request.strength,
                        img2img_mode=request.img2img_mode)
    settings.update(_conditioning(card, request))
    return dict(prompts=[request.prompt] * request.n, seed=seed, settings=GenerationSettings(**settings))


def openai_mask(data: bytes, image: Image.Image) -> Image.Image:
    """OpenAI's mask (fully transparent pixels are edited) as lcmtrt's: RGB, white (repaint) where alpha is 0 and
    black elsewhere, the image `infer --mask` reads for the same edit. Same size as the image, or a 400 naming both."""
    rgba = decode_image(data, "mask", alpha=True)
    if rgba.size != image.size:
        raise ApiError(400, f"mask is {rgba.width}x{rgba.height} but image is {image.width}x{image.height}; send a "
                            "mask of the image's size", param="mask", code="invalid_value")
    repaint = np.asarray(rgba.getchannel("A")) == 0
    if not repaint.any():
        raise ApiError(400, "mask has no fully transparent pixel (alpha 0): nothing to repaint (the API edits where "
                            "the mask is transparent; `infer --mask` repaints where it is white)", param="mask",
                       code="invalid_value")
    return Image.fromarray(np.where(repaint, np.uint8(255), np.uint8(0))).convert("RGB")


def inpaint_settings(card: ModelCard, request: EditRequest, image: Image.Image, mask: Image.Image) -> dict[str, Any]:
    """Image and mask fitted to the bundle's size as infer fits them (the mask like the image, then grayscale)."""
    b = card.bundle
    if b.inpaint is None:
        raise ApiError(400, f"model {card.name} was built without inpainting; rebuild it with `lcmtrt build-engines "
                            "--inpaint` (or from a 9-channel inpainting model) to send a mask", param="mask",
                       code="unsupported_value")
    if request.img2img_mode != "classic":
        raise ApiError(400, "inpainting drops the first steps by strength as diffusers' inpaint pipelines do; "
                            "img2img_mode 'lcm' does not apply to a mask", param="img2img_mode", code="invalid_value")
    fitted = fit_mask(mask, b.width, b.height)
    if not (fitted >= 128).any():  # diffusers binarises at 0.5: a sliver lost in resizing repaints nothing
        raise ApiError(400, f"the mask's transparent area vanishes when fitted to the model's {card.size}: nothing "
                            "to repaint; make it larger", param="mask", code="invalid_value")
    return dict(images=[fit_image(image, b.width, b.height)], masks=[fitted], strength=request.strength)


def _conditioning(card: ModelCard, request: GenerationRequest) -> dict[str, Any]:
    """The control map, fitted and converted as infer does for a ControlNet or a T2I-Adapter."""
    b, kind = card.bundle, card.conditioning
    if kind is None:
        if request.control_image is not None:
            raise ApiError(400, f"model {card.name} has no ControlNet or T2I-Adapter; remove control_image",
                           param="control_image", code="unsupported_value")
        return {}
    if request.control_image is None:
        raise ApiError(400, f"model {card.name} has a {kind}: send its control map as control_image (base64)",
                       param="control_image", code="missing_value")
    nets = max(1, b.control_nets)
    given = [request.control_image] if isinstance(request.control_image, str) else request.control_image
    if len(given) != nets:
        expected = f"a list of {nets} base64 maps, one per ControlNet in build order" if nets > 1 else "one base64 map"
        raise ApiError(400, f"model {card.name} takes {expected} as control_image (got {len(given)})",
                       param="control_image", code="invalid_value")
    per_net_values = {name: _per_net_value(card, request, name, nets)
                      for name in ("control_scale", "control_start", "control_end")}
    for first, last in zip(per_net_values["control_start"], per_net_values["control_end"]):
        if not first < last:
            raise ApiError(400, f"control_start {first} must be below control_end {last}", param="control_start",
                           code="invalid_value")
    controls = [decode_base64_image(text, "control_image") for text in given]
    size = (b.width, b.height)
    if kind == "ControlNet":
        return dict(control_images=[fit_image(control, *size) for control in controls], **per_net_values)
    control = controls[0]
    gray = b.engines["adapter"].inputs[0].shape[-1] == 1
    adapter_map = fit_image(control.convert("L"), *size)[..., None] if gray else fit_image(control, *size)
    return dict(adapter_images=[adapter_map], adapter_scale=request.adapter_scale,
                adapter_factor=request.adapter_factor)


def _per_net_value(card: ModelCard, request: GenerationRequest, name: str, nets: int) -> list[float]:
    """control_scale/_start/_end as one value per ControlNet: given once for all, or once per ControlNet."""
    value = getattr(request, name)
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) not in (1, nets):
        raise ApiError(400, f"model {card.name} has {nets} ControlNet{'s' if nets > 1 else ''}: give {name} once"
                            f"{f' or as a list of {nets}' if nets > 1 else ''} (got {len(values)})", param=name,
                       code="invalid_value")
    return values * nets if len(values) == 1 else values


def encode_images(images: np.ndarray, output_format: str, compression: int | None) -> list[str]:
    """Base64 of each image in the requested format (PNG is lossless: the pixels infer would save)."""
    encoded = []
    for array in images:
        buffer = io.BytesIO()
        options = {} if output_format == "png" or compression is None else {"quality": compression}
        Image.fromarray(array).save(buffer, format=OUTPUT_FORMATS[output_format], **options)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded
