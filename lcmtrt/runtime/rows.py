"""Prepared rows: one request's engine inputs and noise, drawn before it runs, one entry per image on axis 0.

`Pipeline.prepare` turns a request into rows and `Pipeline.run` turns rows into images, so a server can cut a
request into pieces and join pieces of several requests into one engine batch without changing any row's numbers:
every random draw happens in `prepare`, per request, exactly as a solo `generate` of that request draws it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from lcmtrt.runtime.scheduler import StepPlan


@dataclass(frozen=True)
class BatchKey:
    """Rows run together only with the same key: the engines and the per-step coefficients they bind."""

    plan: StepPlan
    img2img: bool
    cfg: bool
    inpaint: bool = False  # inpainting rows: the inpaint encoder and the mask; never with other rows


@dataclass
class PreparedRows:
    key: BatchKey
    inputs: dict[str, np.ndarray]  # engine input name -> [rows, ...]; names in `doubled` are [rows, 2, ...]
    doubled: frozenset[str]  # CFG's [negative; positive] inputs: index 0 of axis 1 is the negative row
    firsts: list[np.ndarray]  # [rows, *latent] each: the initial latents, or the encoder's noises in draw order
    # (inpainting: noise.py's names in inpaint.draw_names order, a skipped draw all zeros)
    step_noise: np.ndarray  # [rows, steps, *latent]; the last step's is zeros
    sources: np.ndarray | None  # image-to-image and inpainting inputs, uint8 [rows, H, W, 3]
    factors: dict[str, np.ndarray]  # per-step factors (control_scale, adapter_keep), [rows, steps]

    def __len__(self) -> int:
        return len(self.step_noise)

    def take(self, start: int, stop: int) -> PreparedRows:
        """Rows [start, stop) as views (no copy)."""
        cut = slice(start, stop)
        return replace(self, inputs={k: v[cut] for k, v in self.inputs.items()},
                       firsts=[f[cut] for f in self.firsts], step_noise=self.step_noise[cut],
                       sources=None if self.sources is None else self.sources[cut],
                       factors={k: v[cut] for k, v in self.factors.items()})

    @staticmethod
    def join(parts: Sequence[PreparedRows]) -> PreparedRows:
        """Rows of several requests with the same key, in order."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        if any(p.key != first.key or p.inputs.keys() != first.inputs.keys() for p in parts):
            raise ValueError("only rows with the same plan, img2img mode, CFG and conditioning can share a batch")
        cat = lambda arrays: np.concatenate(list(arrays))
        return replace(first, inputs={k: cat(p.inputs[k] for p in parts) for k in first.inputs},
                       firsts=[cat(p.firsts[i] for p in parts) for i in range(len(first.firsts))],
                       step_noise=cat(p.step_noise for p in parts),
                       sources=None if first.sources is None else cat(p.sources for p in parts),
                       factors={k: cat(p.factors[k] for p in parts) for k in first.factors})
