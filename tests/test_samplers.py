"""The sampler rows against diffusers' TCDScheduler, EulerDiscreteScheduler and DDIMScheduler (trailing spacing),
run here on random tensors: schedules, init_noise_sigma, the UNet input scaling, every step and the latents the
pipelines decode; and the denoise graph's step (export/graphs.py general_step) against its numpy twin, bit for bit."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from lcmtrt.bundle import SchedulerConfig
from lcmtrt.errors import UserError
from lcmtrt.runtime.scheduler import apply_step, img2img_plan, sampler_plan, step_plan

SHAPE = (2, 4, 8, 8)
DIFFUSERS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def diffusers_scheduler(name: str, config: SchedulerConfig):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, TCDScheduler

    common = {**DIFFUSERS, "prediction_type": config.prediction_type}
    if name == "tcd":
        return TCDScheduler(set_alpha_to_one=config.set_alpha_to_one, **common)
    if name == "euler-trailing":
        return EulerDiscreteScheduler(timestep_spacing="trailing", **common)
    return DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=config.set_alpha_to_one, clip_sample=False,
                         **common)


@contextlib.contextmanager
def correctly_rounded_sqrt():
    """diffusers' scheduler math with np.sqrt in place of torch's CPU sqrt, which is not correctly rounded on every
    CPU (torch 2.13: exact on an Intel AVX-512 host, 1 ulp off for ~20% of float32 inputs on an AMD EPYC Zen 3);
    the plan's rows use the correctly rounded one (runtime/scheduler.py). What torch's own sqrt changes is bounded in
    test_scheduler.py, and the pipeline parity tests run diffusers as it is."""
    sqrt, power = torch.Tensor.sqrt, torch.Tensor.__pow__

    def ieee_sqrt(tensor: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(np.sqrt(tensor.numpy())))

    torch.Tensor.sqrt = ieee_sqrt
    torch.Tensor.__pow__ = lambda tensor, exponent: ieee_sqrt(tensor) if exponent == 0.5 else power(tensor, exponent)
    try:
        yield
    finally:
        torch.Tensor.sqrt, torch.Tensor.__pow__ = sqrt, power


def run_both(name: str, config: SchedulerConfig, steps: int, eta: float, timesteps: tuple[int, ...] | None = None):
    """diffusers' loop (with a correctly rounded sqrt) and the plan's, on the same inputs and noise; returns (ours,
    theirs) decoded latents."""
    with correctly_rounded_sqrt():
        return _run_both(name, config, steps, eta, timesteps)


def _run_both(name: str, config: SchedulerConfig, steps: int, eta: float, timesteps: tuple[int, ...] | None):
    sch = diffusers_scheduler(name, config)
    sch.set_timesteps(timesteps=list(timesteps)) if timesteps else sch.set_timesteps(steps)
    plan = sampler_plan(config, name, steps, timesteps, eta)
    assert plan.timesteps.tolist() == [int(t) for t in sch.timesteps]
    assert plan.init_sigma == float(sch.init_noise_sigma)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g) * sch.init_noise_sigma
    ours = x.numpy().copy()
    theirs_g, ours_g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for i, t in enumerate(sch.timesteps):
        model_input = sch.scale_model_input(x, t)
        # the graph's latents / input_divisor is diffusers' scale_model_input
        assert np.array_equal(ours / plan.coeffs[i, 8], sch.scale_model_input(torch.from_numpy(ours), t).numpy())
        e = torch.randn(SHAPE, generator=g) + 0.1 * model_input
        kwargs = {"eta": eta} if name != "euler-trailing" else {}
        x = sch.step(e, t, x, generator=theirs_g, return_dict=False, **kwargs)[0]
        noise = torch.randn(SHAPE, generator=ours_g).numpy() if i < plan.noise_draws else np.zeros(SHAPE, np.float32)
        ours, decoded = apply_step(plan.coeffs[i], config.prediction_type, ours, e.numpy(), noise)
    return decoded, x.numpy()  # the pipelines decode the last step's sample


CASES = [("tcd", eta) for eta in (0.0, 0.3, 1.0)] + [("ddim-trailing", eta) for eta in (0.0, 0.3)] + [
    ("euler-trailing", 0.0)]


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("name,eta", CASES)
def test_loop_matches_diffusers(name: str, eta: float, steps: int, set_alpha_to_one: bool) -> None:
    """Bit for bit, every sampler, step count and eta."""
    ours, theirs = run_both(name, SchedulerConfig(set_alpha_to_one=set_alpha_to_one), steps, eta)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("name", ["tcd", "ddim-trailing"])
def test_other_predictions(name: str, prediction_type: str) -> None:
    ours, theirs = run_both(name, SchedulerConfig(prediction_type=prediction_type), 4, 0.3)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["tcd", "euler-trailing"])
def test_custom_timesteps(name: str) -> None:
    ours, theirs = run_both(name, SchedulerConfig(), 4, 0.3 if name == "tcd" else 0.0, (999, 749, 499, 249))
    assert np.array_equal(ours, theirs)


def test_lcm_rows_keep_the_old_layout() -> None:
    """Bundles built before take the first 8 columns: LCM's rows there are what they always were."""
    plan = step_plan(SchedulerConfig(), 4)
    assert plan.coeffs.shape == (4, 15)
    assert sampler_plan(SchedulerConfig(), "lcm", 4) == plan
    x, e, n = (np.random.default_rng(k).standard_normal(SHAPE).astype(np.float32) for k in range(3))
    for row in plan.coeffs:
        assert all(np.array_equal(a, b) for a, b in zip(apply_step(row, "epsilon", x, e, n),
                                                          apply_step(row[:8], "epsilon", x, e, n)))


def test_img2img_slices_the_whole_schedule() -> None:
    full = sampler_plan(SchedulerConfig(), "ddim-trailing", 4, None, 0.3)
    cut = img2img_plan(SchedulerConfig(), 4, 0.5, sampler="ddim-trailing", eta=0.3)
    assert cut.timesteps.tolist() == [499, 249] and np.array_equal(cut.coeffs, full.coeffs[2:])
    assert cut.noise_draws == 2 and img2img_plan(SchedulerConfig(), 4, 0.5, sampler="tcd", eta=0.3).noise_draws == 1


def test_refusals() -> None:
    config = SchedulerConfig()
    for call, match in [(lambda: sampler_plan(config, "ddim-trailing", 2, (999, 499)), "custom timesteps"),
                        (lambda: sampler_plan(config, "tcd", 2, (499, 999)), "descending"),
                        (lambda: sampler_plan(config, "euler-trailing", 2, None, 0.5), "--eta applies"),
                        (lambda: sampler_plan(config, "tcd", 2, None, 1.5), r"\[0, 1\]"),
                        (lambda: sampler_plan(config, "tcd", 2, None, 0.0, 25), "original-inference-steps"),
                        (lambda: sampler_plan(config, "dpm", 2), "choose one of")]:
        with pytest.raises(UserError, match=match):
            call()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_graph_step_is_the_numpy_step(prediction_type: str) -> None:
    """export/graphs.py's general_step computes what apply_step does, bit for bit, for every sampler's rows."""
    from lcmtrt.export.graphs import general_step

    rng = np.random.default_rng(3)
    x, e, n = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    plans = [sampler_plan(SchedulerConfig(prediction_type=prediction_type), name, 4, None, eta)
             for name, eta in CASES if not (name == "euler-trailing" and prediction_type == "v_prediction")]
    for plan in plans + [step_plan(SchedulerConfig(prediction_type=prediction_type), 4)]:
        for row in plan.coeffs:
            graph = general_step(prediction_type, torch.from_numpy(row.copy()), *map(torch.from_numpy, (x, e, n)))
            for a, b in zip(graph, apply_step(row, prediction_type, x, e, n)):
                assert np.array_equal(a.numpy(), b)


def test_api_fields() -> None:
    """scheduler, eta and timesteps arrive through extra_body; a wrong one is a 400 naming the field."""
    from lcmtrt.serve.api import ApiError, GenerationRequest, validated

    request = validated(GenerationRequest, {"prompt": "a cat", "scheduler": "tcd", "eta": 0.3,
                                            "timesteps": [999, 499]}, strict=False)
    assert (request.scheduler, request.eta, request.timesteps) == ("tcd", 0.3, [999, 499])
    for bad, param in [({"scheduler": "dpm"}, "scheduler"), ({"eta": 2.0}, "eta"), ({"timesteps": []}, "timesteps")]:
        with pytest.raises(ApiError) as caught:
            validated(GenerationRequest, {"prompt": "a cat", **bad}, strict=False)
        assert caught.value.status == 400 and caught.value.param == param


def test_bench_plot_names_the_sampler() -> None:
    from lcmtrt.bench.plots import _title

    assert _title({"model": "m", "size": "64x64", "sampler": "euler-trailing"}).startswith(
        "lcmtrt bench: m 64x64, euler-trailing, ")
    assert _title({"model": "m", "size": "64x64"}).startswith("lcmtrt bench: m 64x64, None")  # older: no sampler
