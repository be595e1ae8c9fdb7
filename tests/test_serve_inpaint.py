"""Inpainting through `lcmtrt serve`: /v1/images/edits with OpenAI's mask (alpha 0 = repaint) gives `infer --mask`'s
pixels for the equivalent black-and-white mask, on a 9-channel UNet and on a blending 4-channel UNet; mask mistakes
get one-line 400s in OpenAI's error shape; inpainting and text-to-image rows never share an engine batch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_serve import Server, assert_openai_error, decoded, multipart, png_bytes, start_server, stop

from lcmtrt.cli.main import main
from lcmtrt.runtime.images import fit_image
from lcmtrt.runtime.inpaint import fit_mask
from lcmtrt.runtime.pipeline import Pipeline

SOURCE_SHAPE = (80, 96)  # not the bundles' 64x64: image and mask are fitted alike


@pytest.fixture(scope="module")
def inpaint_server(blend_bundle: Path, unet9_bundle: Path, tmp_path_factory) -> Server:
    # --batch-ms: a batch of 2 runs as one launch however fast this host ran each size at warm-up
    running = start_server(tmp_path_factory.mktemp("serve-inpaint"), "--engines", f"blend={blend_bundle}",
                           "--engines", f"unet9={unet9_bundle}", "--max-batch-wait-ms", "200", "--max-body-mb", "1",
                           "--batch-ms", "1=10,2=12")
    yield running
    stop(running)


def photo(seed: int = 0, shape: tuple[int, int] = SOURCE_SHAPE) -> np.ndarray:
    return (np.random.default_rng(seed).random((*shape, 3)) * 255).astype(np.uint8)


def openai_mask(repaint: np.ndarray) -> bytes:
    """OpenAI's mask: transparent (alpha 0) where `repaint`, opaque elsewhere; the colour is irrelevant."""
    rgba = np.zeros((*repaint.shape, 4), np.uint8)
    rgba[..., :3] = 90
    rgba[..., 3] = np.where(repaint, 0, 255)
    return png_bytes(rgba)


def box(top: int, left: int, bottom: int, right: int, shape: tuple[int, int] = SOURCE_SHAPE) -> np.ndarray:
    repaint = np.zeros(shape, bool)
    repaint[top:bottom, left:right] = True
    return repaint


def edit(server: Server, model: str, image: np.ndarray, mask: bytes | None, **fields: str):
    files = {"image": ("image.png", png_bytes(image)), **({"mask": ("mask.png", mask)} if mask is not None else {})}
    body, kind = multipart({"model": model, "prompt": "a red brick wall", **fields}, files)
    return server.request("POST", "/v1/images/edits", body, {"Content-Type": kind})


def test_models_say_which_inpaint(inpaint_server: Server) -> None:
    listing = inpaint_server.request("GET", "/v1/models")[2]["data"]
    assert {m["id"]: (m["inpaint"], m["img2img"]) for m in listing} == {"blend": ("blend", True),
                                                                         "unet9": ("unet9", False)}


@pytest.mark.parametrize("model,fields,cli", [
    ("unet9", {"seed": "5", "strength": "0.5"}, ["--seed", "5", "--strength", "0.5"]),
    ("blend", {"seed": "9", "n": "2"}, ["--seed", "9", "--num-images", "2"]),  # strength 1.0 with a mask, as infer
])
def test_masked_edit_equals_infer_mask(inpaint_server: Server, blend_bundle: Path, unet9_bundle: Path, model: str,
                                       fields: dict, cli: list, tmp_path: Path, capsys) -> None:
    source, repaint = photo(), box(10, 20, 60, 70)
    status, _, answer = edit(inpaint_server, model, source, openai_mask(repaint), **fields)
    assert status == 200, answer
    assert [item["seed"] for item in answer["data"]] == [int(fields["seed"])] * int(fields.get("n", 1))
    # the equivalent mask in infer's (and diffusers') convention: white repaints
    Image.fromarray(source).save(tmp_path / "source.png")
    Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8)).save(tmp_path / "mask.png")
    bundle = {"blend": blend_bundle, "unet9": unet9_bundle}[model]
    assert main(["-q", "infer", "--engines", str(bundle), "a red brick wall", "--image", str(tmp_path / "source.png"),
                 "--mask", str(tmp_path / "mask.png"), *cli, "--output", str(tmp_path / "out.png")]) == 0
    outputs = [tmp_path / "out.png"] if len(answer["data"]) == 1 else \
        [tmp_path / f"out-{i}.png" for i in range(len(answer["data"]))]
    for item, path in zip(answer["data"], outputs):
        np.testing.assert_array_equal(decoded(item), np.asarray(Image.open(path)))
    capsys.readouterr()


def test_openai_client_sends_the_mask(inpaint_server: Server) -> None:
    """The official SDK's images.edit(image=, mask=) is the multipart this server reads."""
    source, repaint = photo(1), box(0, 0, 40, 96)
    served = inpaint_server.client().images.edit(
        model="unet9", prompt="a red brick wall", image=("image.png", png_bytes(source), "image/png"),
        mask=("mask.png", openai_mask(repaint), "image/png"), extra_body={"seed": 3})
    status, _, answer = edit(inpaint_server, "unet9", source, openai_mask(repaint), seed="3")
    assert status == 200, answer
    np.testing.assert_array_equal(decoded(served.data[0]), decoded(answer["data"][0]))


def test_mask_mistakes_are_one_line_400s(inpaint_server: Server) -> None:
    source = photo()
    opaque = lambda value: png_bytes(np.full((*SOURCE_SHAPE, 4), (value, value, value, 255), np.uint8))  # noqa
    good = openai_mask(box(10, 20, 60, 70))
    cases = [  # (model, image, mask, extra fields, param, words in the message)
        ("blend", source, openai_mask(box(0, 0, 10, 10, (64, 64))), {}, "mask", ["64x64", "96x80"]),
        ("blend", source, b"not an image", {}, "mask", ["not a readable image"]),
        ("blend", source, opaque(0), {}, "mask", ["no fully transparent pixel"]),  # all black
        ("blend", source, opaque(255), {}, "mask", ["no fully transparent pixel"]),  # all white
        ("blend", source, png_bytes(np.full(SOURCE_SHAPE, 255, np.uint8)), {}, "mask", ["no alpha channel"]),
        ("unet9", np.full((1000, 1000, 3), 128, np.uint8), openai_mask(box(500, 500, 501, 501, (1000, 1000))), {},
         "mask", ["vanishes", "64x64"]),
        ("blend", source, good, {"img2img_mode": "lcm"}, "img2img_mode", ["does not apply"]),
        ("unet9", source, None, {}, "mask", ["9-channel", "only inpaints"]),
    ]
    for model, image, mask, fields, param, words in cases:
        status, _, answer = edit(inpaint_server, model, image, mask, **fields)
        assert_openai_error(status, answer, 400, param)
        message = answer["error"]["message"]
        assert "\n" not in message and all(word in message for word in words), (words, message)
        assert "BytesIO" not in message and " at 0x" not in message, message  # never an object's repr
    status, _, answer = inpaint_server.post_json({"model": "unet9", "prompt": "a cat"})
    assert_openai_error(status, answer, 400, None)
    assert "only inpaints" in answer["error"]["message"] and "/tmp" not in answer["error"]["message"], answer
    # fully transparent: repaint everything, as infer's all-white mask
    assert edit(inpaint_server, "unet9", source, openai_mask(np.ones(SOURCE_SHAPE, bool)), seed="1")[0] == 200


def test_inpainting_and_text_to_image_rows_never_share_a_batch(inpaint_server: Server, blend_bundle: Path) -> None:
    """On a blend bundle both kinds run on the same engines; concurrent requests of both kinds each equal their
    solo image (a mixed batch would fail: inpainting rows take inputs text-to-image rows lack)."""
    pipeline = Pipeline.load(blend_bundle)
    source = photo(2)
    masks = [box(0, 0, 40, 50), box(30, 40, 80, 96)]
    # a lone text-to-image request waits for company, and the inpainting requests on their way are none
    jobs = [("t2i", 0), ("inpaint", 0), ("inpaint", 1)]
    answers: dict[tuple, tuple] = {}

    def send(kind: str, i: int) -> None:
        if kind == "t2i":
            answers[kind, i] = inpaint_server.post_json({"model": "blend", "prompt": f"a boat {i}", "seed": 20 + i})
        else:
            answers[kind, i] = edit(inpaint_server, "blend", source, openai_mask(masks[i]), seed=str(30 + i))

    threads = [threading.Thread(target=send, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = 0
    for kind, i in jobs:
        status, headers, body = answers[kind, i]
        assert status == 200, body
        merged += headers["x-lcmtrt-batch-images"] != "1"
        if kind == "t2i":
            expected = pipeline.generate([f"a boat {i}"], seed=20 + i).images[0]
        else:
            bw = Image.fromarray(np.where(masks[i], 255, 0).astype(np.uint8)).convert("RGB")
            expected = pipeline.generate(["a red brick wall"], seed=30 + i, images=[fit_image(
                Image.fromarray(source), 64, 64)], masks=[fit_mask(bw, 64, 64)]).images[0]
        np.testing.assert_array_equal(decoded(body["data"][0]), expected)
    assert merged >= 2  # the inpainting requests shared a batch

