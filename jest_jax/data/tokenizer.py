"""Text tokenizers. Id 0 is always padding, so models can mask on `tokens != 0`."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

PAD_ID = 0
BYTES = "bytes"  # the tokenizer spec of the byte tokenizer; anything else is a model path


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str | bytes, length: int) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 2 (0 = pad, 1 = end of text); needs no vocabulary file."""

    EOS_ID = 1
    vocab_size = 256 + 2

    def encode(self, text: str | bytes, length: int) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data[: length - 1], dtype=np.uint8).astype(np.int32) + 2
        out = np.full((length,), PAD_ID, np.int32)
        out[: len(ids)] = ids
        out[len(ids)] = self.EOS_ID
        return out


class SentencePieceTokenizer:
    """A SentencePiece model; its ids are shifted by one so that 0 stays padding."""

    def __init__(self, model_path: str):
        import sentencepiece  # imported lazily: only real runs need it

        if not os.path.exists(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._sp.get_piece_size() + 1
        eos = self._sp.eos_id()
        self._eos = eos + 1 if eos >= 0 else None

    def encode(self, text: str | bytes, length: int) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = [i + 1 for i in self._sp.encode(text)]
        ids = ids[: length - 1] + [self._eos] if self._eos is not None else ids[:length]
        out = np.full((length,), PAD_ID, np.int32)
        out[: len(ids)] = ids
        return out


def make_tokenizer(spec: str) -> Tokenizer:
    """`"bytes"` for the byte tokenizer, else a path to a SentencePiece `.model` file."""
    if spec == BYTES:
        return ByteTokenizer()
    return SentencePieceTokenizer(spec)
