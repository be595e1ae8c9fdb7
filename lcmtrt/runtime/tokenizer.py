"""Prompts -> CLIP token ids, with the `tokenizers` library only (no torch, no transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from lcmtrt.errors import UserError

if TYPE_CHECKING:
    from lcmtrt.bundle import Bundle

REBUILD = "rebuild the bundle with `lcmtrt build-engines`"


class PromptTokenizer:
    """Matches transformers' `tokenizer(prompts, padding="max_length", max_length=77, truncation=True)` exactly."""

    def __init__(self, tokenizer_json: Path, pad_id: int, max_length: int = 77) -> None:
        path = Path(tokenizer_json)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} is missing; {REBUILD}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exception subclasses for parse errors
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"tokenizer file {path} is corrupt ({reason}); {REBUILD}") from None
        pad_token = self._tok.id_to_token(pad_id)
        if pad_token is None:
            raise UserError(f"pad id {pad_id} is not in the vocabulary of {path}; {REBUILD}")
        self.pad_id = pad_id
        self.max_length = max_length
        # configured once: right truncation keeps BOS and the final EOS (special tokens count toward max_length)
        self._tok.enable_truncation(max_length=max_length)
        # fixed-length right padding, like padding="max_length"
        self._tok.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token, length=max_length)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, prompts: list[str]) -> np.ndarray:
        """int32 ids of shape [len(prompts), max_length]."""
        if isinstance(prompts, str):  # a bare string would be tokenized character by character
            prompts = [prompts]
        ids = np.zeros((len(prompts), self.max_length), dtype=np.int32)
        for row, enc in enumerate(self._tok.encode_batch(list(prompts), add_special_tokens=True)):
            ids[row] = enc.ids
        return ids


def load_tokenizers(bundle: Bundle) -> list[PromptTokenizer]:
    """One PromptTokenizer per bundle.text entry (SD1.5: one, SDXL: two)."""
    text = bundle.text
    if len(text.tokenizers) != len(text.pad_ids):
        raise UserError(f"bundle.json has {len(text.tokenizers)} tokenizers, {len(text.pad_ids)} pad ids; {REBUILD}")
    return [PromptTokenizer(bundle.root / rel, pad, text.max_length) for rel, pad in zip(text.tokenizers, text.pad_ids)]
