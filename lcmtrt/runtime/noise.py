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
        self.use_torch = use_torch
        if use_torch:
            import torch

            self.generator = torch.Generator().manual_seed(seed)
        else:
            self.generator = np.random.Generator(np.random.PCG64(seed))

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        if self.use_torch:
            import torch

            return torch.randn(shape, generator=self.generator, dtype=torch.float32).numpy()
        return self.generator.standard_normal(shape, dtype=np.float32)

    def copy(self) -> _Source:
        """An independent source at this one's position."""
        clone = object.__new__(_Source)
        clone.use_torch = self.use_torch
        if self.use_torch:
            import torch

            clone.generator = torch.Generator()
            clone.generator.set_state(self.generator.get_state())
        else:
            clone.generator = np.random.Generator(np.random.PCG64())
            clone.generator.bit_generator.state = self.generator.bit_generator.state
        return clone

    def skip(self, rows: int, row_shape: tuple[int, ...], block: int) -> None:
        """Advance past `rows` rows as if drawn, `block` rows at a time (memory bounded by the block)."""
        for start in range(0, rows, block):
            self.randn((min(block, rows - start), *row_shape))


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


class NoiseStream:
    """draw() for `rows` rows, handed out in consecutive pieces: the same numbers, with memory bounded by a piece.

    One seed is one generator whose draws run phase by phase (leading tensors, then each step) over all rows, so each
    phase gets its own copy of the generator, advanced once past the earlier phases. That is exact when a piece's
    rows are a multiple of 16 values: torch fills normals in blocks of 16 (numpy draws value by value). A list of
    seeds is one generator per row, which pieces split trivially.
    """

    SKIP_BLOCK = 64  # rows drawn and dropped at a time while positioning the phases

    def __init__(self, seeds: int | list[int], rows: int, use_torch: bool, shared_first: bool = False):
        self.seeds, self.rows, self.use_torch = seeds, rows, use_torch
        self.shared_first = shared_first  # image-to-image from one shared image: its VAE sample is drawn once
        self.cursor = 0
        self._phases: list[_Source] | None = None
        self._shared: list[np.ndarray | None] = []

    def exact_for(self, latent_shape: tuple[int, ...]) -> bool:
        return isinstance(self.seeds, list) or not self.use_torch or int(np.prod(latent_shape)) % 16 == 0

    def take(self, count: int, latent_shape: tuple[int, ...], leading: tuple[int, ...],
             steps: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The next `count` rows of draw(seeds, rows, latent_shape, leading, steps): `leading` counts are for the
        whole stream (1 for a shared image's single draw, else all rows)."""
        if self.cursor + count > self.rows:
            raise ValueError(f"{self.cursor + count} rows taken from a stream of {self.rows}")
        start, self.cursor = self.cursor, self.cursor + count
        if isinstance(self.seeds, list):
            return draw(self.seeds[start:start + count], count, latent_shape, (count,) * len(leading), steps,
                        self.use_torch)
        if self._phases is None:
            self._position(latent_shape, leading, steps)
        firsts = []
        for k, total in enumerate(leading):
            if total == 1 and self.rows > 1:  # one shared draw, broadcast to every row
                firsts.append(np.broadcast_to(self._shared[k], (count, *latent_shape)).copy())
            else:
                firsts.append(self._phases[k].randn((count, *latent_shape)))
        noise = np.zeros((steps, count, *latent_shape), np.float32)
        for step in range(steps - 1):
            noise[step] = self._phases[len(leading) + step].randn((count, *latent_shape))
        return firsts, noise

    def _position(self, latent_shape: tuple[int, ...], leading: tuple[int, ...], steps: int) -> None:
        source = _Source(self.seeds, self.use_torch)
        self._phases, self._shared = [], []
        for total in list(leading) + [self.rows] * (steps - 1):
            self._phases.append(source.copy())
            if total == 1 and self.rows > 1:
                self._shared.append(source.randn((1, *latent_shape))[0])
            else:
                self._shared.append(None)
                source.skip(total, latent_shape, self.SKIP_BLOCK)
