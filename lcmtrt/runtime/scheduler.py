"""diffusers' few-step schedulers in numpy: the noise schedule, the timestep schedule and the per-step coefficients.

Everything here follows diffusers' `LCMScheduler` (and, in sampler_plan's rows, `TCDScheduler`,
`EulerDiscreteScheduler` and `DDIMScheduler` with trailing spacing) op for op in float32, so that the `denoise`
graph, fed one coefficient row per step, walks the latents diffusers would. The one deliberate difference: square roots are
correctly rounded (np.sqrt), while torch's CPU float32 sqrt is not on every CPU (torch 2.13: ~1% of inputs 1 ulp off
on an Intel AVX-512 host, ~20% on an AMD EPYC Zen 3), so the sqrt-derived columns can differ from diffusers-on-CPU by
1-2 ulp; everything else is bit-exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from lcmtrt.bundle import COEFF_COLUMNS, LCM_COLUMNS, SAMPLERS, Bundle, SchedulerConfig
from lcmtrt.errors import SettingError, UserError

SIGMA_DATA = np.float32(0.5)  # diffusers' fixed sigma_data for the consistency boundary condition
# The general columns' values that make the general step LCM's exactly: x / 1, + 0 * eps, + (0 * x + d * 0), and the
# decoded latents are `denoised` (LCM's last step returns it as the next sample too).
LCM_TAIL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0)
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
        raise SettingError("steps", f"{{steps}} {steps} must be at least 1")
    if not 0.0 < strength <= 1.0:
        raise SettingError("strength", f"{{strength}} {strength} must be in (0, 1]")
    if not 1 <= original <= config.num_train_timesteps:
        raise UserError(f"original_inference_steps {original} must be between 1 and num_train_timesteps "
                        f"{config.num_train_timesteps}")
    if steps > original:
        raise SettingError("steps", f"{{steps}} {steps} is more than original_inference_steps {original}; use at most "
                                    f"{original} steps")
    k = config.num_train_timesteps // original  # the LCM skipping step
    origin = np.arange(1, int(original * strength) + 1, dtype=np.int64) * k - 1  # Python float math, as diffusers
    if len(origin) // steps < 1:
        raise SettingError("steps", f"{{steps}} {steps} needs at least {steps} timesteps but original_inference_steps "
                                    f"{original} x {{strength}} {strength} leaves {len(origin)}; lower {{steps}} or "
                                    "raise {strength}")
    index = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[::-1][index]


@dataclass(frozen=True, eq=False)  # eq=False: the dataclass's == would compare arrays element-wise
class StepPlan:
    """The schedule of one run: a timestep and a COEFF_COLUMNS row per denoising step. A value: two plans with the
    same timesteps, coefficients and draws (however they were asked for, by whichever sampler) are equal and hash
    alike, so they share a batch and a step program."""

    timesteps: np.ndarray  # int64 [N]
    coeffs: np.ndarray  # float32 [N, len(COEFF_COLUMNS)]
    draws: int | None = None  # how many first steps draw step noise; None: all but the last (LCM)
    init_sigma: float = 1.0  # diffusers' init_noise_sigma: text-to-image start noise is scaled by it (Euler's)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def noise_draws(self) -> int:
        return self.steps - 1 if self.draws is None else self.draws

    def sliced(self, start: int) -> StepPlan:
        """The steps from `start` on, as classic image-to-image runs them (the draws of the dropped steps go too)."""
        ts, coeffs = self.timesteps[start:].copy(), self.coeffs[start:].copy()
        ts.flags.writeable = coeffs.flags.writeable = False
        draws = None if self.draws is None else max(0, self.draws - start)
        return StepPlan(ts, coeffs, draws, self.init_sigma)

    def _value(self) -> tuple[bytes, ...]:
        ts, coeffs = np.ascontiguousarray(self.timesteps), np.ascontiguousarray(self.coeffs)
        return (ts.dtype.str.encode(), str(ts.shape).encode(), ts.tobytes(), coeffs.dtype.str.encode(),
                str(coeffs.shape).encode(), coeffs.tobytes(), str((self.noise_draws, self.init_sigma)).encode())

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
        ts = checked_timesteps(config, "lcm", timesteps)
    acp = alphas_cumprod(config)
    final_alpha = np.float32(1.0) if config.set_alpha_to_one else acp[0]  # diffusers' final_alpha_cumprod
    scaling = np.float32(config.timestep_scaling)
    one, sd2 = np.float32(1.0), SIGMA_DATA * SIGMA_DATA
    coeffs = np.zeros((len(ts), len(COEFF_COLUMNS)), dtype=np.float32)
    coeffs[:, len(LCM_COLUMNS):] = LCM_TAIL
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
    """One step in the denoise graph's op order (export/graphs.py); returns (next sample, denoised output). An
    8-column row (bundles built before) is LCM's. `model_output` is the UNet's output for sample / input_divisor."""
    row = coeff_row.astype(np.float32)
    row = np.concatenate([row, np.asarray(LCM_TAIL, np.float32)]) if len(row) == len(LCM_COLUMNS) else row
    _, c_skip, c_out, sqrt_alpha, sqrt_beta, next_denoised, next_noise, _ = row[:8]
    _, denoised_eps, next_eps, next_x, sigma, dt, decode_next = row[8:]
    if prediction_type == "epsilon":
        x0, eps = (sample - sqrt_beta * model_output) / sqrt_alpha, model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_alpha * x0) / sqrt_beta
    elif prediction_type == "v_prediction":
        x0 = sqrt_alpha * sample - sqrt_beta * model_output
        eps = sqrt_alpha * model_output + sqrt_beta * sample
    else:
        raise UserError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    denoised = (c_out * x0 + c_skip * sample) + denoised_eps * eps
    euler = next_x * sample + ((sample - denoised) / sigma) * dt
    next_sample = ((next_denoised * denoised + next_eps * eps) + next_noise * noise) + euler
    return next_sample, next_sample if decode_next > 0 else denoised


IMG2IMG_MODES = ("classic", "lcm")
ETA_SAMPLERS = ("tcd", "ddim-trailing")  # the schedulers whose step takes the pipelines' `eta`


def _row(t: float, **given: float) -> np.ndarray:
    """One general row: LCM's neutral values (x / 1, nothing from eps or the Euler term) unless given."""
    row = np.zeros(len(COEFF_COLUMNS), np.float32)
    row[len(LCM_COLUMNS):] = LCM_TAIL
    row[0] = t
    for name, value in given.items():
        row[COEFF_COLUMNS.index(name)] = value
    return row


def _final_alpha(config: SchedulerConfig, acp: np.ndarray) -> np.float32:
    return np.float32(1.0) if config.set_alpha_to_one else acp[0]  # diffusers' final_alpha_cumprod


def _tcd_rows(config: SchedulerConfig, ts: np.ndarray, eta: float) -> np.ndarray:
    """TCDScheduler.step: x_s = sqrt(a_s) x0 + sqrt(1-a_s) eps at s = floor((1 - eta) t_prev), then (eta > 0, not
    the last step) x_prev = sqrt(a_prev/a_s) x_s + sqrt(1 - a_prev/a_s) noise; x_s is both outputs otherwise."""
    acp, one = alphas_cumprod(config), np.float32(1.0)
    gamma = np.float32(1.0 - eta)  # torch: the Python float (1 - eta) times an int64 tensor, in float32
    rows = []
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        prev = 0 if last else int(ts[i + 1])  # diffusers: torch.tensor(0) after the last step
        s = int(np.floor(gamma * np.float32(prev)))
        a_t, a_s = acp[t], acp[s]
        row = _row(t, c_out=np.sqrt(a_s), sqrt_alpha=np.sqrt(a_t), sqrt_beta=np.sqrt(one - a_t),
                   denoised_eps=np.sqrt(one - a_s), sqrt_alpha_prev=one)
        if eta > 0 and not last:
            ratio = (acp[prev] if prev >= 0 else _final_alpha(config, acp)) / a_s
            row[5], row[6] = np.sqrt(ratio), np.sqrt(one - ratio)
        rows.append(row)
    return np.stack(rows)


def _ddim_rows(config: SchedulerConfig, ts: np.ndarray, steps: int, eta: float) -> np.ndarray:
    """DDIMScheduler.step: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps [+ std noise], prev = t - T // N
    (T // N of the whole schedule), std = eta sqrt(variance); the pipelines decode the last x_prev, not x0."""
    acp, one = alphas_cumprod(config), np.float32(1.0)
    rows = []
    for i, t in enumerate(ts):
        prev = int(t) - config.num_train_timesteps // steps
        a_t = acp[t]
        a_prev = acp[prev] if prev >= 0 else _final_alpha(config, acp)
        variance = ((one - a_prev) / (one - a_t)) * (one - a_t / a_prev)
        std = np.float32(eta) * np.sqrt(variance)
        rows.append(_row(t, c_out=one, sqrt_alpha=np.sqrt(a_t), sqrt_beta=np.sqrt(one - a_t),
                         sqrt_alpha_prev=np.sqrt(a_prev), next_eps=np.sqrt(one - a_prev - std * std),
                         sqrt_beta_prev=std, decode_next=float(i == len(ts) - 1)))
    return np.stack(rows)


def _euler_rows(config: SchedulerConfig, ts: np.ndarray) -> tuple[np.ndarray, float]:
    """EulerDiscreteScheduler (s_churn 0: no noise): the UNet sees x / sqrt(sigma^2 + 1); x0 = x - sigma eps;
    x_next = x + ((x - x0) / sigma) (sigma_next - sigma). Returns the rows and init_noise_sigma (the largest sigma)."""
    acp, one = alphas_cumprod(config), np.float32(1.0)
    every = np.sqrt((one - acp) / acp)  # diffusers: ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 in float32
    sigmas = np.interp(ts.astype(np.float32), np.arange(0, len(every)), every)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    rows = [_row(t, c_out=one, sqrt_alpha=one, sqrt_beta=sigmas[i], sqrt_alpha_prev=0.0, next_x=one,
                 input_divisor=np.sqrt(sigmas[i] * sigmas[i] + one), sigma=sigmas[i], dt=sigmas[i + 1] - sigmas[i],
                 decode_next=float(i == len(ts) - 1))
            for i, t in enumerate(ts)]
    return np.stack(rows), float(sigmas.max())


def checked_timesteps(config: SchedulerConfig, sampler: str, timesteps: tuple[int, ...]) -> np.ndarray:
    """The custom timesteps `sampler` runs correctly, each in [0, num_train_timesteps - 1] (an index into
    alphas_cumprod): strictly descending (LCM, TCD: diffusers' check), or distinct (Euler: diffusers'
    index_for_timestep finds a repeated timestep's second position first); DDIMScheduler takes none."""
    if sampler == "ddim-trailing":
        raise SettingError("timesteps", "{timesteps}: DDIMScheduler.set_timesteps takes no custom timesteps "
                                        "(diffusers' pipelines refuse them); use {steps}")
    ts = np.asarray(timesteps, dtype=np.int64)
    euler = sampler == "euler-trailing"
    ordered = len(np.unique(ts)) == len(ts) if euler else bool(np.all(np.diff(ts) < 0))
    if ts.ndim != 1 or len(ts) == 0 or not ordered or ts.min() < 0 or ts.max() >= config.num_train_timesteps:
        raise SettingError("timesteps", f"{{timesteps}} {','.join(map(str, timesteps))} must be a non-empty, "
                                        f"{'duplicate-free' if euler else 'strictly descending'} list of timesteps "
                                        f"in [0, {config.num_train_timesteps - 1}]")
    return ts


@functools.lru_cache(maxsize=64)
def sampler_plan(config: SchedulerConfig, sampler: str, steps: int, timesteps: tuple[int, ...] | None = None,
                 eta: float = 0.0, original_inference_steps: int | None = None) -> StepPlan:
    """The whole schedule of `sampler` (bundle.SAMPLERS) as set_timesteps(steps) or set_timesteps(timesteps=...)
    makes it; the samplers but LCM use trailing timestep spacing where they have one (TCD's is LCM's)."""
    if sampler not in SAMPLERS:
        raise SettingError("scheduler", f"{{scheduler}} {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if eta and sampler not in ETA_SAMPLERS:
        raise SettingError("eta", f"{{eta}} applies to {' and '.join(ETA_SAMPLERS)}; {sampler} takes none")
    if not 0.0 <= eta <= 1.0:
        raise SettingError("eta", f"{{eta}} {eta} must be in [0, 1]")
    if original_inference_steps is not None and sampler != "lcm":
        raise SettingError("original_inference_steps", "{original_inference_steps} applies to lcm; diffusers' "
                                                        f"pipelines never pass it to {sampler}")
    if sampler == "lcm":
        return step_plan(config, steps, 1.0, original_inference_steps, timesteps)
    if timesteps is not None:
        ts = checked_timesteps(config, sampler, timesteps)
    elif sampler == "tcd":
        ts = lcm_timesteps(config, steps)  # TCDScheduler's default schedule is LCMScheduler's
    elif steps < 1 or steps > config.num_train_timesteps:
        raise SettingError("steps", f"{{steps}} {steps} must be between 1 and num_train_timesteps "
                                    f"{config.num_train_timesteps}")
    else:
        ratio = config.num_train_timesteps / steps
        ts = np.round(np.arange(config.num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    init_sigma, draws = 1.0, 0
    if sampler == "tcd":
        coeffs, draws = _tcd_rows(config, ts, eta), (len(ts) - 1 if eta > 0 else 0)
    elif sampler == "ddim-trailing":
        coeffs, draws = _ddim_rows(config, ts, steps, eta), (len(ts) if eta > 0 else 0)
    else:
        coeffs, init_sigma = _euler_rows(config, ts)
    ts.flags.writeable = coeffs.flags.writeable = False
    return StepPlan(ts, coeffs, draws, init_sigma)


def img2img_plan(config: SchedulerConfig, steps: int, strength: float, mode: str = "classic",
                 original_inference_steps: int | None = None, sampler: str = "lcm",
                 timesteps: tuple[int, ...] | None = None, eta: float = 0.0) -> StepPlan:
    """`lcm`: LatentConsistencyModelImg2ImgPipeline shortens the origin schedule and runs all N steps.
    `classic`: StableDiffusion(XL)Img2ImgPipeline keeps the N-step schedule and drops its first N - int(N*s) steps
    (get_timesteps + set_begin_index), whichever scheduler."""
    if mode not in IMG2IMG_MODES:
        raise SettingError("img2img_mode", f"{{img2img_mode}} {mode!r}: choose one of {', '.join(IMG2IMG_MODES)}")
    if not 0.0 < strength <= 1.0:
        raise SettingError("strength", f"{{strength}} {strength} must be in (0, 1]")
    if mode == "lcm" and sampler != "lcm":
        raise SettingError("img2img_mode", "{img2img_mode} lcm is LatentConsistencyModelImg2ImgPipeline's, which "
                                           "runs LCMScheduler only; use {img2img_mode} classic with {scheduler} "
                                           f"{sampler}")
    if mode == "lcm" and timesteps is None:
        return step_plan(config, steps, strength, original_inference_steps)
    full = sampler_plan(config, sampler, steps, timesteps, eta, original_inference_steps)
    kept = min(int(full.steps * strength), full.steps)
    if kept == 0:
        raise SettingError("strength", f"{{strength}} {strength} with {full.steps} steps leaves no step to run "
                                       f"(int({full.steps} x {strength}) = 0); raise {{strength}} or {{steps}}")
    return full.sliced(full.steps - kept)


@dataclass(frozen=True)
class SamplerChoice:
    """A request's sampler with everything its plan needs, defaults resolved."""

    name: str
    steps: int
    timesteps: tuple[int, ...] | None = None
    eta: float = 0.0
    original_inference_steps: int | None = None

    def plan(self, config: SchedulerConfig) -> StepPlan:
        return sampler_plan(config, self.name, self.steps, self.timesteps, self.eta, self.original_inference_steps)

    def img2img(self, config: SchedulerConfig, strength: float, mode: str) -> StepPlan:
        return img2img_plan(config, self.steps, strength, mode, self.original_inference_steps, self.name,
                            self.timesteps, self.eta)


def unfollowed_euler(options: dict[str, object]) -> str:
    """Why euler-trailing would not be diffusers' Euler for a model whose scheduler config sets `options`."""
    given = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
    return (f"this model's scheduler config sets {given}, which diffusers' EulerDiscreteScheduler follows and "
            "lcmtrt's Euler step does not")


def choose_sampler(bundle: Bundle, scheduler: str | None, steps: int | None, timesteps: tuple[int, ...] | None,
                   eta: float | None, original_inference_steps: int | None, inpainting: bool) -> SamplerChoice:
    """The sampler a request runs on `bundle`: the one it names, or the bundle's (its preset's, with that preset's
    eta and timesteps); refused in one line where the bundle cannot run it."""
    defaults = bundle.sampler
    name = scheduler or defaults.scheduler
    if name not in SAMPLERS:
        raise SettingError("scheduler", f"{{scheduler}} {name!r}: choose one of {', '.join(SAMPLERS)}")
    if name != "lcm" and not bundle.general:
        raise SettingError("scheduler", f"bundle {bundle.root} was built before samplers and runs LCM only; rebuild "
                                        f"it with `lcmtrt build-engines` to run {{scheduler}} {name}")
    if name != "lcm" and (inpainting or bundle.inpaint == "unet9"):
        raise SettingError("scheduler", f"inpainting runs {{scheduler}} lcm only (its mask blend is LCM's); {name} "
                                        "cannot inpaint")
    if name == "euler-trailing" and bundle.euler_options:
        why = unfollowed_euler(bundle.euler_options).replace("{", "{{").replace("}", "}}")  # literal in a template
        raise SettingError("scheduler", f"{{scheduler}} euler-trailing: {why}; choose another scheduler")
    if name == "euler-trailing" and bundle.scheduler.prediction_type == "v_prediction":
        raise SettingError("scheduler", "{scheduler} euler-trailing: lcmtrt's Euler step takes epsilon or sample "
                                        "predictions, and this model predicts v")
    own = name == defaults.scheduler  # a preset's eta and timesteps go with its own sampler
    if timesteps is None and steps is None and own:
        timesteps = defaults.timesteps
    if timesteps is not None and steps is not None and steps != len(timesteps):
        raise SettingError("timesteps", f"{{steps}} {steps} and {len(timesteps)} {{timesteps}} disagree; give one "
                                        "of them")
    steps = len(timesteps) if timesteps else bundle.default_steps if steps is None else steps
    eta = eta if eta is not None else defaults.eta if own and defaults.eta is not None else 0.0
    return SamplerChoice(name, steps, None if timesteps is None else tuple(int(t) for t in timesteps), float(eta),
                         original_inference_steps)
