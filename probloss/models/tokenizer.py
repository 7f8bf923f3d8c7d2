"""Tokenizers that need no downloads: byte-level (any UTF-8 text) and word-level (a fixed vocabulary).

Both map ``list[str] -> LongTensor (B, max_len)``: token ids, then one EOS, then padding with id 0. Text longer
than ``max_len - 1`` tokens is cut so the EOS always survives (the Transformer text tower pools at the EOS).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    """Base: subclasses implement :meth:`encode` (one string -> ids without EOS)."""

    pad_id = PAD_ID
    eos_id = EOS_ID
    vocab_size: int

    def __init__(self, max_len: int = 16):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (at least one token and the EOS), got {max_len}")
        self.max_len = max_len

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Tokenise a batch of strings (a single string gives a batch of one) -> (B, max_len) long."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)[: self.max_len - 1] + [self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, max_len={self.max_len})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted past the special ids: vocab_size 259 (pad 0, eos 1, unk 2 unused, bytes 3..258)."""

    vocab_size = 256 + 3

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


class WordTokenizer(Tokenizer):
    """Lower-cased words (``\\w+``; punctuation dropped) looked up in ``vocab``; unknown words -> unk (2).

    Args:
        vocab: the words, ids 3.. in this order.
        max_len: output length including the EOS.
    """

    _word = re.compile(r"\w+")

    def __init__(self, vocab: Sequence[str], max_len: int = 16):
        super().__init__(max_len)
        self.vocab = list(vocab)
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("word vocabulary has duplicates")
        self.ids = {w: i + 3 for i, w in enumerate(self.vocab)}
        self.vocab_size = len(self.vocab) + 3

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, UNK_ID) for w in self._word.findall(text.lower())]


def shapes_vocab() -> list[str]:
    """The words of the shapes caption grammar (sorted), for ``build_tokenizer("word")``."""
    from probloss.data.shapes import caption_words

    return caption_words()


def build_tokenizer(kind: str = "byte", max_len: int | None = 16, vocab: Sequence[str] | None = None,
                    allow_download: bool = False) -> Tokenizer:
    """A tokenizer by kind.

    Args:
        kind: "byte" (any UTF-8 text; a shapes L3 caption needs max_len ~ 80), "word" (fixed vocabulary;
            every shapes caption fits in 16 tokens) or "hf:<name or folder>" (a Hugging Face text tower's own,
            probloss/models/towers.py).
        max_len: tokens per text including the EOS (SigLIP uses 16); None only for "hf:" (its own maximum).
        vocab: word list for "word"; default :func:`shapes_vocab`.
        allow_download: "hf:" names that are not in the local cache may be downloaded.
    """
    if kind.startswith("hf:"):
        from probloss.models.towers import HFTokenizer

        return HFTokenizer(kind[len("hf:"):], max_len, allow_download)
    if max_len is None:
        raise ValueError(f"the {kind} tokenizer needs data.max_len (null is for hf: tokenizers)")
    if kind == "byte":
        if vocab is not None:
            raise ValueError("the byte tokenizer takes no vocab")
        return ByteTokenizer(max_len)
    if kind == "word":
        return WordTokenizer(shapes_vocab() if vocab is None else vocab, max_len)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'byte', 'word' or 'hf:<name or folder>'")
