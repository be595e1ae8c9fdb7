"""What one generation request asks for besides its prompts and seed: the settings `Pipeline.prepare` takes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import numpy as np

# settings given either once for all rows or once per row; a piece of a long run takes its rows' share
PER_ROW = ("images", "masks", "control_images", "adapter_images", "negative_prompts", "guidance_scale")


@dataclass(frozen=True)
class GenerationSettings:
    """`images` (uint8 [H, W, 3] at the bundle's size, one for all rows or one per row) turns a request into
    image-to-image with `strength` and `img2img_mode` (classic | lcm). SDXL-class bundles take diffusers'
    micro-conditioning: original_size and target_size default to (height, width). ControlNet bundles take
    `control_images` (uint8 [H, W, 3] at the bundle's size, one or one per row), the conditioning scale and
    diffusers' control_guidance_start/end; a bundle of N >= 2 ControlNets (MultiControlNet) takes one map per
    ControlNet in build order, shared by all rows, and each of scale, start and end once for all or once per
    ControlNet (diffusers' lists). T2I-Adapter bundles take `adapter_images` (uint8 [H, W, C] with the
    adapter's channels), adapter_conditioning_scale and _factor. `scheduler` picks the sampler (bundle.SAMPLERS)
    with its `eta` (tcd, ddim-trailing) and optional custom `timesteps` (diffusers' set_timesteps(timesteps=...)).
    None means the bundle's default."""

    steps: int | None = None
    guidance_scale: float | Sequence[float] | None = None
    original_inference_steps: int | None = None
    negative_prompts: Sequence[str] | None = None
    images: Sequence[np.ndarray] | None = None
    strength: float | None = None
    img2img_mode: str = "classic"
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    control_images: Sequence[np.ndarray] | None = None
    control_scale: float | Sequence[float] = 1.0
    control_start: float | Sequence[float] = 0.0
    control_end: float | Sequence[float] = 1.0
    adapter_images: Sequence[np.ndarray] | None = None
    adapter_scale: float = 1.0
    adapter_factor: float = 1.0
    masks: Sequence[np.ndarray] | None = None
    scheduler: str | None = None
    eta: float | None = None
    timesteps: tuple[int, ...] | None = None

    @property
    def resolved_strength(self) -> float:
        """strength, or its default: 1.0 for inpainting (diffusers' inpaint pipelines), 0.8 for image-to-image."""
        if self.strength is not None:
            return float(self.strength)
        return 1.0 if self.masks is not None else 0.8

    @classmethod
    def of(cls, settings: GenerationSettings | None = None, **given: Any) -> GenerationSettings:
        """`settings`, or one built from keyword arguments; an unknown name is a TypeError naming it."""
        if settings is not None and given:
            raise TypeError("pass either a GenerationSettings or keyword settings, not both")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"unknown generation setting {unknown[0]!r}")
        return settings if settings is not None else cls(**given)

    def piece(self, cut: slice, rows: int, shared: tuple[str, ...] = ()) -> GenerationSettings:
        """The settings of rows `cut` of a run of `rows`: per-row values are cut, the rest (and `shared`: a
        MultiControlNet's one map per ControlNet) kept."""
        return replace(self, **{name: getattr(self, name)[cut] for name in PER_ROW
                                if name not in shared and _is_per_row(getattr(self, name), rows)})


def _is_per_row(value: Any, rows: int) -> bool:
    """A setting given once per row (a list of that length), as opposed to one value for all rows."""
    return rows > 1 and isinstance(value, (list, tuple, np.ndarray)) and len(value) == rows
