"""The timestep and guidance embeddings the runtime computes on the host in fp32 (runtime/embeddings.py) against
diffusers' own functions, and the denoise graph that takes them as inputs instead of computing them in-graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline
from diffusers.models.embeddings import Timesteps, get_timestep_embedding

from lcmtrt.bundle import load_bundle
from lcmtrt.errors import UserError
from lcmtrt.export.graphs import checked_time_embedding_spec, guidance_embedding_spec, time_embedding_spec
from lcmtrt.runtime.embeddings import guidance_embedding, time_embedding
from lcmtrt.runtime.pipeline import Pipeline
from lcmtrt.runtime.scheduler import step_plan

TIMESTEPS = np.array([999, 759, 499, 259, 19, 1, 0])
ULP_AT_ONE = 2.0**-23  # sin/cos lie in [-1, 1]: two implementations may differ by an ulp or two there


@pytest.mark.parametrize("dim, flip, shift", [(320, True, 0.0), (32, True, 0.0), (33, False, 1.0), (256, False, 1.0)])
def test_time_embedding_is_diffusers(dim: int, flip: bool, shift: float) -> None:
    spec = checked_time_embedding_spec(Timesteps(dim, flip, shift))
    ours = time_embedding(TIMESTEPS, spec)
    theirs = get_timestep_embedding(torch.from_numpy(TIMESTEPS), dim, flip_sin_to_cos=flip,
                                    downscale_freq_shift=shift).numpy()
    assert ours.dtype == np.float32 and ours.shape == (len(TIMESTEPS), dim)
    assert np.abs(ours - theirs).max() <= 2 * ULP_AT_ONE


@pytest.mark.parametrize("dim", [256, 32, 7])
def test_guidance_embedding_is_diffusers(dim: int) -> None:
    scales = [1.0, 1.5, 2.0, 7.5, 8.0, 8.3, 14.0]
    ours = guidance_embedding(np.array(scales), guidance_embedding_spec(dim))
    # diffusers' LCM pipeline: w = guidance_scale - 1 (a Python float), then get_guidance_scale_embedding
    theirs = np.concatenate([LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor(scale - 1).repeat(1), embedding_dim=dim).numpy() for scale in scales])
    assert np.abs(ours - theirs).max() <= 2 * ULP_AT_ONE


def test_a_row_is_the_same_in_any_batch() -> None:
    spec = guidance_embedding_spec(32)
    together = guidance_embedding(np.array([8.0, 3.5, 1.2]), spec)
    for row, scale in enumerate([8.0, 3.5, 1.2]):
        assert np.array_equal(guidance_embedding(np.array([scale]), spec)[0], together[row])


def test_an_unknown_time_proj_is_refused() -> None:
    class LongPeriod(Timesteps):  # a time_proj that is not get_timestep_embedding with max_period 10000
        def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
            return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                          self.downscale_freq_shift, max_period=20000)

    assert time_embedding_spec(LongPeriod(32, True, 0.0)).dim == 32  # the spec alone cannot tell ...
    with pytest.raises(UserError, match="time_proj"):  # ... the check against the module can
        checked_time_embedding_spec(LongPeriod(32, True, 0.0))


def test_denoise_takes_the_embeddings_as_fp32_inputs(tiny_sd15_bundle: Path) -> None:
    """No sinusoid is left inside an SD1.5-class denoise graph, so no reduced precision can round its arguments."""
    bundle = load_bundle(tiny_sd15_bundle)
    inputs = {t.name: t for t in bundle.engines["denoise"].inputs}
    assert inputs["time_embedding"].dtype == inputs["guidance_embedding"].dtype == "float32"
    assert inputs["time_embedding"].shape == (bundle.embeddings["time_embedding"].dim,)  # one row per step
    assert "guidance_scale" not in inputs  # the embedding replaces it for LCM-distilled UNets
    graph = onnx.load(str(tiny_sd15_bundle / bundle.engines["denoise"].onnx), load_external_data=False).graph
    assert not {node.op_type for node in graph.node} & {"Sin", "Cos"}


def test_pipeline_feeds_each_step_its_embedding(tiny_sd15_bundle: Path) -> None:
    pipeline = Pipeline.load(tiny_sd15_bundle)
    plan = step_plan(pipeline.bundle.scheduler, 4)
    buffers = pipeline._store._time_embeddings(plan)
    expected = time_embedding(plan.timesteps, pipeline.bundle.embeddings["time_embedding"])
    assert [b.read().tolist() for b in buffers] == expected.tolist()
    rows = pipeline.prepare(["a", "b"], 0, None)
    assert rows.inputs["guidance_embedding"].shape == (2, pipeline.bundle.embeddings["guidance_embedding"].dim)


def test_bundles_without_host_embeddings_still_load(tiny_sd15_bundle: Path, tmp_path: Path) -> None:
    """Bundles built before compute the embeddings in their graphs: their denoise takes neither embedding and
    bundle.json has no `embeddings`, so the pipeline computes and binds none (the manifest is made so here)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_sd15_bundle, old)
    manifest = json.loads((old / "bundle.json").read_text())
    del manifest["embeddings"]
    denoise = manifest["engines"]["denoise"]
    denoise["inputs"] = [t for t in denoise["inputs"] if t["name"] not in ("time_embedding", "guidance_embedding")]
    (old / "bundle.json").write_text(json.dumps(manifest))
    bundle = load_bundle(old)
    assert bundle.embeddings == {}
    pipeline = Pipeline.load(old)
    assert pipeline._store._time_embeddings(step_plan(bundle.scheduler, 4)) == []
    assert "guidance_embedding" not in pipeline.prepare(["a"], 0, None).inputs


@pytest.mark.parametrize("damage", ["no embeddings", "wrong width"])
def test_embeddings_that_do_not_fit_the_graph_are_refused(tiny_sd15_bundle: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15_bundle, broken)
    manifest = json.loads((broken / "bundle.json").read_text())
    if damage == "no embeddings":
        del manifest["embeddings"]
    else:
        manifest["embeddings"]["time_embedding"]["dim"] = 7
    (broken / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="time_embedding.*rebuild"):
        load_bundle(broken)
