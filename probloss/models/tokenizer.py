"""Tokenizers: byte-level (any UTF-8 text), word-level (a fixed vocabulary, handed in: the shapes data's is
``probloss.data.shapes.caption_words()``) and a Hugging Face model's own (``hf:<name>``, the towers extra).

Both map ``list[str] -> LongTensor (B, max_len)``: token ids, then one EOS, then padding with id 0. Text longer
than ``max_len - 1`` tokens is cut so the EOS always survives (the Transformer text tower pools at the EOS).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from probloss.models.hub import from_pretrained, hf_max_len, import_transformers

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
PAD = -1  # padding in the ids of an HFTokenizer: not a token id (see HFTokenizer)


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


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer behind probloss's ``list[str] -> (B, max_len)`` contract.

    Special tokens are the model's own ([CLS] ... [SEP], <s> ... </s>); padding is -1, not the model's pad id:
    some models pad with a real token (CLIP pads with its end token), and the tower needs to tell them apart.
    """

    pad_id = PAD

    def __init__(self, name: str, max_len: int | None = None, allow_download: bool = False):
        transformers = import_transformers(f"hf:{name}")
        self.tokenizer = from_pretrained(transformers.AutoTokenizer, name, allow_download, "tokenizer")
        own = hf_max_len(name, allow_download, self.tokenizer)
        if max_len is not None and max_len > own:
            raise ValueError(f"data.max_len={max_len} is longer than the {own} tokens of hf:{name} (null: its own)")
        super().__init__(int(max_len or own))
        self.name = name
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=self.max_len)["input_ids"]

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return enc["input_ids"].long().masked_fill(enc["attention_mask"] == 0, PAD)


def build_tokenizer(kind: str = "byte", max_len: int | None = 16, vocab: Sequence[str] | None = None,
                    allow_download: bool = False) -> Tokenizer:
    """A tokenizer by kind.

    Args:
        kind: "byte" (any UTF-8 text; a shapes L3 caption needs max_len ~ 80), "word" (fixed vocabulary;
            every shapes caption fits in 16 tokens) or "hf:<name or folder>" (a Hugging Face text tower's own,
            probloss/models/towers.py).
        max_len: tokens per text including the EOS (SigLIP uses 16); None only for "hf:" (its own maximum).
        vocab: the word list of "word" (required; the shapes captions': ``probloss.data.shapes.caption_words()``).
        allow_download: "hf:" names that are not in the local cache may be downloaded.
    """
    if kind.startswith("hf:"):
        return HFTokenizer(kind[len("hf:"):], max_len, allow_download)
    if max_len is None:
        raise ValueError(f"the {kind} tokenizer needs data.max_len (null is for hf: tokenizers)")
    if kind == "byte":
        if vocab is not None:
            raise ValueError("the byte tokenizer takes no vocab")
        return ByteTokenizer(max_len)
    if kind == "word":
        if vocab is None:
            raise ValueError("the word tokenizer needs its vocabulary: build_tokenizer('word', vocab=[...]), e.g. "
                             "probloss.data.shapes.caption_words()")
        return WordTokenizer(vocab, max_len)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'byte', 'word' or 'hf:<name or folder>'")
