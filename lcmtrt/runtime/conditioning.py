"""Conditioning inputs: a request's ControlNet and T2I-Adapter inputs and per-step factors, and the synthetic map
warm-up and benchmarks feed a bundle that needs one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lcmtrt.bundle import Bundle
from lcmtrt.errors import UserError
from lcmtrt.runtime.scheduler import StepPlan


def condition_images(bundle: Any) -> dict[str, list[np.ndarray]]:
    """A ControlNet or T2I-Adapter bundle is timed with a synthetic condition map (a centred square's edges)."""
    engines = bundle.engines
    if not bundle.control_nets and "adapter" not in engines:
        return {}
    channels = engines["adapter"].inputs[0].shape[-1] if "adapter" in engines else 3
    edges = np.zeros((bundle.height, bundle.width, channels), np.uint8)
    top, left, bottom, right = bundle.height // 4, bundle.width // 4, 3 * bundle.height // 4, 3 * bundle.width // 4
    edges[[top, bottom], left:right] = edges[top:bottom, [left, right]] = 255
    # a MultiControlNet takes one map per ControlNet: the same edges for each
    return {"adapter_images" if "adapter" in engines else "control_images": [edges] * max(1, bundle.control_nets)}


def inpaint_images(bundle: Any) -> dict[str, list[np.ndarray]]:
    """A 9-channel inpainting bundle only inpaints: warm-up and benchmarks give it a blank image and a mask
    repainting everything. A blend bundle (a 4-channel UNet) also runs text-to-image, and is timed doing that."""
    if bundle.inpaint != "unet9":
        return {}
    size = (bundle.height, bundle.width)
    return {"images": [np.zeros((*size, 3), np.uint8)], "masks": [np.full(size, 255, np.uint8)]}


def bench_inputs(bundle: Any) -> dict[str, list[np.ndarray]]:
    """Everything a timed request on `bundle` needs beside the prompt: condition maps, inpainting's image and mask."""
    return {**condition_images(bundle), **inpaint_images(bundle)}


def workload(bundle: Any) -> str:
    """What bench times on `bundle`, for its report."""
    return "inpainting (blank image, full mask)" if inpaint_images(bundle) else "text-to-image"


def control_inputs(bundle: Bundle, images: Sequence[np.ndarray] | None, rows: int, plan: StepPlan,
                   scale: float | Sequence[float], start: float | Sequence[float],
                   end: float | Sequence[float]) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """The control image inputs for every row and each step's ControlNet scale ([steps], or [steps, N] for N
    ControlNets), or None without a ControlNet."""
    nets = bundle.control_nets
    missing = (f"this bundle has {nets} ControlNets: give one control image per ControlNet (--control-image, in "
               "build order)") if nets > 1 else None
    if not _conditioned(nets > 0, images, bundle.root, "ControlNet", "--controlnet", missing):
        return None
    scales, starts, ends = (_per_net(value, nets, what) for value, what in
                            ((scale, "control scales"), (start, "control starts"), (end, "control ends")))
    for first, last in zip(starts, ends):
        if not 0.0 <= first < last <= 1.0:
            raise UserError(f"--control-start {first} and --control-end {last} must satisfy "
                            "0 <= start < end <= 1")
    steps = plan.steps
    # diffusers' controlnet_keep, per ControlNet: a step is controlled unless it lies outside [start, end]
    keep = [[scale * (1.0 - float(i / steps < first or (i + 1) / steps > last))
             for scale, first, last in zip(scales, starts, ends)] for i in range(steps)]
    if nets == 1:
        return {"control_image": per_row(images, rows, "control images")}, np.asarray(keep, np.float32)[:, 0]
    if len(images) != nets:
        raise UserError(f"this bundle has {nets} ControlNets: give {nets} control images (one per ControlNet, in "
                        f"build order, shared by all images), not {len(images)}")
    maps = {f"control_image_{k}": np.stack([image] * rows) for k, image in enumerate(images)}
    return maps, np.asarray(keep, np.float32)


def adapter_inputs(bundle: Bundle, images: Sequence[np.ndarray] | None, rows: int, plan: StepPlan, scale: float,
                   factor: float) -> tuple[np.ndarray, list[float]] | None:
    """The adapter images for every row and each step's keep factor, or None without a T2I-Adapter."""
    if not _conditioned("adapter" in bundle.engines, images, bundle.root, "T2I-Adapter", "--adapter"):
        return None
    if not 0.0 <= factor <= 1.0:
        raise UserError(f"--adapter-factor {factor} must be in [0, 1]")
    kept = int(plan.steps * factor)  # diffusers: the adapter conditions steps i < int(N * factor)
    keep = [1.0 if i < kept else 0.0 for i in range(plan.steps)]
    return per_row(images, rows, "adapter images"), keep


def per_row(images: Sequence[np.ndarray], rows: int, what: str) -> np.ndarray:
    """One image for all rows, or one per row, as a [rows, ...] array."""
    if len(images) not in (1, rows):
        raise UserError(f"{len(images)} {what} for {rows} prompts; give one or one per prompt")
    return np.stack([images[0]] * rows if len(images) == 1 else list(images))


def _per_net(value: float | Sequence[float], nets: int, what: str) -> list[float]:
    """A ControlNet setting once for all ControlNets or once per ControlNet, as one float per ControlNet."""
    values = [float(value)] if isinstance(value, (int, float, np.floating, np.integer)) else [float(v) for v in value]
    if len(values) not in (1, nets):
        raise UserError(f"{len(values)} {what} for {nets} ControlNet{'s' if nets > 1 else ''}; give one"
                        f"{' or one per ControlNet' if nets > 1 else ''}")
    return values * nets if len(values) == 1 else values


def _conditioned(built: bool, images: Sequence[np.ndarray] | None, root: Path, what: str, flag: str,
                 missing: str | None = None) -> bool:
    """Whether a conditioning the bundle may have (ControlNet, T2I-Adapter) is used; images must match the build.
    `missing` is the error when the bundle needs images and none came (default: give its one control image)."""
    if not built:
        if images is not None:
            raise UserError(f"bundle {root} was built without {what}; build one with {flag}")
        return False
    if images is None:
        raise UserError(missing or f"this bundle has a {what}: give its control image (--control-image)")
    return True
