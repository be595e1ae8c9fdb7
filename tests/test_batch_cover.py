"""How rows are cut into launches (issue #21, item 4): by measured cost, padded into a larger batch where one launch
costs less than the pieces and split where it does not, without changing any image; and how the batcher answers:
each request as soon as the launch holding its last row is read, a request split over two batches beside another,
and a failed launch failing only the requests it held. Costs are given, never timed, so nothing here depends on
the machine's speed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

import fake_trt
from lcmtrt.bundle import SchedulerConfig
from lcmtrt.runtime.pipeline import Generation, Pipeline
from lcmtrt.runtime.rows import BatchKey, PreparedRows
from lcmtrt.runtime.scheduler import step_plan
from lcmtrt.serve.batcher import Batcher, BatcherConfig, BatchStats, Job


def test_cheapest_cover() -> None:
    from lcmtrt.runtime.cover import cheapest_cover, linear_costs

    gpu, cpu = {1: 1.0, 4: 1.5}, {1: 1.0, 4: 4.5}
    assert cheapest_cover(3, gpu) == [(3, 4)]  # one padded launch instead of three
    assert cheapest_cover(3, cpu) == [(1, 1)] * 3  # padding would compute a row for nothing
    assert cheapest_cover(5, gpu) == [(4, 4), (1, 1)]
    assert cheapest_cover(8, gpu) == [(4, 4), (4, 4)]
    assert cheapest_cover(7, {1: 1.0, 2: 1.5, 4: 2.6}) == [(4, 4), (2, 2), (1, 1)]
    assert cheapest_cover(7, {1: 1.0, 2: 1.2, 4: 2.0}) == [(4, 4), (3, 4)]  # 4.0 beats 4 + 2 + 1 = 4.2
    linear = linear_costs((1, 2, 4))  # before anything is measured: exact covers, fewest launches
    assert cheapest_cover(4, linear) == [(4, 4)] and cheapest_cover(3, linear) == [(2, 2), (1, 1)]
    assert cheapest_cover(3, linear_costs((2, 4))) == [(3, 4)]  # no exact cover: the one padded launch
    assert cheapest_cover(0, gpu) == []


def test_rows_are_cut_by_cost_on_the_fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Batch sizes (1, 4): 3 rows run as one padded launch of 4 where that costs less (a GPU), as three launches of
    1 where it does not (a CPU); measured costs replace the default."""
    fake_trt.install(monkeypatch)
    try:
        from lcmtrt.runtime.backends.tensorrt import TensorRTBackend

        bundle = fake_trt.pipeline_bundle(tmp_path, batch_sizes=(1, 4))
        pipeline = Pipeline(bundle, TensorRTBackend(bundle))
        rows = pipeline.prepare(["a fox", "a cat", "a fox"], 0)
        pipeline.batch_costs = {1: 1.0, 4: 1.5}
        assert pipeline.run(rows).batches == [4]
        pipeline.batch_costs = {1: 1.0, 4: 4.5}
        assert pipeline.run(rows).batches == [1, 1, 1]
        measured = pipeline.measure_batch_costs(repeats=1)
        assert set(measured) == {1, 4} and all(seconds > 0 for seconds in measured.values())
        assert pipeline.batch_costs == measured
    finally:
        sys.modules.pop("lcmtrt.runtime.backends.tensorrt", None)


@pytest.fixture(scope="module")
def pipeline(tiny_sd15_bundle: Path) -> Pipeline:
    return Pipeline.load(tiny_sd15_bundle)


def test_cut_and_padding_do_not_change_images(pipeline: Pipeline) -> None:
    """The tiny bundle (sizes 1, 2) on ONNX Runtime: two requests' rows split into two launches of 1, and one row
    padded into a launch of 2, give each row the bits it has alone."""
    requests = [(["a red fox"], 11), (["a blue cat"], 12)]
    alone = [pipeline.generate(prompts, seed=seed).images[0] for prompts, seed in requests]
    rows = PreparedRows.join([pipeline.prepare(prompts, seed) for prompts, seed in requests])
    try:
        pipeline.batch_costs = {1: 1.0, 2: 3.0}  # a launch of 2 costs more than two of 1
        split = pipeline.run(rows)
        assert split.batches == [1, 1]
        pipeline.batch_costs = {1: 2.0, 2: 1.0}  # a launch of 2 costs less than one of 1
        padded = pipeline.run(rows.take(1, 2))
        assert padded.batches == [2]
    finally:
        pipeline.batch_costs = {1: 1.0, 2: 2.0}
    np.testing.assert_array_equal(split.images, np.stack(alone))
    np.testing.assert_array_equal(padded.images[0], alone[1])


# ---- the batcher, over a fake pipeline: a row's image is its id, launches are cut as told -----------------------

PLAN = step_plan(SchedulerConfig(), 4)


def rows_of(ids: list[int]) -> PreparedRows:
    n = len(ids)
    return PreparedRows(BatchKey(PLAN, False, False), {"row": np.asarray(ids, np.int32)}, frozenset(),
                        [np.zeros((n, 1), np.float32)], np.zeros((n, 4, 1), np.float32), None, {})


class FakePipeline:
    """run_pieces cuts rows into launches of `cut`; each image is filled with its row's id. `fail_on` makes the
    launch holding that id raise; `before_launch(i)` is called as launch i starts."""

    def __init__(self, cut: int, fail_on: int | None = None, before_launch=None):
        self.cut, self.fail_on, self.before_launch = cut, fail_on, before_launch
        self.launches: list[list[int]] = []

    def run_pieces(self, rows: PreparedRows):
        ids = rows.inputs["row"]
        for start in range(0, len(rows), self.cut):
            chunk = ids[start:start + self.cut]
            self.launches.append(chunk.tolist())
            if self.before_launch is not None:
                self.before_launch(len(self.launches))
            if self.fail_on in chunk:
                raise RuntimeError(f"launch {len(self.launches)} failed")
            images = np.broadcast_to(chunk[:, None, None, None], (len(chunk), 2, 2, 3)).astype(np.uint8)
            yield start, Generation(images, np.zeros((len(chunk), 1)), [], [], "numpy", 0.5, [self.cut])

    def run(self, rows: PreparedRows) -> Generation:  # the whole batch at once, as batchers before run_pieces ran it
        pieces = [done for _, done in self.run_pieces(rows)]
        return Generation(np.concatenate([p.images for p in pieces]), np.zeros((len(rows), 1)), [], [], "numpy",
                          sum(p.engine_seconds for p in pieces), [b for p in pieces for b in p.batches])


def serve_all(fake: FakePipeline, requests: list[list[int]], max_batch: int,
              jobs: list[Job] | None = None) -> tuple[list[Job], list[BatchStats]]:
    """Queue every request before the worker starts (so batches are deterministic), run them all, and return the
    jobs (appended to `jobs` when given, so a fake can look at them while it runs) and the batches' stats."""
    loop, stats, jobs = asyncio.new_event_loop(), [], [] if jobs is None else jobs
    batcher = Batcher("fake", lambda: fake, BatcherConfig(max_batch, 0.0, 64), stats.append,
                      company_coming=lambda: False)
    try:
        jobs += [batcher.submit(rows_of(ids), loop) for ids in requests]
        batcher.start()
        loop.run_until_complete(asyncio.wait([job.future for job in jobs], timeout=120))
        batcher.stop()
        batcher.join(60)
    finally:
        loop.close()
    assert all(job.future.done() for job in jobs)
    return jobs, stats


def images_of(job: Job) -> list[int]:
    return job.future.result()[:, 0, 0, 0].tolist()


def test_request_is_answered_when_its_own_rows_are_done() -> None:
    """A (1 image) and B (1 image) share a batch cut into two launches: A is answered before B's launch starts."""
    ended: dict[int, tuple[bool, bool]] = {}
    jobs: list[Job] = []
    fake = FakePipeline(1, before_launch=lambda i: ended.__setitem__(i, (jobs[0].ended, jobs[1].ended)))
    serve_all(fake, [[10], [20]], 2, jobs)
    assert fake.launches == [[10], [20]]
    assert ended == {1: (False, False), 2: (True, False)}  # A answered while B's launch was still to run
    assert [images_of(job) for job in jobs] == [[10], [20]]
    assert jobs[0].batch_images == jobs[1].batch_images == [2]  # images in the batch it was merged into
    assert (jobs[0].engine_seconds, jobs[1].engine_seconds) == (0.5, 1.0)  # the launches until its rows were done


def test_request_split_over_two_batches_beside_others() -> None:
    """Batches of 2: A (1) and B's first row; B's other two; C alone. Every image lands in its request, in order."""
    fake = FakePipeline(2)
    jobs, stats = serve_all(fake, [[10], [20, 21, 22], [30]], max_batch=2)
    assert fake.launches == [[10, 20], [21, 22], [30]]
    assert [images_of(job) for job in jobs] == [[10], [20, 21, 22], [30]]
    assert [s.images for s in stats] == [2, 2, 1]
    assert [job.batch_images for job in jobs] == [[2], [2, 2], [1]]
    assert [job.engine_seconds for job in jobs] == [0.5, 1.0, 0.5]
    assert all(job.finished == len(job.rows) and job.ended for job in jobs)


def test_failed_launch_fails_only_the_requests_it_held() -> None:
    """A batch of A (1) and B (2 rows) cut into launches of 1: B's first launch fails. A, done before it, keeps its
    image; B fails with the error (its queued row too); C, queued behind, is served: the worker lives on."""
    fake = FakePipeline(1, fail_on=20)
    jobs, stats = serve_all(fake, [[10], [20, 21], [30]], max_batch=2)
    assert images_of(jobs[0]) == [10]
    with pytest.raises(RuntimeError, match="launch 2 failed"):
        jobs[1].future.result()
    assert images_of(jobs[2]) == [30]
    assert fake.launches == [[10], [20], [30]]  # B's second row never ran
    assert [s.images for s in stats] == [1]  # only the batch that completed is counted
