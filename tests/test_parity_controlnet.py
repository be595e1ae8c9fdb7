"""ControlNet fused into the denoise engine vs diffusers' StableDiffusionControlNetPipeline with LCMScheduler on
the tiny LCM UNet (guidance through the embedding, so no CFG and the control image is not doubled), with a canny
map of a real photograph as diffusers' guide computes it. `nets` 2 runs the same tests on a MultiControlNet bundle
(two tiny ControlNets) vs StableDiffusionControlNetPipeline(controlnet=[a, b]), with its own scale, start and end
per ControlNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_images_match, to_uint8
from lcmtrt.cli.main import main
from lcmtrt.errors import UserError
from lcmtrt.runtime.images import canny_map, fit_image
from lcmtrt.runtime.pipeline import Pipeline

PROMPT = "the mona lisa, oil painting"


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="module")
def control(photo: Path) -> np.ndarray:
    """The guide's canny map (thresholds 100/200) of the photo, resized to 64x64 like diffusers' preprocessing."""
    return fit_image(canny_map(Image.open(photo).convert("RGB")), 64, 64)


PRESETS = {1: ("tiny-sd15-canny", ["tiny-controlnet-sd15"]),
           2: ("tiny-sd15-multicontrol", ["tiny-controlnet-sd15", "tiny-controlnet-sd15-b"])}


@pytest.fixture(scope="module")
def flipped(control: np.ndarray) -> np.ndarray:
    """A second map: the MultiControlNet's second ControlNet sees other edges than the first."""
    return np.ascontiguousarray(control[:, ::-1])


def _models(build_tiny, backend: str, nets: int):
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

    from lcmtrt.export.models import resolve_model

    preset, names = PRESETS[nets]
    out = build_tiny(preset, backend)
    controlnets = [ControlNetModel.from_pretrained(resolve_model(name)) for name in names]
    reference = StableDiffusionControlNetPipeline.from_pretrained(
        resolve_model("tiny-sd15"), controlnet=controlnets[0] if nets == 1 else controlnets, safety_checker=None,
        requires_safety_checker=False)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return out, Pipeline.load(out), reference


@pytest.fixture(scope="module")
def models(build_tiny, backend: str):
    return _models(build_tiny, backend, 1)


@pytest.fixture(scope="module")
def multi_models(build_tiny, backend: str):
    return _models(build_tiny, backend, 2)


def run_reference(pipe, prompts, control, generator, scale, start, end, negative=None):
    """`control` is one map, or a list of one per ControlNet (scale, start and end then lists too)."""
    image = [Image.fromarray(c) for c in control] if isinstance(control, list) else Image.fromarray(control)
    with torch.no_grad():
        return to_uint8(pipe(prompts, image=image, num_inference_steps=4, guidance_scale=8.0,
                             controlnet_conditioning_scale=scale, control_guidance_start=start,
                             control_guidance_end=end, generator=generator, negative_prompt=negative,
                             output_type="np").images)


def case(request: pytest.FixtureRequest, nets: int, control: np.ndarray, flipped: np.ndarray) -> tuple:
    """The bundle's models and its maps: one, or one per ControlNet. Tests calling it take `backend` themselves, so
    that they are parametrized by backend like the fixtures they look up."""
    models = request.getfixturevalue("models" if nets == 1 else "multi_models")
    return (*models, control if nets == 1 else [control, flipped])


def per_net(nets: int, value: float, second: float) -> float | list[float]:
    """One value for one ControlNet; for two, the value and another for the second ControlNet."""
    return value if nets == 1 else [value, second]


@pytest.mark.parametrize("nets", [1, 2])
@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0)])
def test_matches_diffusers(request, backend: str, control, flipped, nets: int, scale: float, start: float,
                           end: float) -> None:
    _, ours, reference, maps = case(request, nets, control, flipped)
    # the second ControlNet: another scale and a window of its own (steps 1 and 2 of 4)
    scale, start, end = per_net(nets, scale, 0.8), per_net(nets, start, 0.25), per_net(nets, end, 0.75)
    result = ours.generate([PROMPT], seed=0, steps=4, guidance_scale=8.0,
                           control_images=[maps] if nets == 1 else maps, control_scale=scale, control_start=start,
                           control_end=end, negative_prompts=["blurry"])
    expected = run_reference(reference, [PROMPT], maps, torch.manual_seed(0), scale, start, end,
                             negative=["blurry"])
    assert_images_match(result.images, expected)


@pytest.mark.parametrize("nets", [1, 2])
def test_batch_rows_with_their_own_control(request, backend: str, control, flipped, nets: int) -> None:
    """One ControlNet: each row its own map. Several: their maps shared by both rows, each row its prompt and seed."""
    _, ours, reference, maps = case(request, nets, control, flipped)
    rows = [(PROMPT, control, 1), ("a lighthouse", flipped, 2)]
    result = ours.generate([PROMPT, "a lighthouse"], seed=[1, 2], steps=4,
                           control_images=[control, flipped] if nets == 1 else maps)
    for row, (prompt, image, seed) in enumerate(rows):
        scales = (1.0, 0.0, 1.0) if nets == 1 else ([1.0, 1.0], [0.0, 0.0], [1.0, 1.0])
        expected = run_reference(reference, [prompt], image if nets == 1 else maps, torch.manual_seed(seed), *scales)
        assert_images_match(result.images[row:row + 1], expected)


@pytest.mark.parametrize("nets", [1, 2])
def test_control_path_is_live(request, backend: str, control, flipped, nets: int) -> None:
    """A changed scale changes the image; with two ControlNets, the second's scale alone does."""
    _, ours, _, maps = case(request, nets, control, flipped)
    images = [ours.generate([PROMPT], seed=0, steps=4, control_images=[maps] if nets == 1 else maps,
                            control_scale=s if nets == 1 else [1.0, s]).images for s in (1.0, 0.5)]
    assert np.abs(images[0].astype(int) - images[1]).max() > 1


def test_control_errors(models, tiny_sd15_bundle: Path, control) -> None:
    _, ours, _ = models
    with pytest.raises(UserError, match="control image"):
        ours.generate([PROMPT], seed=0)
    with pytest.raises(UserError, match="without ControlNet"):
        Pipeline.load(tiny_sd15_bundle).generate([PROMPT], seed=0, control_images=[control])
    with pytest.raises(UserError, match="control-start"):
        ours.generate([PROMPT], seed=0, control_images=[control], control_start=0.6, control_end=0.5)


def test_cli_canny_from_a_photo(models, photo: Path, control, tmp_path: Path, capsys) -> None:
    out, ours, _ = models
    code = main(["-q", "infer", "--engines", str(out), PROMPT, "--control-image", str(photo), "--canny",
                 "--save-control", str(tmp_path / "canny.png"), "--seed", "0", "--grid",
                 "--output", str(tmp_path / "grid.png")])
    assert code == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "canny.png")), control)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (64, 128, 3)  # control map and result side by side
    expected = ours.generate([PROMPT], seed=0, control_images=[control]).images[0]
    np.testing.assert_array_equal(grid[:, 64:], expected)



def test_multicontrol_errors(models, multi_models, control, flipped) -> None:
    """A MultiControlNet takes one map per ControlNet and each setting once or once per ControlNet; one ControlNet
    takes one of each."""
    ours, maps = multi_models[1], [control, flipped]
    with pytest.raises(UserError, match=r"2 ControlNets: give one control image per ControlNet \(--control-image"):
        ours.generate([PROMPT], seed=0)  # none at all: plural, never "give its control image"
    with pytest.raises(UserError, match="2 ControlNets: give 2 control images .* not 1$"):
        ours.generate([PROMPT], seed=0, control_images=[control])
    with pytest.raises(UserError, match="not 3$"):  # 3 images: not one per ControlNet, even one per prompt
        ours.generate([PROMPT] * 3, seed=0, control_images=[control, flipped, control])
    with pytest.raises(UserError, match="3 control scales for 2 ControlNets; give one or one per ControlNet"):
        ours.generate([PROMPT], seed=0, control_images=maps, control_scale=[1.0, 0.5, 0.2])
    with pytest.raises(UserError, match="control-start 0.5 and --control-end 0.5"):
        ours.generate([PROMPT], seed=0, control_images=maps, control_start=[0.0, 0.5], control_end=0.5)
    with pytest.raises(UserError, match="2 control scales for 1 ControlNet; give one$"):
        models[1].generate([PROMPT], seed=0, control_images=[control], control_scale=[1.0, 0.5])


def test_bundle_records_the_controlnets(models, multi_models, tmp_path: Path) -> None:
    """One ControlNet keeps the denoise inputs bundles always had; several take control_image_0..N-1 and a
    [batch, N] control_scale, with the ControlNets in build order in bundle.json, checked on load."""
    import json
    import shutil

    from lcmtrt.bundle import load_bundle

    single, multi = load_bundle(models[0]), load_bundle(multi_models[0])
    tail = lambda bundle: [(t.name, t.shape) for t in bundle.engines["denoise"].inputs][-3:]
    assert tail(single)[-2:] == [("control_image", ("batch", 64, 64, 3)), ("control_scale", ("batch",))]
    assert single.sources["controlnet"] == "tiny-controlnet-sd15" and single.control_nets == 1
    assert tail(multi) == [("control_image_0", ("batch", 64, 64, 3)), ("control_image_1", ("batch", 64, 64, 3)),
                           ("control_scale", ("batch", 2))]
    assert multi.sources["controlnets"] == ["tiny-controlnet-sd15", "tiny-controlnet-sd15-b"]
    for damage, message in [(lambda d: d["sources"].update(controlnets=["a", "b", "c"]), "sources.controlnets"),
                            (lambda d: d["engines"]["denoise"]["inputs"][-1].update(shape=["batch"]),
                             "control_scale does not take one scale per row")]:
        copy = tmp_path / "damaged"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(multi_models[0], copy)
        manifest = json.loads((copy / "bundle.json").read_text())
        damage(manifest)
        (copy / "bundle.json").write_text(json.dumps(manifest))
        with pytest.raises(UserError, match=message):
            load_bundle(copy)


def test_cli_multicontrol(multi_models, control, flipped, tmp_path: Path, capsys) -> None:
    """infer: one --control-image per ControlNet in build order, shared by all images; --control-scale and
    --control-start/--control-end once or once per ControlNet; wrong counts and values are one line, exit 2."""
    out, ours, _ = multi_models
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, image in zip(paths, (control, flipped)):
        Image.fromarray(image).save(path)
    maps = [arg for path in paths for arg in ("--control-image", str(path))]
    base = ["-q", "infer", "--engines", str(out), PROMPT, "a lighthouse", "--seed", "0", *maps]
    code = main(base + ["--control-scale", "0.8,0.5", "--control-start", "0,0.25", "--control-end", "1",
                        "--output", str(tmp_path / "out.png")])
    assert code == 0, capsys.readouterr().err
    expected = ours.generate([PROMPT, "a lighthouse"], seed=0, control_images=[control, flipped],
                             control_scale=[0.8, 0.5], control_start=[0.0, 0.25], control_end=1.0).images
    for row in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"out-{row}.png")), expected[row])
    capsys.readouterr()
    refused = [(base[:-2], "give 2 control images"), (base + maps[:2], "not 3"),
               (base[:-4], "2 ControlNets: give one control image per ControlNet"),
               (base + ["--control-scale", "0.8,0.5,0.2"], "3 control scales for 2 ControlNets"),
               (base + ["--control-scale", "0.8,x"], "control-scale 'x' must be a finite number in"),
               (base + ["--control-scale", "0.8,11"], "control-scale 11.0 must be a finite number in"),
               (base + ["--control-end", "0.5,nan"], "control-end nan must be a finite number in")]
    for argv, message in refused:
        try:
            code = main(argv + ["--output", str(tmp_path / "refused.png")])
        except SystemExit as e:  # argparse refuses a flag's value itself
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("refused*"))


def test_api_control_image_list(models, multi_models, control, flipped) -> None:
    """/v1/images/generations: control_image as a list of base64 maps, one per ControlNet in build order; a count
    that does not fit the model is a 400 naming the count it takes; the settings are infer's."""
    pytest.importorskip("pydantic")
    import base64
    import io

    from lcmtrt.bundle import load_bundle
    from lcmtrt.serve.api import ApiError, GenerationRequest, ModelCard, prepare_arguments, validated

    def b64(image: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    multi, single = ModelCard("multi", load_bundle(multi_models[0])), ModelCard("one", load_bundle(models[0]))
    assert multi.describe()["controlnets"] == 2 and single.describe()["conditioning"] == "ControlNet"

    def arguments(card: ModelCard, **fields) -> dict:
        request = validated(GenerationRequest, {"prompt": PROMPT, **fields}, strict=True)
        return prepare_arguments(card, request, seed=0, max_n=4)

    settings = arguments(multi, control_image=[b64(control), b64(flipped)], control_scale=[0.8, 0.5],
                         control_start=0, control_end=[1, 0.75])["settings"]
    assert [np.array_equal(a, b) for a, b in zip(settings.control_images, [control, flipped])] == [True, True]
    assert (settings.control_scale, settings.control_start, settings.control_end) == ([0.8, 0.5], [0.0, 0.0],
                                                                                      [1.0, 0.75])
    assert len(arguments(single, control_image=b64(control))["settings"].control_images) == 1
    refused = [(multi, dict(control_image=b64(control)), "control_image", "a list of 2 base64 maps"),
               (multi, dict(control_image=[b64(control)] * 3), "control_image", "(got 3)"),
               (single, dict(control_image=[b64(control)] * 2), "control_image", "one base64 map"),
               (multi, dict(control_image=[b64(control)] * 2, control_scale=[1, 1, 1]), "control_scale",
                "list of 2 (got 3)"),
               (multi, dict(control_image=[b64(control)] * 2, control_start=[0.5, 0], control_end=[0.5, 1]),
                "control_start", "must be below"),
               (multi, dict(control_image=[b64(control)] * 2, control_scale=[1, 11]), "control_scale",
                "control_scale 11: must be a finite number in [0, 10]")]
    for card, fields, param, message in refused:
        with pytest.raises(ApiError) as refusal:
            arguments(card, **fields)
        error = refusal.value
        assert error.status == 400 and error.param.startswith(param) and message in error.message, error.message


def test_build_takes_several_controlnets(monkeypatch, tmp_path: Path, capsys) -> None:
    """build-engines --controlnet A --controlnet B replaces the preset's ControlNet(s) with a MultiControlNet in that
    order; a preset's controlnet may be a list; an empty list is refused in one line."""
    import lcmtrt.engines.build as build
    from lcmtrt.engines.preset import load_preset

    built = []
    monkeypatch.setattr(build, "build_bundle", lambda preset, out, **kwargs: built.append(preset))
    for given, expected in [(["a"], ("a",)), (["a", "b"], ("a", "b")), ([], ("tiny-controlnet-sd15",))]:
        argv = ["-q", "build-engines", "--preset", "tiny-sd15-canny", "--out", str(tmp_path / "x")]
        assert main(argv + [arg for name in given for arg in ("--controlnet", name)]) == 0
        assert built.pop().controlnets == expected
    assert load_preset("tiny-sd15-multicontrol").controlnets == ("tiny-controlnet-sd15", "tiny-controlnet-sd15-b")
    config = tmp_path / "empty.toml"
    config.write_text('model = "tiny-sd15"\nheight = 64\nwidth = 64\ncontrolnet = []\n')
    capsys.readouterr()
    assert main(["build-engines", "--config", str(config)]) == 2
    assert "must name one or more ControlNets" in capsys.readouterr().err
