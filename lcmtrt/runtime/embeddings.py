"""The sinusoidal timestep and guidance embeddings, computed on the host in fp32 and fed to the denoise engine.

Reduced precision (fp16, bf16, int8) never touches them: in bf16 the timestep 999 rounds to 1000 and the guidance
argument (w - 1) * 1000 = 7000 to 7008 before sin/cos, which was most of a bf16 image's error. The frequencies
are the float32 values diffusers computes (recorded in bundle.json at build time); each angle is the same float32
product diffusers forms, and sin/cos of it are evaluated in float64 and rounded once, so a row's values never
depend on which other rows share its batch.
"""

from __future__ import annotations

import numpy as np

from lcmtrt.bundle import SinusoidalEmbedding


def sinusoidal(angles_of: np.ndarray, spec: SinusoidalEmbedding) -> np.ndarray:
    """float32 [n, spec.dim]: [sin, cos] (or [cos, sin]) of `angles_of[:, None] * frequencies`, zero-padded to an
    odd dim as diffusers pads."""
    frequencies = np.asarray(spec.frequencies, np.float32)
    angles = np.asarray(angles_of, np.float32)[:, None] * frequencies[None, :]
    if spec.scale != 1.0:
        angles = angles * np.float32(spec.scale)
    wide = angles.astype(np.float64)
    sin, cos = np.sin(wide).astype(np.float32), np.cos(wide).astype(np.float32)
    halves = [cos, sin] if spec.flip_sin_to_cos else [sin, cos]
    emb = np.concatenate(halves, axis=1)
    if spec.dim > emb.shape[1]:
        emb = np.pad(emb, ((0, 0), (0, spec.dim - emb.shape[1])))
    return np.ascontiguousarray(emb, np.float32)


def time_embedding(timesteps: np.ndarray, spec: SinusoidalEmbedding) -> np.ndarray:
    """diffusers' get_timestep_embedding of each timestep (the UNet's time_proj): float32 [steps, dim]."""
    return sinusoidal(np.asarray(timesteps, np.float32), spec)


def guidance_embedding(guidance_scales: np.ndarray, spec: SinusoidalEmbedding) -> np.ndarray:
    """diffusers' get_guidance_scale_embedding of w = guidance_scale - 1 per row: float32 [rows, dim]. `guidance_scales`
    as the user gave them (float64): diffusers subtracts 1 before rounding to float32."""
    w = (np.asarray(guidance_scales, np.float64) - 1.0).astype(np.float32) * np.float32(1000.0)
    return sinusoidal(w, spec)
