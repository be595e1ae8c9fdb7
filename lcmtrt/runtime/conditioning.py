"""Synthetic conditioning for bundles that need a map: what warm-up and benchmarks feed a ControlNet or T2I-Adapter."""

from __future__ import annotations

from typing import Any

import numpy as np


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
