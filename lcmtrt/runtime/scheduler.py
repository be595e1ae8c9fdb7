"""LCMScheduler in numpy: the noise schedule, the timestep schedule and the per-step coefficients.

Everything here follows diffusers' `LCMScheduler` op for op in float32, so that the `denoise` graph, fed one
coefficient row per step, walks the latents diffusers would. The one deliberate difference: square roots are
correctly rounded (np.sqrt), while torch's CPU sqrt (MKL VML) is up to 1 ulp off for ~1% of inputs, so the
sqrt-derived columns can differ from diffusers-on-CPU by 1-2 ulp; everything else is bit-exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from lcmtrt.bundle import SchedulerConfig
from lcmtrt.errors import UserError

SIGMA_DATA = np.float32(0.5)  # diffusers' fixed sigma_data for the consistency boundary condition
COEFF_COLUMNS = (
    "timestep",
    "c_skip",
    "c_out",
    "sqrt_alpha",
    "sqrt_beta",
    "sqrt_alpha_prev",
    "sqrt_beta_prev",
    "reserved",
)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU, bit for bit."""
    lo, hi = np.float32(start), np.float32(end)
    step = (hi - lo) / np.float32(n - 1)  # torch computes the step in float32
    i = np.arange(n, dtype=np.float64)
    # torch's kernel is FMA-contracted (one rounding of lo + step*i); the float64 sum is exact here, so one cast matches
    first = np.float64(lo) + np.float64(step) * i
    second = np.float64(hi) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, first, second).astype(np.float32)  # torch fills the upper half backwards from `end`


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """float32 [num_train_timesteps], bit-exact with `LCMScheduler(...).alphas_cumprod` (torch's FMA CPU builds)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    elif config.beta_schedule == "linear":
        betas = _torch_linspace_f32(config.beta_start, config.beta_end, n)
    else:
        raise UserError(f"beta_schedule {config.beta_schedule!r} is not supported (use 'scaled_linear' or 'linear')")
    alphas = np.float32(1.0) - betas
    # torch's CPU cumprod accumulates in float64 and rounds each output to float32
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def lcm_timesteps(
    config: SchedulerConfig,
    steps: int,
    strength: float = 1.0,
    original_inference_steps: int | None = None,
) -> np.ndarray:
    """int64 [steps]: `LCMScheduler.set_timesteps(steps, original_inference_steps=..., strength=...).timesteps`."""
    original = config.original_inference_steps if original_inference_steps is None else original_inference_steps
    if steps < 1:
        raise UserError(f"--steps {steps} must be at least 1")
    if not 0.0 < strength <= 1.0:
        raise UserError(f"--strength {strength} must be in (0, 1]")
    if not 1 <= original <= config.num_train_timesteps:
        raise UserError(
            f"original_inference_steps {original} must be between 1 and num_train_timesteps {config.num_train_timesteps}"
        )
    if steps > original:
        raise UserError(f"--steps {steps} is more than original_inference_steps {original}; use at most {original} steps")
    k = config.num_train_timesteps // original  # the LCM skipping step
    origin = np.arange(1, int(original * strength) + 1, dtype=np.int64) * k - 1  # Python float math, as diffusers
    if len(origin) // steps < 1:
        raise UserError(
            f"--steps {steps} needs at least {steps} timesteps but original_inference_steps {original} x --strength "
            f"{strength} leaves {len(origin)}; lower --steps or raise --strength"
        )
    index = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[::-1][index]


@dataclass(frozen=True, eq=False)  # eq=False: the dataclass's == would compare arrays element-wise
class StepPlan:
    """The schedule of one run: a timestep and a COEFF_COLUMNS row per denoising step. A value: two plans with the
    same timesteps and coefficients (however they were asked for) are equal and hash alike, so they share a batch
    and a step program."""

    timesteps: np.ndarray  # int64 [N]
    coeffs: np.ndarray  # float32 [N, len(COEFF_COLUMNS)]

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def _value(self) -> tuple[bytes, ...]:
        ts, coeffs = np.ascontiguousarray(self.timesteps), np.ascontiguousarray(self.coeffs)
        return (ts.dtype.str.encode(), str(ts.shape).encode(), ts.tobytes(), coeffs.dtype.str.encode(),
                str(coeffs.shape).encode(), coeffs.tobytes())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepPlan):
            return NotImplemented
        return self is other or self._value() == other._value()

    def __hash__(self) -> int:
        return hash(self._value())


@functools.lru_cache(maxsize=64)
def step_plan(
    config: SchedulerConfig,
    steps: int,
    strength: float = 1.0,
    original_inference_steps: int | None = None,
    timesteps: tuple[int, ...] | None = None,
) -> StepPlan:
    """Coefficients for every step; `timesteps` (already sliced, e.g. classic img2img) replaces the LCM schedule."""
    if timesteps is None:
        ts = lcm_timesteps(config, steps, strength, original_inference_steps)
    else:
        ts = np.asarray(timesteps, dtype=np.int64)
        # the checks diffusers applies to custom timesteps
        if ts.ndim != 1 or len(ts) == 0 or np.any(np.diff(ts) >= 0) or ts[0] >= config.num_train_timesteps:
            raise UserError(
                f"timesteps {list(timesteps)} must be a non-empty, strictly descending list "
                f"below num_train_timesteps {config.num_train_timesteps}"
            )
    acp = alphas_cumprod(config)
    final_alpha = np.float32(1.0) if config.set_alpha_to_one else acp[0]  # diffusers' final_alpha_cumprod
    scaling = np.float32(config.timestep_scaling)
    one, sd2 = np.float32(1.0), SIGMA_DATA * SIGMA_DATA
    coeffs = np.zeros((len(ts), len(COEFF_COLUMNS)), dtype=np.float32)
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        prev = t if last else ts[i + 1]
        s = np.float32(t) * scaling  # diffusers: int64 tensor * float -> float32
        a_t = acp[t]
        a_prev = acp[prev] if prev >= 0 else final_alpha
        coeffs[i, 0] = np.float32(t)
        coeffs[i, 1] = sd2 / (s * s + sd2)  # torch does reciprocal(d) * 0.25: the same bits, as * 0.25 is exact
        coeffs[i, 2] = s / np.sqrt(s * s + sd2)  # diffusers' `** 0.5`: a float32 sqrt
        coeffs[i, 3] = np.sqrt(a_t)
        coeffs[i, 4] = np.sqrt(one - a_t)
        # last step: x_next = 1*denoised + 0*noise is exactly diffusers' `prev_sample = denoised`
        coeffs[i, 5] = one if last else np.sqrt(a_prev)
        coeffs[i, 6] = 0.0 if last else np.sqrt(one - a_prev)
    ts.flags.writeable = False  # the plan is cached and shared: keep callers from editing it
    coeffs.flags.writeable = False
    return StepPlan(ts, coeffs)


def apply_step(
    coeff_row: np.ndarray,
    prediction_type: str,
    sample: np.ndarray,
    model_output: np.ndarray,
    noise: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One LCM step in the denoise graph's op order; returns (next sample, denoised)."""
    _, c_skip, c_out, sqrt_alpha, sqrt_beta, sqrt_alpha_prev, sqrt_beta_prev, _ = coeff_row.astype(np.float32)
    if prediction_type == "epsilon":
        x0 = (sample - sqrt_beta * model_output) / sqrt_alpha
    elif prediction_type == "sample":
        x0 = model_output
    elif prediction_type == "v_prediction":
        x0 = sqrt_alpha * sample - sqrt_beta * model_output
    else:
        raise UserError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    denoised = c_out * x0 + c_skip * sample
    return sqrt_alpha_prev * denoised + sqrt_beta_prev * noise, denoised


IMG2IMG_MODES = ("classic", "lcm")


def img2img_plan(config: SchedulerConfig, steps: int, strength: float, mode: str = "classic",
                 original_inference_steps: int | None = None) -> StepPlan:
    """`lcm`: LatentConsistencyModelImg2ImgPipeline shortens the origin schedule and runs all N steps.
    `classic`: StableDiffusion(XL)Img2ImgPipeline keeps the N-step schedule and drops its first N - int(N*s) steps."""
    if mode not in IMG2IMG_MODES:
        raise UserError(f"--img2img-mode {mode!r}: choose one of {', '.join(IMG2IMG_MODES)}")
    if not 0.0 < strength <= 1.0:
        raise UserError(f"--strength {strength} must be in (0, 1]")
    if mode == "lcm":
        return step_plan(config, steps, strength, original_inference_steps)
    full = lcm_timesteps(config, steps, 1.0, original_inference_steps)
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise UserError(f"--strength {strength} with --steps {steps} leaves no step to run "
                        f"(int({steps} x {strength}) = 0); raise --strength or --steps")
    return step_plan(config, kept, timesteps=tuple(int(t) for t in full[steps - kept:]))
