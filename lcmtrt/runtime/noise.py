"""Host-side random draws in diffusers' order.

A generation draws some leading tensors, named as the engine inputs they fill (text-to-image: "latents", the initial
latents; image-to-image: "sample_noise", the VAE's sample noise, unless the VAE is deterministic, then "noise", the
add_noise noise), then one draw per step that draws noise (the step plan's noise_draws): every step but the last for
LCM (and TCD with eta > 0), every step for DDIM with eta > 0, none for Euler (s_churn 0) or eta 0. With torch
importable, one seed reproduces diffusers'
`generator=torch.manual_seed(seed)` exactly (one generator for the whole batch) and a list of seeds reproduces
diffusers' list of generators (one per row). Without torch, numpy's PCG64 is used: deterministic per seed, but not
diffusers' numbers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Collection, Sequence

import numpy as np

log = logging.getLogger(__name__)

# diffusers encodes one input image shared by all rows once (one VAE sample draw); every other draw has a row per image
DRAWN_ONCE_PER_SHARED_IMAGE = frozenset({"sample_noise", "image_sample_noise"})
# the inpaint pipelines' masked image (image x mask) is one image, encoded once, when both image and mask are shared
DRAWN_ONCE_PER_SHARED_MASK = frozenset({"masked_sample_noise"})
# the inpaint pipelines encode a shared image as one row: with a list of generators only the first one draws for it
# (image-to-image repeats the image to the batch first, so there every generator draws its "sample_noise")
FIRST_GENERATOR_ONLY = frozenset({"image_sample_noise", "masked_sample_noise"})


def drawn_once(names: Sequence[str], shared_image: bool, shared_mask: bool = False) -> frozenset[str]:
    """The leading draws made once for the whole run: a shared image's VAE samples (and the masked image's when the
    mask is shared too). A property of the draw and the inputs' sharing, never of how many rows a piece has."""
    if not shared_image:
        return frozenset()
    return frozenset(name for name in names if name in DRAWN_ONCE_PER_SHARED_IMAGE
                     or (shared_mask and name in DRAWN_ONCE_PER_SHARED_MASK))


def first_generator_only(names: Sequence[str], shared_image: bool, shared_mask: bool = False) -> frozenset[str]:
    """The draws made once that, with a list of generators, only the first generator draws (FIRST_GENERATOR_ONLY)."""
    return drawn_once(names, shared_image, shared_mask) & FIRST_GENERATOR_ONLY


def leading_rows(names: Sequence[str], rows: int, shared_image: bool, shared_mask: bool = False,
                 skipped: Collection[str] = ()) -> tuple[int, ...]:
    """How many rows each leading draw of a `rows`-image run has: one for a draw made once (drawn_once), none for a
    draw diffusers skips (`skipped`), else `rows`."""
    once = drawn_once(names, shared_image, shared_mask)
    return tuple(0 if name in skipped else 1 if name in once else rows for name in names)


def choose_source() -> str:
    """"torch" when torch imports (diffusers' numbers; importing it now spares the first request a second), else
    "numpy". A torch that is installed but does not import falls back to numpy with a warning."""
    if os.environ.get("LCMTRT_NOISE") == "numpy":
        return "numpy"
    try:
        if importlib.util.find_spec("torch") is None:
            return "numpy"
    except (ImportError, ValueError):  # a blocked or half-installed torch counts as absent
        return "numpy"
    try:
        import torch  # noqa: F401
    except Exception as e:  # a broken install raises anything (OSError for a missing CUDA library): never fatal here
        reason = str(e).splitlines()[0] if str(e) else ""
        log.warning("warning: torch is installed but does not import (%s: %s): noise is drawn with numpy, so seeds "
                    "do not reproduce diffusers' images", type(e).__name__, reason)
        return "numpy"
    return "torch"


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
         use_torch: bool, names: Sequence[str] = (), lead_seed: int | None = None,
         draws: int | None = None, first_only: Collection[str] = ()) -> tuple[list[np.ndarray], np.ndarray]:
    """`leading[k]` rows for each leading draw (leading_rows: 1 for a shared image's VAE sample, 0 for a skipped
    draw, whose rows are zeros), broadcast to `rows`, then step noise [steps, rows, *latent_shape] drawn for the
    first `draws` steps (default: all but the last), zeros after. With a list of seeds, a draw named in `first_only`
    (first_generator_only) is the first generator's, shared by every row: the run's first seed, `lead_seed` when
    these rows are a later piece of the run."""
    firsts = [np.zeros((rows, *latent_shape), np.float32) for _ in leading]
    noise = np.zeros((steps, rows, *latent_shape), np.float32)
    draws = steps - 1 if draws is None else draws
    if isinstance(seeds, int):
        source = _Source(seeds, use_torch)
        for first, count in zip(firsts, leading):
            if count:
                first[:] = source.randn((count, *latent_shape))  # broadcasts a single shared row
        for step in range(draws):
            noise[step] = source.randn((rows, *latent_shape))
        return firsts, noise
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} rows")
    names = tuple(names) or ("",) * len(leading)
    # explicit, never inferred from a count of 1: a one-row piece of per-row draws also has one row
    lead_only = [count > 0 and name in first_only for count, name in zip(leading, names)]
    shared = _lead_draws(seeds[0] if lead_seed is None else lead_seed, latent_shape, leading, lead_only, use_torch)
    for row, seed in enumerate(seeds):
        # diffusers draws one (1, ...) tensor per generator, in row order, for each draw; rows never interleave.
        source = _Source(seed, use_torch)
        is_lead = lead_seed is None and row == 0
        for k, (first, count) in enumerate(zip(firsts, leading)):
            if count == 0 or (lead_only[k] and not is_lead):
                first[row] = shared.get(k, 0.0)
            else:
                first[row] = source.randn((1, *latent_shape))[0]
        for step in range(draws):
            noise[step, row] = source.randn((1, *latent_shape))[0]
    return firsts, noise


def _lead_draws(seed: int, latent_shape: tuple[int, ...], leading: tuple[int, ...], lead_only: list[bool],
                use_torch: bool) -> dict[int, np.ndarray]:
    """The first generator's draws that every row shares (lead_only), by leading index."""
    if not any(lead_only):
        return {}
    source, shared = _Source(seed, use_torch), {}
    for k, count in enumerate(leading):
        if count:
            value = source.randn((1, *latent_shape))[0]
            if lead_only[k]:
                shared[k] = value
    return shared


class NoiseStream:
    """draw() for `rows` rows, handed out in consecutive pieces: the same numbers, with memory bounded by a piece.

    One seed is one generator whose draws run phase by phase (leading tensors, then each step) over all rows, so each
    phase gets its own copy of the generator, advanced once past the earlier phases. That is exact when a piece's
    rows are a multiple of 16 values: torch fills normals in blocks of 16 (numpy draws value by value). A list of
    seeds is one generator per row, which pieces split trivially. `shared_image`: every row is made from one input
    image, whose VAE sample diffusers draws once for the whole run.
    """

    SKIP_BLOCK = 64  # rows drawn and dropped at a time while positioning the phases

    def __init__(self, seeds: int | list[int], rows: int, use_torch: bool, shared_image: bool = False,
                 shared_mask: bool = False, skipped: Collection[str] = ()):
        self.seeds, self.rows, self.use_torch, self.shared_image = seeds, rows, use_torch, shared_image
        self.shared_mask, self.skipped = shared_mask, frozenset(skipped)
        self.cursor = 0
        self._names: tuple[str, ...] | None = None  # the leading draws the phases were positioned for
        self._phases: list[_Source] = []
        self._shared: list[np.ndarray | None] = []  # per phase: the one row of a draw made once for all rows

    def exact_for(self, latent_shape: tuple[int, ...]) -> bool:
        return isinstance(self.seeds, list) or not self.use_torch or int(np.prod(latent_shape)) % 16 == 0

    def take(self, count: int, latent_shape: tuple[int, ...], names: Sequence[str],
             steps: int, draws: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """The next `count` rows of draw(seeds, rows, latent_shape, leading_rows(names, rows, shared_image), steps):
        every piece names the same leading draws, whatever its own row count."""
        names, draws = tuple(names), steps - 1 if draws is None else draws
        if self.cursor + count > self.rows:
            raise ValueError(f"{self.cursor + count} rows taken from a stream of {self.rows}")
        if self._names is not None and names != self._names:
            raise ValueError(f"leading draws {names} taken from a stream positioned for {self._names}")
        start, self.cursor = self.cursor, self.cursor + count
        if isinstance(self.seeds, list):
            leading = leading_rows(names, self.rows, self.shared_image, self.shared_mask, self.skipped)
            leading = tuple(min(c, count) for c in leading)  # a piece's share: its rows, one shared row, or none
            return draw(self.seeds[start:start + count], count, latent_shape, leading, steps, self.use_torch,
                        names, None if start == 0 else self.seeds[0], draws,
                        first_generator_only(names, self.shared_image, self.shared_mask))
        if self._names is None:
            self._position(latent_shape, names, draws)
        firsts = []
        for phase, shared in zip(self._phases, self._shared[:len(names)]):
            if shared is not None:
                firsts.append(np.broadcast_to(shared, (count, *latent_shape)).copy())
            else:
                firsts.append(phase.randn((count, *latent_shape)))
        noise = np.zeros((steps, count, *latent_shape), np.float32)
        for step in range(draws):
            noise[step] = self._phases[len(names) + step].randn((count, *latent_shape))
        return firsts, noise

    def _position(self, latent_shape: tuple[int, ...], names: tuple[str, ...], draws: int) -> None:
        source = _Source(self.seeds, self.use_torch)
        self._names = names
        totals = leading_rows(names, self.rows, self.shared_image, self.shared_mask, self.skipped)
        for total in totals + (self.rows,) * draws:
            self._phases.append(source.copy())
            if total == 0:  # a draw diffusers skips: zeros
                self._shared.append(np.zeros(latent_shape, np.float32))
            elif total == 1 and self.rows > 1:  # drawn once, here, and broadcast to every piece's rows
                self._shared.append(source.randn((1, *latent_shape))[0])
            else:
                self._shared.append(None)
                source.skip(total, latent_shape, self.SKIP_BLOCK)
