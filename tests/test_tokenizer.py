"""The runtime tokenizer against transformers' CLIPTokenizer, on the real CLIP BPE vocabulary (49408 tokens)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("transformers")

from lcmtrt.export.clip_tokenizer import clip_vocab_archive, export_tokenizer, write_clip_tokenizer
from lcmtrt.bundle import TextConfig
from lcmtrt.errors import UserError
from lcmtrt.runtime.tokenizer import PromptTokenizer, load_tokenizers

try:
    clip_vocab_archive()
except UserError as e:
    pytest.skip(str(e), allow_module_level=True)

LONG = " ".join(f"word{i}, a very detailed masterpiece" for i in range(40))
PROMPTS = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "a cat",
    "Hello, World! 1234 + 5.67 = ?? (test) [x] {y} #tag @user 'quoted' \"double\" it's we're",
    "MiXeD CaSe PROMPT with UPPER and lower",
    "   leading and trailing spaces   ",
    "multiple\n\nnewlines\tand\ttabs   and    spaces",
    "café naïve résumé Ångström façade",
    "東京の夜景, 高解像度 写真",
    "a dog 🐶 wearing sunglasses 😎🔥 at the beach 🏖️",
    "!!! wow!!! hello!",  # with pad "!" (SDXL tokenizer_2), "!" is a special token: id 0, not BPE "!</w>"
    "<|startoftext|> special tokens inside <|endoftext|> the text",
    LONG,
]


_REFERENCE: dict[Path, object] = {}


def reference(source: Path):
    """transformers' CLIPTokenizer loaded from the folder, as diffusers loads it (~0.4 s, so once per folder)."""
    from transformers import CLIPTokenizer

    if source not in _REFERENCE:
        _REFERENCE[source] = CLIPTokenizer.from_pretrained(str(source))
    return _REFERENCE[source]


def reference_ids(source: Path, prompts: list[str]) -> np.ndarray:
    """What diffusers' pipelines do: pad to 77 and truncate."""
    tok = reference(source)
    return np.array(tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids, dtype=np.int64)


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["pad_eos", "pad_bang"])
def tokenizers_pair(request, tmp_path_factory) -> tuple[Path, PromptTokenizer, int]:
    root = tmp_path_factory.mktemp("tok")
    source = write_clip_tokenizer(root / "tokenizer", pad_token=request.param)
    name, pad_id, max_length = export_tokenizer(source, root / "bundle")
    assert name == "tokenizer.json" and max_length == 77
    assert pad_id == (49407 if request.param == "<|endoftext|>" else 0)
    return source, PromptTokenizer(root / "bundle" / name, pad_id, max_length), pad_id


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_single_prompt_matches_transformers(tokenizers_pair, prompt: str) -> None:
    source, runtime, _ = tokenizers_pair
    ids = runtime.encode([prompt])
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    np.testing.assert_array_equal(ids, reference_ids(source, [prompt]))


def test_batch_matches_transformers(tokenizers_pair) -> None:
    source, runtime, _ = tokenizers_pair
    ids = runtime.encode(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, reference_ids(source, PROMPTS))


def test_truncation_keeps_eos(tokenizers_pair) -> None:
    source, runtime, pad_id = tokenizers_pair
    assert len(reference(source)(LONG).input_ids) > 77  # really longer than the context
    ids = runtime.encode([LONG])[0]
    assert ids[0] == 49406 and ids[76] == 49407
    assert 49407 not in ids[1:76] and pad_id not in ids[1:76]


def test_real_clip_ids(tokenizers_pair) -> None:
    _, runtime, pad_id = tokenizers_pair
    assert runtime.vocab_size == 49408
    ids = runtime.encode(["a cat"])[0]
    # real CLIP ids: "a</w>" = 320, "cat</w>" = 2368
    assert ids[:4].tolist() == [49406, 320, 2368, 49407]
    assert (ids[4:] == pad_id).all()


def test_hub_style_folder(tokenizers_pair) -> None:
    source, _, _ = tokenizers_pair
    vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert (source / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")


def test_export_strips_padding_and_truncation(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    source = write_clip_tokenizer(tmp_path / "tok")
    tok = CLIPTokenizer.from_pretrained(str(source))
    tok.backend_tokenizer.enable_padding(length=77, pad_id=49407, pad_token="<|endoftext|>")
    tok.backend_tokenizer.enable_truncation(max_length=77)
    export_tokenizer(tok, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["padding"] is None and data["truncation"] is None


def test_empty_batch(tokenizers_pair) -> None:
    assert tokenizers_pair[1].encode([]).shape == (0, 77)


def test_load_tokenizers(tokenizers_pair) -> None:
    source, runtime, pad_id = tokenizers_pair
    text = TextConfig(("tokenizer.json", "tokenizer.json"), (pad_id, pad_id), 77)
    bundle = SimpleNamespace(root=source.parent / "bundle", text=text)
    loaded = load_tokenizers(bundle)
    assert len(loaded) == 2
    np.testing.assert_array_equal(loaded[1].encode(["a cat"]), runtime.encode(["a cat"]))


def test_missing_tokenizer_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing") as info:
        PromptTokenizer(tmp_path / "nope.json", 49407)
    assert "\n" not in str(info.value)


def test_corrupt_tokenizer_is_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="corrupt") as info:
        PromptTokenizer(bad, 49407)
    assert "\n" not in str(info.value)


def test_missing_vocab_package_is_user_error(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install --no-deps clip-anytorch"):
        clip_vocab_archive()
