"""Step programs (issue #21, item 3): plans are values, so requests with equal schedules share a batch and a program
however they asked for it; at most max_step_programs programs are kept, and an evicted one frees its buffers,
bindings, contexts and graphs (counted on the fake TensorRT device, and rebuilt correctly on ONNX Runtime)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

import fake_trt
from conftest import BACKENDS, distinct_originals, on_backend
from lcmtrt.bundle import SchedulerConfig
from lcmtrt.runtime.pipeline import Pipeline
from lcmtrt.runtime.rows import PreparedRows
from lcmtrt.runtime.scheduler import StepPlan, img2img_plan, step_plan
from lcmtrt.runtime.settings import GenerationSettings


def test_plans_are_equal_by_value() -> None:
    config = SchedulerConfig()
    implicit = step_plan(config, 4)
    explicit = step_plan(config, 4, original_inference_steps=config.original_inference_steps)
    assert implicit == explicit and hash(implicit) == hash(explicit) and len({implicit, explicit}) == 1
    assert StepPlan(implicit.timesteps.copy(), implicit.coeffs.copy()) == implicit
    assert img2img_plan(config, 4, 1.0, "lcm") == implicit  # strength 1 runs the text-to-image schedule
    assert step_plan(config, 4, original_inference_steps=40) != implicit
    assert step_plan(config, 3) != implicit and implicit != "a plan"


@pytest.fixture(scope="module")
def pipeline(tiny_sd15_bundle: Path) -> Pipeline:
    return Pipeline.load(tiny_sd15_bundle)


def test_equal_plans_share_a_batch_and_a_program(pipeline: Pipeline) -> None:
    """A request that sends the default original_inference_steps merges with one that omits it, and neither they
    nor stage_times (which asks for the plan its own way) make another program."""
    default = pipeline.bundle.scheduler.original_inference_steps
    implicit = pipeline.prepare(["a red fox"], 1, GenerationSettings(steps=4))
    explicit = pipeline.prepare(["a blue cat"], 2, GenerationSettings(steps=4, original_inference_steps=default))
    assert implicit.key == explicit.key
    solo = pipeline.run(explicit).images[0]
    joined = pipeline.run(PreparedRows.join([implicit, explicit]))
    np.testing.assert_array_equal(joined.images[1], solo)
    kept = set(pipeline._programs)
    pipeline.stage_times(1, 4)
    pipeline.run(pipeline.prepare(["a green owl"], 3, GenerationSettings(steps=4, original_inference_steps=default)))
    assert set(pipeline._programs) == kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_evicted_programs_are_rebuilt_with_the_same_images(pipeline: Pipeline, tiny_sd15_bundle: Path,
                                                           backend: str) -> None:
    """On the CPU backends: 6 plans through a limit of 2 keep at most 2 programs and 2 plans' coefficients, and a
    plan run again after its program was freed gives the same bits (nothing shared was freed with it)."""
    if backend != "onnxruntime":
        pipeline = Pipeline.load(on_backend(tiny_sd15_bundle, backend))
    pipeline.max_step_programs = 2
    try:
        originals = distinct_originals(6, pipeline.bundle.scheduler)
        first = pipeline.generate(["a lighthouse"], seed=5, steps=4, original_inference_steps=originals[0]).images
        for original in originals[1:]:
            pipeline.generate(["a lighthouse"], seed=5, steps=4, original_inference_steps=original)
            assert len(pipeline._programs) <= 2
        assert len(pipeline._store.coeffs) <= 2  # the coefficients of evicted plans went with their programs
        again = pipeline.generate(["a lighthouse"], seed=5, steps=4, original_inference_steps=originals[0]).images
        np.testing.assert_array_equal(again, first)
    finally:
        pipeline.max_step_programs = 16  # the default


def _resident(fake: fake_trt.FakeCuda) -> dict[str, int]:
    gc.collect()
    return {"device_bytes": sum(fake.device_allocs.values()), "device_allocations": len(fake.device_allocs),
            "pinned_allocations": len(fake.host_allocs), "contexts": fake.contexts_alive,
            "graphs": fake.graphs_alive, "graph_execs": fake.graph_execs_alive}


def test_forty_plans_keep_device_memory_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TensorRT on the fakes: 40 distinct plans through a limit of 4. Once 4 programs exist, each new plan frees
    one program's buffers, pinned staging, contexts, graph exec and graph: what is resident stays the same."""
    fake = fake_trt.install(monkeypatch)
    try:
        from lcmtrt.runtime.backends.tensorrt import TensorRTBackend

        bundle = fake_trt.pipeline_bundle(tmp_path)
        backend = TensorRTBackend(bundle)
        pipeline = Pipeline(bundle, backend)
        pipeline.max_step_programs = 4
        full = None
        for i, original in enumerate(distinct_originals(40, bundle.scheduler)):
            pipeline.generate(["a fox"], seed=i, steps=4, original_inference_steps=original)
            assert len(pipeline._programs) == min(i + 1, 4)
            if i == 3:
                full = _resident(fake)
                assert full["contexts"] == 2 + 4 * 4 and full["graphs"] == full["graph_execs"] == 4
            elif i > 3:
                assert _resident(fake) == full, f"plan {i + 1}"
        backend.close()
        assert _resident(fake) == {"device_bytes": 0, "device_allocations": 0, "pinned_allocations": 0,
                                   "contexts": 0, "graphs": 0, "graph_execs": 0}
    finally:
        import sys

        sys.modules.pop("lcmtrt.runtime.backends.tensorrt", None)


def test_released_tensorrt_resources_refuse_to_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_trt.install(monkeypatch)
    try:
        from lcmtrt.runtime.backends.tensorrt import TensorRTBackend

        backend = TensorRTBackend(fake_trt.pipeline_bundle(tmp_path))
        latents, images = backend.alloc((1, 4, 2, 2), np.float32), backend.alloc((1, 16, 16, 3), np.uint8)
        binding = backend.bind("vae_decode", 1, {"latents": latents, "images": images})
        replay = backend.capture(binding.run)
        replay()
        assert replay.captured
        replay.release()
        binding.release()
        assert not replay.captured and backend.graph_count == 0
        with pytest.raises(RuntimeError, match="released"):
            binding.run()
        row = latents.row(0)
        row.release()  # a view frees nothing
        latents.release()
        latents.release()  # twice is harmless
        with pytest.raises(RuntimeError, match="released"):
            latents.write(np.zeros((1, 4, 2, 2), np.float32))
        backend.close()
    finally:
        import sys

        sys.modules.pop("lcmtrt.runtime.backends.tensorrt", None)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "many", "2000"])
def test_max_step_programs_flag_is_checked(value: str, capsys) -> None:
    from lcmtrt.cli.main import main

    code = main(["serve", "--engines", "no-such-bundle", "--max-step-programs", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--max-step-programs" in err[0] and "1024" in err[0], err


@pytest.mark.parametrize("value", ["1=abc", "0=5", "1=-2", "1", "1=10,2=inf"])
def test_batch_ms_flag_is_checked(value: str, capsys) -> None:
    from lcmtrt.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--engines", "no-such-bundle", "--batch-ms", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "batch" in err[0]


def test_batch_ms_must_cover_every_built_size(tiny_sd15_bundle: Path, capsys) -> None:
    from lcmtrt.cli.main import main

    pytest.importorskip("uvicorn")
    assert main(["-q", "serve", "--engines", str(tiny_sd15_bundle), "--batch-ms", "1=10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no time for batch sizes [2]" in err[0]
