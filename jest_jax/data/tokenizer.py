"""Text tokenizers and the text styles: how a caption becomes `text_len` token ids.

Style "jest" (the default): id 0 is always padding, so models can mask on `tokens != 0`;
SentencePiece ids are shifted by one to make room for it, EOS is appended (and kept when
the caption is truncated), the case is kept. Styles "siglip" and "siglip2" are the text
preprocessing of big_vision's SigLIP and SigLIP 2 checkpoints (docs/pretrained.md): the
model's own ids (a checkpoint's embedding rows are indexed by them), the caption
lower-cased, EOS appended and kept on truncation ("sticky"), padded with EOS ("siglip",
as its c4-en configs do) or with the model's pad id ("siglip2", Gemma's pad 0).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from jest_jax import files

PAD_ID = 0
BYTES = "bytes"  # the tokenizer spec of the byte tokenizer; anything else is a model path
TEXT_STYLES = ("jest", "siglip", "siglip2")


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
    """A SentencePiece model, in one of `TEXT_STYLES` (the module docstring says how)."""

    def __init__(self, model_path: str, style: str = "jest"):
        import sentencepiece  # imported lazily: only real runs need it

        if not files.is_file(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        if style not in TEXT_STYLES:
            raise ValueError(f"text style must be one of {list(TEXT_STYLES)}, got {style!r}")
        # Read through the file layer (a local path or gs://), handed over as bytes.
        self._sp = sentencepiece.SentencePieceProcessor(
            model_proto=files.read_bytes(model_path))
        self.style = style
        eos = self._sp.eos_id()
        if style == "jest":
            self.vocab_size = self._sp.get_piece_size() + 1
            self._shift, self._eos = 1, (eos + 1 if eos >= 0 else None)
            self._pad = PAD_ID
            return
        if eos < 0:
            raise ValueError(f"the SentencePiece model {model_path} has no EOS piece, which "
                             f"text style {style!r} ends every caption with")
        self.vocab_size = self._sp.get_piece_size()
        self._shift, self._eos = 0, eos
        self._pad = eos if style == "siglip" else max(self._sp.pad_id(), 0)

    def encode(self, text: str | bytes, length: int) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if self.style != "jest":
            # big_vision's tf.strings.lower lower-cases ASCII letters only ("ÉCOLE" ->
            # "École"); str.lower would also change the non-ASCII ones
            text = text.encode("utf-8").lower().decode("utf-8")
        ids = [i + self._shift for i in self._sp.encode(text)]
        ids = ids[: length - 1] + [self._eos] if self._eos is not None else ids[:length]
        out = np.full((length,), self._pad, np.int32)
        out[: len(ids)] = ids
        return out


def make_tokenizer(spec: str, style: str = "jest") -> Tokenizer:
    """`"bytes"` for the byte tokenizer, else a path to a SentencePiece `.model` file,
    read in text `style`."""
    if spec == BYTES:
        if style != "jest":
            raise ValueError(f"text style {style!r} needs a SentencePiece model, not {BYTES!r}")
        return ByteTokenizer()
    return SentencePieceTokenizer(spec, style)
