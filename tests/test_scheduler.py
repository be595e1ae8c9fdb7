"""The numpy scheduler against diffusers' LCMScheduler, run here: schedules, coefficients and whole loops, bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from lcmtrt.bundle import SchedulerConfig
from lcmtrt.errors import SettingError, UserError
from lcmtrt.runtime.scheduler import (
    COEFF_COLUMNS,
    LCM_TAIL,
    StepPlan,
    alphas_cumprod,
    apply_step,
    img2img_plan,
    lcm_timesteps,
    sampler_plan,
    step_plan,
)

SHAPE = (2, 4, 8, 8)
# (steps, original_inference_steps, strength)
SETTINGS = [(n, orig, 1.0) for orig in (50, 25) for n in range(1, 9)] + [
    (n, 50, s) for s in (0.5, 0.6, 0.8) for n in (2, 4)
]
CONFIGS = [
    SchedulerConfig(),
    SchedulerConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, set_alpha_to_one=False),
    SchedulerConfig(num_train_timesteps=999, beta_start=0.001, beta_end=0.02, timestep_scaling=7.3),
]


def diffusers_scheduler(config: SchedulerConfig) -> LCMScheduler:
    return LCMScheduler(**asdict(config))


def set_lcm(sch: LCMScheduler, steps: int, orig: int, strength: float) -> LCMScheduler:
    sch.set_timesteps(num_inference_steps=steps, original_inference_steps=orig, strength=strength)
    return sch


def torch_sqrt(x: torch.Tensor) -> torch.Tensor:
    return x.sqrt()


def ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt; torch's CPU sqrt is 1 ulp off for some inputs (which, depends on the CPU)."""
    return torch.tensor(np.sqrt(x.numpy()))


def expected_coeffs(
    sch: LCMScheduler, timesteps: torch.Tensor, sqrt: Callable[[torch.Tensor], torch.Tensor] = torch_sqrt
) -> np.ndarray:
    """Each coefficient from the scheduler's own tensors, in the ops of its `step` and boundary scalings."""
    rows = []
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        prev = t if last else timesteps[i + 1]
        c_skip, _ = sch.get_scalings_for_boundary_condition_discrete(t)
        s = t * sch.config.timestep_scaling
        c_out = s / sqrt(s**2 + sch.sigma_data**2)
        a_t = sch.alphas_cumprod[t]
        a_prev = sch.alphas_cumprod[prev] if prev >= 0 else sch.final_alpha_cumprod
        tail = [1.0, 0.0] if last else [sqrt(a_prev), sqrt(1 - a_prev)]
        rows.append([float(t), c_skip, c_out, sqrt(a_t), sqrt(1 - a_t), *tail, 0.0, *LCM_TAIL])  # LCM's general row
    return np.array([[float(v) for v in row] for row in rows], dtype=np.float32)


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


def assert_coeffs_match(sch: LCMScheduler, plan: StepPlan) -> None:
    """Bit-exact given a correctly rounded sqrt; within 2 ulp of diffusers' own (MKL) sqrt."""
    assert_bits_equal(plan.coeffs, expected_coeffs(sch, sch.timesteps, ieee_sqrt))
    diffusers = expected_coeffs(sch, sch.timesteps)
    np.testing.assert_array_max_ulp(plan.coeffs, diffusers, maxulp=2)
    exact = [COEFF_COLUMNS.index(c) for c in ("timestep", "c_skip", "reserved")]  # no sqrt in these
    assert_bits_equal(plan.coeffs[:, exact], diffusers[:, exact])


def test_diffusers_check_uses_the_same_boundary_scalings() -> None:
    """expected_coeffs rebuilds c_out to swap its sqrt; with torch's sqrt it must equal diffusers' method."""
    sch = LCMScheduler(timestep_scaling=7.3)
    for t in torch.arange(1000):
        _, c_out = sch.get_scalings_for_boundary_condition_discrete(t)
        assert c_out.item() == expected_coeffs(sch, t[None])[0, 2]


@pytest.mark.parametrize("config", CONFIGS)
def test_alphas_cumprod_bit_exact(config: SchedulerConfig) -> None:
    assert_bits_equal(alphas_cumprod(config), diffusers_scheduler(config).alphas_cumprod.numpy())


def test_unknown_beta_schedule() -> None:
    with pytest.raises(UserError, match="squaredcos_cap_v2"):
        alphas_cumprod(SchedulerConfig(beta_schedule="squaredcos_cap_v2"))


@pytest.mark.parametrize("steps,orig,strength", SETTINGS)
def test_timesteps_match_diffusers(steps: int, orig: int, strength: float) -> None:
    sch = set_lcm(LCMScheduler(), steps, orig, strength)
    ts = lcm_timesteps(SchedulerConfig(), steps, strength, original_inference_steps=orig)
    assert_bits_equal(ts, sch.timesteps.numpy())


@pytest.mark.parametrize(
    "steps,strength,table",
    [
        (1, 1.0, [999]),
        (3, 1.0, [999, 679, 339]),
        (8, 1.0, [999, 879, 759, 639, 499, 379, 259, 139]),
        (4, 0.5, [499, 379, 259, 139]),
        (4, 0.6, [599, 459, 299, 159]),
        (2, 0.8, [799, 399]),
    ],
)
def test_timesteps_semantics_table(steps: int, strength: float, table: list[int]) -> None:
    assert lcm_timesteps(SchedulerConfig(), steps, strength).tolist() == table


def test_original_inference_steps_defaults_to_config() -> None:
    config = SchedulerConfig(original_inference_steps=25)
    assert_bits_equal(lcm_timesteps(config, 4), lcm_timesteps(SchedulerConfig(), 4, original_inference_steps=25))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps,orig,strength", SETTINGS)
def test_coefficients_match_diffusers(config: SchedulerConfig, steps: int, orig: int, strength: float) -> None:
    sch = set_lcm(diffusers_scheduler(config), steps, orig, strength)
    plan = step_plan(config, steps, strength, orig)
    assert plan.steps == steps and plan.coeffs.shape == (steps, len(COEFF_COLUMNS))
    assert_bits_equal(plan.timesteps, sch.timesteps.numpy())
    assert_coeffs_match(sch, plan)


def test_plan_is_cached_and_read_only() -> None:
    plan = step_plan(SchedulerConfig(), 4)
    assert step_plan(SchedulerConfig(), 4) is plan
    with pytest.raises(ValueError):
        plan.coeffs[0, 0] = 1.0


def run_diffusers(
    sch: LCMScheduler, timesteps: torch.Tensor, x: torch.Tensor, eps: list[torch.Tensor], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    for t, e in zip(timesteps, eps):
        x, denoised = sch.step(e, t, x, generator=g, return_dict=False)
    return x.numpy(), denoised.numpy()


def run_plan(
    plan: StepPlan, prediction_type: str, x: torch.Tensor, eps: list[torch.Tensor], seed: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The plan's loop; also returns the step noises it drew (diffusers' draw order)."""
    g = torch.Generator().manual_seed(seed)
    sample, noises = x.numpy(), []
    for i, e in enumerate(eps):
        last = i == plan.steps - 1
        noises.append(np.zeros(SHAPE, np.float32) if last else torch.randn(SHAPE, generator=g).numpy())
        sample, denoised = apply_step(plan.coeffs[i], prediction_type, sample, e.numpy(), noises[-1])
    return sample, denoised, noises


COEFF_ULPS = 2  # assert_coeffs_match: torch's sqrt may leave a coefficient 2 ulp from ours
SCALED_COEFFS = 5  # c_skip, c_out, sqrt_alpha | sqrt_beta, sqrt_alpha_prev, sqrt_beta_prev: at most 5 enter a step
OPS_PER_STEP = 9  # x0: 3, denoised: 3, next sample: 3 float32 roundings that may go either way once inputs differ


def rounding_bound(plan: StepPlan, prediction_type: str, x: np.ndarray, eps: list[np.ndarray],
                   noises: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-element bound on |ours - diffusers| for (next sample, denoised) when coefficients differ by up to
    COEFF_ULPS ulp, by forward error analysis. The loop is linear in (x, eps, noise): rerun in float64 on
    absolute values it gives the magnitude M every result is built from, cancellations included. Each step adds
    at most (SCALED_COEFFS x COEFF_ULPS + OPS_PER_STEP) x 2^-23 x M, and earlier differences propagate through
    the same absolute coefficients that build M, so after N steps the difference is at most N times that."""
    per_step = (SCALED_COEFFS * COEFF_ULPS + OPS_PER_STEP) * 2.0**-23
    magnitude = np.abs(x.astype(np.float64))
    for row, e, n in zip(plan.coeffs, eps, noises):
        _, c_skip, c_out, sqrt_alpha, sqrt_beta, sqrt_alpha_prev, sqrt_beta_prev, _ = np.abs(row[:8].astype(np.float64))
        e, n = np.abs(e.astype(np.float64)), np.abs(n.astype(np.float64))
        x0 = {"epsilon": (magnitude + sqrt_beta * e) / sqrt_alpha, "sample": e,
              "v_prediction": sqrt_alpha * magnitude + sqrt_beta * e}[prediction_type]
        denoised = c_out * x0 + c_skip * magnitude
        magnitude = sqrt_alpha_prev * denoised + sqrt_beta_prev * n
    return len(eps) * per_step * magnitude, len(eps) * per_step * denoised


def assert_loop_matches(plan: StepPlan, sch: LCMScheduler, timesteps: torch.Tensor, prediction_type: str) -> None:
    """A whole loop on random inputs: bit-exact where the plan's coefficients equal diffusers' own; where torch's
    sqrt left one 1-2 ulp off, within the float32 rounding bound of the magnitudes involved (rounding_bound), which
    holds whichever CPU or math library produced the ulp."""
    g = torch.Generator().manual_seed(1234)
    x, eps = torch.randn(SHAPE, generator=g), [torch.randn(SHAPE, generator=g) for _ in timesteps]
    expected = run_diffusers(sch, timesteps, x, eps, seed=7)
    *actual, noises = run_plan(plan, prediction_type, x, eps, seed=7)
    if np.array_equal(plan.coeffs, expected_coeffs(sch, timesteps)):
        for a, e in zip(actual, expected):
            assert_bits_equal(a, e)
        return
    bounds = rounding_bound(plan, prediction_type, x.numpy(), [e.numpy() for e in eps], noises)
    for a, e, bound in zip(actual, expected, bounds):
        ratio = (np.abs(a.astype(np.float64) - e) / bound).max()
        assert ratio <= 1.0, f"difference {ratio:.1f}x the float32 rounding bound"


def test_rounding_bound_catches_a_wrong_coefficient() -> None:
    """The bound is tight enough to reject a coefficient 1e-5 relative off (about 80 ulp)."""
    config = SchedulerConfig()
    sch = set_lcm(diffusers_scheduler(config), 4, 50, 1.0)
    plan = step_plan(config, 4)
    coeffs = plan.coeffs.copy()
    coeffs[1, COEFF_COLUMNS.index("sqrt_alpha")] *= np.float32(1 + 1e-5)
    with pytest.raises(AssertionError, match="rounding bound"):
        assert_loop_matches(StepPlan(plan.timesteps, coeffs), sch, sch.timesteps, "epsilon")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
# (3, 25): t=359 is one of the timesteps where torch's sqrt(1 - a_t) is 1 ulp off
@pytest.mark.parametrize("steps,orig,strength", [(1, 50, 1.0), (4, 50, 1.0), (8, 25, 1.0), (3, 25, 1.0), (4, 50, 0.6)])
def test_loop_matches_diffusers(prediction_type: str, steps: int, orig: int, strength: float) -> None:
    config = SchedulerConfig(prediction_type=prediction_type)
    sch = set_lcm(diffusers_scheduler(config), steps, orig, strength)
    assert_loop_matches(step_plan(config, steps, strength, orig), sch, sch.timesteps, prediction_type)


def test_classic_img2img_slice_matches_diffusers() -> None:
    """StableDiffusionImg2ImgPipeline: full 4-step schedule, first two dropped, `set_begin_index(2)`."""
    sch = LCMScheduler()
    sch.set_timesteps(4)
    sch.set_begin_index(2)
    sliced = sch.timesteps[2:]
    plan = step_plan(SchedulerConfig(), 4, timesteps=tuple(sliced.tolist()))
    assert plan.timesteps.tolist() == [499, 259]
    assert_loop_matches(plan, sch, sliced, "epsilon")


@pytest.mark.parametrize("sampler", ["lcm", "tcd", "euler-trailing"])
@pytest.mark.parametrize("timesteps", [(999, -5), (500, -1), (1000, 500)])
def test_every_timestep_is_bounded(sampler: str, timesteps: tuple[int, ...]) -> None:
    """Each custom timestep indexes alphas_cumprod: a negative one would wrap to the end of the schedule (diffusers
    wraps too), so every element must lie in [0, num_train_timesteps - 1], for CLI, API and bench alike."""
    with pytest.raises(SettingError, match=r"in \[0, 999\]") as refused:
        sampler_plan(SchedulerConfig(), sampler, len(timesteps), timesteps)
    assert refused.value.api_param == "timesteps" and "--" not in refused.value.api_message()


def test_euler_refuses_repeated_timesteps_but_not_unordered_ones() -> None:
    """diffusers' index_for_timestep takes a repeated timestep's second position: 999,999 would skip a step; an
    ascending list is what EulerDiscreteScheduler.set_timesteps(timesteps=...) runs as given."""
    with pytest.raises(SettingError, match="duplicate-free"):
        sampler_plan(SchedulerConfig(), "euler-trailing", 2, (999, 999))
    assert sampler_plan(SchedulerConfig(), "euler-trailing", 2, (499, 999)).timesteps.tolist() == [499, 999]


@pytest.mark.parametrize("call,cli,api,param", [
    (lambda c: sampler_plan(c, "euler-trailing", 2, None, 0.5), "--eta applies to", "eta applies to", "eta"),
    (lambda c: sampler_plan(c, "ddim-trailing", 2, (999, 499)), "--timesteps: DDIM", "timesteps: DDIM", "timesteps"),
    (lambda c: step_plan(c, 60), "--steps 60 is more", "num_inference_steps 60 is more", "num_inference_steps"),
    (lambda c: img2img_plan(c, 2, 0.2), "raise --strength or --steps", "raise strength or num_inference_steps",
     "strength"),
])
def test_setting_errors_name_the_flag_or_the_field(call, cli: str, api: str, param: str) -> None:
    """One shared check, two spellings: infer's flags in str(), the request's fields for the API's 400."""
    with pytest.raises(SettingError) as refused:
        call(SchedulerConfig())
    assert str(refused.value).startswith(cli) or cli in str(refused.value), str(refused.value)
    assert api in refused.value.api_message() and "--" not in refused.value.api_message()
    assert refused.value.api_param == param


@pytest.mark.parametrize(
    "steps,strength,orig,match",
    [
        (9, 1.0, 8, "--steps 9 is more than original_inference_steps 8"),
        (0, 1.0, None, "--steps 0"),
        (4, 0.0, None, "--strength 0.0"),
        (4, 1.5, None, "--strength 1.5"),
        (4, 0.06, None, "leaves 3"),
        (4, 1.0, 1001, "original_inference_steps 1001"),
    ],
)
def test_errors(steps: int, strength: float, orig: int | None, match: str) -> None:
    with pytest.raises(UserError, match=match):
        lcm_timesteps(SchedulerConfig(), steps, strength, orig)
    with pytest.raises(UserError, match=match):
        step_plan(SchedulerConfig(), steps, strength, orig)


@pytest.mark.parametrize("timesteps", [(), (259, 499), (1000, 500)])
def test_bad_custom_timesteps(timesteps: tuple[int, ...]) -> None:
    with pytest.raises(UserError, match="strictly descending"):
        step_plan(SchedulerConfig(), 4, timesteps=timesteps)


def test_unknown_prediction_type() -> None:
    row = step_plan(SchedulerConfig(), 1).coeffs[0]
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(UserError, match="flow"):
        apply_step(row, "flow", x, x, x)
