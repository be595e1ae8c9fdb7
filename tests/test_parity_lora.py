"""LoRAs fused at build time vs diffusers' load_lora_weights + set_adapters + fuse_lora, and classifier-free
guidance for base UNets (LCM-LoRA) vs StableDiffusion(XL)Pipeline with LCMScheduler, run here with the same seeds.
The tiny LCM-LoRAs are PEFT-format and the tiny style LoRAs Kohya-format (UNet and text encoders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_images_match, to_uint8
from lcmtrt.engines.build import build_bundle
from lcmtrt.engines.preset import load_preset
from lcmtrt.export.lora import LoraSpec, resolve
from lcmtrt.export.refit import apply_loras
from lcmtrt.cli.main import main
from lcmtrt.errors import UserError
from lcmtrt.runtime.pipeline import Pipeline

PROMPT = "papercut, a cute fox"
NEGATIVE = "blurry, low quality"


def reference_with_loras(preset_name: str, with_loras: bool = True):
    """diffusers' pipeline for the preset's model with its LoRAs loaded, weighted and fused the diffusers way."""
    from lcmtrt.export.reference import reference_pipeline

    preset = load_preset(preset_name)
    sources = {"model": preset.model, "loras": [spec.to_json() for spec in preset.loras] if with_loras else []}
    return reference_pipeline(sources, "sdxl" if "sdxl" in preset.model else "sd15", embedding=not preset.cfg)


@pytest.fixture(scope="module", params=["tiny-sd15-style", "tiny-lcm-lora-sd15", "tiny-lcm-lora-sdxl"])
def models(request, build_tiny, backend: str):
    return request.param, Pipeline.load(build_tiny(request.param, backend)), reference_with_loras(request.param)


def size(name: str) -> dict:
    return {"height": 64, "width": 48} if "sdxl" in name else {"height": 64, "width": 64}


# (guidance, negative prompt): LCM-distilled UNets take guidance through the embedding and ignore negatives;
# LCM-LoRA's recommended guidance is 1.0-2.0, with CFG above 1
CASES = {
    "tiny-sd15-style": [(8.0, None), (1.0, None)],
    "tiny-lcm-lora-sd15": [(1.0, None), (2.0, None), (1.0, NEGATIVE), (2.0, NEGATIVE)],
    "tiny-lcm-lora-sdxl": [(1.0, None), (2.0, None), (1.0, NEGATIVE), (2.0, NEGATIVE)],
}


def test_matches_diffusers(models) -> None:
    name, ours, reference = models
    for guidance, negative in CASES[name]:
        result = ours.generate([PROMPT], seed=0, steps=4, guidance_scale=guidance,
                               negative_prompts=[negative] if negative else None)
        kwargs = {"negative_prompt": [negative]} if negative else {}
        with torch.no_grad():
            expected = reference([PROMPT], num_inference_steps=4, guidance_scale=guidance,
                                 generator=torch.manual_seed(0), output_type="np", **size(name), **kwargs).images
        assert_images_match(result.images, to_uint8(expected))


def test_loras_and_guidance_change_the_image(models) -> None:
    """The LoRAs are live (the bundle differs from the plain base model) and CFG is live (guidance 2 != 1)."""
    name, ours, _ = models
    base = ours.generate([PROMPT], seed=0, steps=2, guidance_scale=1.0).images.astype(int)
    if name != "tiny-sd15-style":
        assert np.abs(ours.generate([PROMPT], seed=0, steps=2, guidance_scale=2.0).images - base).max() > 1
    plain = reference_with_loras(name, with_loras=False)
    with torch.no_grad():
        unfused = plain([PROMPT], num_inference_steps=2, guidance_scale=1.0, generator=torch.manual_seed(0),
                        output_type="np", **size(name)).images
    assert np.abs(to_uint8(unfused).astype(int) - base).max() > 1


def test_batch_with_cfg_equals_separate_calls(models) -> None:
    name, ours, reference = models
    if name == "tiny-sd15-style":
        return  # an LCM-distilled UNet runs no CFG: its batches are covered in test_parity_sd15
    prompts, seeds = [PROMPT, "a castle, watercolor"], [3, 4]
    result = ours.generate(prompts, seed=seeds, steps=4, guidance_scale=2.0, negative_prompts=[NEGATIVE])
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        with torch.no_grad():
            expected = reference([prompt], num_inference_steps=4, guidance_scale=2.0, negative_prompt=[NEGATIVE],
                                 generator=torch.manual_seed(seed), output_type="np", **size(name)).images
        assert_images_match(result.images[row:row + 1], to_uint8(expected))


def test_guidance_needs_a_cfg_bundle(lcmtrt_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "no-cfg"
    build_bundle(load_preset("tiny-lcm-lora-sd15").with_overrides(batch_sizes=(1,), cfg=False, img2img=False), out,
                 "onnxruntime", "fp32")
    pipeline = Pipeline.load(out)
    assert pipeline.bundle.guidance_mode == "none" and "denoise_cfg" not in pipeline.bundle.engines
    pipeline.generate([PROMPT], seed=0, steps=2, guidance_scale=1.0)
    with pytest.raises(UserError, match="rebuild it with --cfg"):
        pipeline.generate([PROMPT], seed=0, steps=2, guidance_scale=1.5)


def test_lora_arguments(tmp_path: Path, capsys) -> None:
    assert LoraSpec.parse("latent-consistency/lcm-lora-sdv1-5") == LoraSpec("latent-consistency/lcm-lora-sdv1-5")
    assert LoraSpec.parse("style.safetensors:0.8") == LoraSpec("style.safetensors", 0.8)
    assert LoraSpec.parse("C:/loras/a.safetensors") == LoraSpec("C:/loras/a.safetensors")
    assert resolve(LoraSpec("TheLastBen/Papercut_SDXL/papercut.safetensors")) == ("TheLastBen/Papercut_SDXL",
                                                                                  "papercut.safetensors")
    pickle = tmp_path / "style.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="pickle"):
        resolve(LoraSpec(str(pickle)))
    with pytest.raises(UserError, match="pickle"):
        resolve(LoraSpec("some/repo", weight_name="lora.bin"))
    code = main(["-q", "build-engines", "--preset", "tiny-sd15", "--lora", str(tmp_path / "missing.safetensors"),
                 "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "b").exists()


def test_lora_swap_without_rebuild(lcmtrt_cache: Path, tmp_path: Path) -> None:
    """A refittable bundle swaps A -> B -> A on one loaded pipeline: A again is bit-identical to A, and A and B
    match fresh builds of A and B."""
    from lcmtrt.export.lora import LoraSpec

    preset = load_preset("tiny-lcm-lora-sd15").with_overrides(batch_sizes=(1,), img2img=False)
    set_a = preset.loras
    set_b = (LoraSpec("tiny-lcm-lora-sd15", 1.0), LoraSpec("tiny-style-lora-sd15", 0.3))
    build_bundle(preset, tmp_path / "refit", "onnxruntime", "fp32", refittable=True)
    build_bundle(preset.with_overrides(loras=set_b), tmp_path / "fresh-b", "onnxruntime", "fp32")
    pipeline = Pipeline.load(tmp_path / "refit")
    assert pipeline.bundle.engines["denoise"].refit_weights
    run = lambda p: p.generate([PROMPT], seed=0, steps=4, guidance_scale=2.0, negative_prompts=[NEGATIVE]).images
    first_a = run(pipeline)
    apply_loras(pipeline, set_b)
    swapped_b = run(pipeline)
    apply_loras(pipeline, set_a)
    again_a = run(pipeline)
    np.testing.assert_array_equal(again_a, first_a)
    assert np.abs(swapped_b.astype(int) - first_a).max() > 1
    assert_images_match(swapped_b, run(Pipeline.load(tmp_path / "fresh-b")))
    build_bundle(preset, tmp_path / "fresh-a", "onnxruntime", "fp32")
    assert_images_match(first_a, run(Pipeline.load(tmp_path / "fresh-a")))
    # the same from the command line: the base model (no LoRA) for one run
    assert main(["-q", "infer", "--engines", str(tmp_path / "refit"), PROMPT, "--lora", "none", "--seed", "0",
                 "--guidance-scale", "1.0", "--output", str(tmp_path / "base.png")]) == 0


def test_swap_needs_a_refittable_bundle(models) -> None:
    _, ours, _ = models
    with pytest.raises(UserError, match="--refittable"):
        apply_loras(ours, [])


def _rss_mib() -> float:
    """Resident memory after a full collection, with freed heap returned to the system (so only live memory
    counts, not the allocator's free lists)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_swaps_keep_buffers_and_do_not_grow_memory(lcmtrt_cache: Path, tmp_path: Path) -> None:
    """Ten swaps on one pipeline: the same buffers and programs, one live session per engine, and resident memory
    within a few MiB; the image after ten swaps is still bit-identical."""
    import gc

    import onnxruntime as ort

    from lcmtrt.export.refit import fused_weights

    preset = load_preset("tiny-lcm-lora-sd15").with_overrides(batch_sizes=(1,), img2img=False)
    build_bundle(preset, tmp_path / "refit", "onnxruntime", "fp32", refittable=True)
    pipeline = Pipeline.load(tmp_path / "refit")
    run = lambda: pipeline.generate([PROMPT], seed=0, steps=2, guidance_scale=2.0, negative_prompts=[NEGATIVE]).images
    first = run()
    batches, programs = dict(pipeline._batches), dict(pipeline._programs)
    other = (LoraSpec("tiny-lcm-lora-sd15", 1.0), LoraSpec("tiny-style-lora-sd15", 0.3))
    apply_loras(pipeline, other)
    assert np.abs(run().astype(int) - first).max() > 1  # the swap is live on the kept bindings
    assert pipeline._batches == batches and pipeline._programs == programs
    assert all(pipeline._batches[k] is v for k, v in batches.items())
    sets = [fused_weights(pipeline.bundle, other), fused_weights(pipeline.bundle, preset.loras)]
    pipeline.backend.refit(sets[1])
    run()
    figures = [_rss_mib()]
    for i in range(10):
        pipeline.backend.refit(sets[i % 2])
        run()
        figures.append(_rss_mib())
    print("RSS MiB before and after each of 10 swaps:", " ".join(f"{x:.0f}" for x in figures))
    assert figures[-1] - figures[0] < 16, f"RSS grew by {figures[-1] - figures[0]:.1f} MiB over 10 swaps"
    sessions = [o for o in gc.get_objects()
                if type(o) is ort.InferenceSession and str(tmp_path) in str(o._model_path)]
    assert len(sessions) == len(pipeline.bundle.engines), "replaced sessions are still alive"
    np.testing.assert_array_equal(run(), first)
