"""Tokenizers: shapes, padding, EOS, truncation, and the shapes vocabulary covering every caption."""

import pytest
import torch

from probloss.data.shapes import caption_words, generate_sample
from probloss.models import build_tokenizer


def test_byte_tokenizer():
    tok = build_tokenizer("byte", max_len=8)
    out = tok(["ab", "", "ü" * 10])
    assert out.dtype == torch.long and out.shape == (3, 8)
    assert tok.pad_id == 0 and tok.vocab_size == 259
    assert out[0].tolist() == [ord("a") + 3, ord("b") + 3, tok.eos_id] + [0] * 5
    assert out[1].tolist() == [tok.eos_id] + [0] * 7  # an empty text is still one EOS
    assert out[2, -1] == tok.eos_id and (out[2] != 0).all()  # truncated, EOS kept
    assert int(out.max()) < tok.vocab_size
    assert tok("ab").shape == (1, 8)


def test_word_tokenizer_and_vocab():
    tok = build_tokenizer("word", vocab=caption_words(), max_len=6)
    assert tok.vocab == caption_words()
    out = tok(["A Red, circle!", "a zebra"])
    ids = tok.ids
    assert out[0].tolist() == [ids["a"], ids["red"], ids["circle"], tok.eos_id, 0, 0]
    assert out[1, 1] == 2  # unknown word
    custom = build_tokenizer("word", vocab=["cat", "dog"], max_len=4)
    assert custom.vocab_size == 5 and custom(["dog cat"])[0].tolist() == [4, 3, 1, 0]
    with pytest.raises(ValueError, match="kind"):
        build_tokenizer("bpe")


def test_every_shapes_caption_fits_16_word_tokens():
    tok = build_tokenizer("word", vocab=caption_words(), max_len=16)
    for index in range(300):
        _, _, meta = generate_sample(1, index)
        texts = meta["captions"] + [t for t in meta["negatives"].values() if t]
        out = tok(texts)
        assert (out != 2).all(), texts  # no unknown words
        assert ((out == tok.eos_id).sum(1) == 1).all(), texts  # nothing truncated
