"""POST /v1/images/edits' multipart body: one image, an optional OpenAI mask, and the request's fields, checked
before anything is queued. Decoding runs in a worker thread, never on the event loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args, get_origin

from fastapi import Request
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException

from lcmtrt.serve.api import ApiError, EditRequest, decode_image, openai_mask, validated


@dataclass
class Edit:
    """A parsed edit: its fields, its image and, for inpainting, lcmtrt's mask (white = repaint)."""

    request: EditRequest
    image: Image.Image
    mask: Image.Image | None


async def read_form(request: Request, max_body_mb: float) -> tuple[EditRequest, UploadFile, UploadFile | None]:
    """The validated fields and the file parts; a missing, repeated or non-file part is a 400 naming it."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(400, "send image edits as multipart/form-data with an `image` file part",
                       code="invalid_content_type")
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=int(max_body_mb * 2**20))
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart body: {e.message}", code="invalid_multipart") from None
    uploads = [v for k in ("image", "image[]") for v in form.getlist(k)]
    if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
        raise ApiError(400, f"send exactly one image file part (got {len(uploads)})", param="image",
                       code="missing_value" if not uploads else "invalid_value")
    masks = form.getlist("mask")
    if len(masks) > 1 or (masks and not isinstance(masks[0], UploadFile)):
        raise ApiError(400, "send at most one mask, as a file part (a PNG whose transparent pixels are repainted)",
                       param="mask", code="invalid_value")
    return validated(EditRequest, form_fields(form), strict=False), uploads[0], masks[0] if masks else None


def _list_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields a JSON body gives as a list (timesteps): `list[...]` or `list[...] | None`."""
    def is_list(annotation: Any) -> bool:
        return get_origin(annotation) is list or any(is_list(arg) for arg in get_args(annotation))
    return frozenset(name for name, info in model.model_fields.items() if is_list(info.annotation))


FORM_LISTS = _list_fields(EditRequest)


def form_fields(form: FormData) -> dict[str, Any]:
    """The text fields as the JSON body would give them: a list field (timesteps) from comma-separated values,
    repeated fields, or both (`-F timesteps=999,499` or `-F timesteps=999 -F timesteps=499`); any other field
    keeps its one value (the last, if repeated)."""
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if not isinstance(value, str):
            continue
        if name in FORM_LISTS:
            fields.setdefault(name, []).extend(part.strip() for part in value.split(","))
        else:
            fields[name] = value
    return fields


def decode(image_data: bytes, mask_data: bytes | None) -> tuple[Image.Image, Image.Image | None]:
    """The image (RGB) and the mask as `infer --mask` would read it; both refused in one line when unusable."""
    image = decode_image(image_data, "image")
    return image, None if mask_data is None else openai_mask(mask_data, image)


async def read_edit(fields: EditRequest, image: UploadFile, mask: UploadFile | None) -> Edit:
    """Decode the parts in a worker thread: up to 16.7 megapixels each, never on the event loop."""
    image_data = await image.read()
    mask_data = None if mask is None else await mask.read()
    decoded, lcmtrt_mask = await run_in_threadpool(decode, image_data, mask_data)
    return Edit(fields, decoded, lcmtrt_mask)
