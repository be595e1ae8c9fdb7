"""CLIP tokenizers: build the real CLIP BPE tokenizer offline, and export any CLIP tokenizer as tokenizer.json.

Torch-free; transformers is imported lazily inside the functions that need it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from lcmtrt.errors import UserError

VOCAB_ARCHIVE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77  # CLIP's text context length (max_position_embeddings)
TOKENIZER_JSON = "tokenizer.json"
_UNSET_MAX_LENGTH = 10**6  # transformers reports ~1e30 when a folder records no model_max_length


def clip_vocab_archive() -> Path:
    """The BPE merges archive shipped inside clip-anytorch or open_clip_torch, found without importing them."""
    for package in ("clip", "open_clip"):
        try:
            spec = importlib.util.find_spec(package)  # top-level find_spec does not import the package
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            archive = Path(location) / VOCAB_ARCHIVE
            if archive.is_file():
                return archive
    raise UserError("the offline CLIP vocabulary needs clip-anytorch: pip install --no-deps clip-anytorch")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable unicode mapping, in its canonical order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab_and_merges(archive: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """CLIP's 49408-token vocabulary and 48894 merges, exactly as OpenAI's SimpleTokenizer builds them."""
    lines = gzip.decompress((archive or clip_vocab_archive()).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header; the same slice as OpenAI's simple_tokenizer
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise UserError(f"{archive} is not the CLIP vocabulary ({len(vocab)} tokens, expected {CLIP_VOCAB_SIZE})")
    return vocab, merges


def write_clip_tokenizer(dest: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Save the real CLIP tokenizer at dest, loadable with CLIPTokenizer.from_pretrained like a hub `tokenizer/` folder.

    pad_token "<|endoftext|>" is SD1.5's and SDXL's tokenizer; "!" is SDXL's tokenizer_2.
    """
    from transformers import CLIPTokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    # vocab.json + merges.txt as in hub checkpoints, so both slow (transformers 4) and fast loaders work
    vocab_file, merges_file = dest / "vocab.json", dest / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)
    tokenizer.save_pretrained(str(dest))
    return dest


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    """The tokenizers-library json of a transformers tokenizer (fast/backed ones directly, slow ones converted)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # transformers 4 slow CLIPTokenizer: round-trip through its files into the fast class
        from transformers import CLIPTokenizerFast

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            backend = CLIPTokenizerFast.from_pretrained(tmp).backend_tokenizer
    return json.loads(backend.to_str())


def export_tokenizer(source_dir_or_tokenizer: Any, dest_dir: Path) -> tuple[str, int, int]:
    """Write dest_dir/tokenizer.json for the runtime; returns (file name, pad id, model_max_length)."""
    if isinstance(source_dir_or_tokenizer, (str, Path)):
        from transformers import CLIPTokenizer

        source = Path(source_dir_or_tokenizer)
        if not source.is_dir():
            raise UserError(f"tokenizer folder {source} does not exist")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(source))
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"cannot load a CLIP tokenizer from {source} ({type(e).__name__}: {e})") from None
    else:
        tokenizer = source_dir_or_tokenizer
    if tokenizer.pad_token_id is None:
        raise UserError("the CLIP tokenizer has no pad token; diffusers pipelines need one")
    data = _backend_json(tokenizer)
    data["padding"] = None  # the runtime sets padding and truncation itself
    data["truncation"] = None
    max_length = int(tokenizer.model_max_length)
    if max_length > _UNSET_MAX_LENGTH:  # folder without tokenizer_config: CLIP's context is always 77
        max_length = CLIP_MAX_LENGTH
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / TOKENIZER_JSON).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return TOKENIZER_JSON, int(tokenizer.pad_token_id), max_length
