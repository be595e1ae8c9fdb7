"""Host-side random draws in diffusers' order.

A generation draws some leading tensors (text-to-image: the initial latents; image-to-image: the VAE's sample noise
unless the VAE is deterministic, then the add_noise noise), then one draw per step except the last. With torch
importable, one seed reproduces diffusers' `generator=torch.manual_seed(seed)` exactly (one generator for the whole
batch) and a list of seeds reproduces diffusers' list of generators (one per row). Without torch, numpy's PCG64 is
used: deterministic per seed, but not diffusers' numbers.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np


def torch_available() -> bool:
    if os.environ.get("LCMTRT_NOISE") == "numpy":
        return False
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a blocked or half-installed torch counts as absent
        return False


def prepare(use_torch: bool) -> None:
    """Import torch now (about a second) so that the first request does not pay for it."""
    if use_torch:
        import torch  # noqa: F401


class _Source:
    def __init__(self, seed: int, use_torch: bool):
        if use_torch:
            import torch

            self.generator = torch.Generator().manual_seed(seed)
            self.randn = lambda shape: torch.randn(shape, generator=self.generator, dtype=torch.float32).numpy()
        else:
            generator = np.random.Generator(np.random.PCG64(seed))
            self.randn = lambda shape: generator.standard_normal(shape, dtype=np.float32)


def draw(seeds: int | list[int], rows: int, latent_shape: tuple[int, ...], leading: tuple[int, ...], steps: int,
         use_torch: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """`leading[k]` rows for each leading draw, broadcast to `rows` (diffusers encodes one shared input image once),
    then step noise [steps, rows, *latent_shape] whose last step is all zeros."""
    firsts = [np.empty((rows, *latent_shape), np.float32) for _ in leading]
    noise = np.zeros((steps, rows, *latent_shape), np.float32)
    if isinstance(seeds, int):
        source = _Source(seeds, use_torch)
        for first, count in zip(firsts, leading):
            first[:] = source.randn((count, *latent_shape))  # broadcasts a single shared row
        for step in range(steps - 1):
            noise[step] = source.randn((rows, *latent_shape))
        return firsts, noise
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} rows")
    for row, seed in enumerate(seeds):
        # diffusers draws one (1, ...) tensor per generator, in row order, for each draw; rows never interleave.
        source = _Source(seed, use_torch)
        for first in firsts:
            first[row] = source.randn((1, *latent_shape))[0]
        for step in range(steps - 1):
            noise[step, row] = source.randn((1, *latent_shape))[0]
    return firsts, noise
