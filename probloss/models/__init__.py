"""Encoders: image towers ("vit", "resnet", "timm:<name>") and text towers ("transformer", "cbow",
"hf:<name or folder>") registered in ``probloss.ENCODERS``, the tokenizers, and the dual encoder with optional
log-std heads and tower locking.

    from probloss.models import build_tokenizer, build_dual_encoder
    tok = build_tokenizer("word", vocab=caption_words(), max_len=16)   # probloss.data.shapes.caption_words
    model = build_dual_encoder(cfg, vocab_size=tok.vocab_size, max_len=tok.max_len, image_size=32, log_std=True)
    emb = model(images, tok(captions))          # Embeddings
    value = loss(*emb.loss_args())
"""

from probloss.models.dual import DualEncoder, Embeddings, LogStdHead, build_dual_encoder
from probloss.models.tokenizer import ByteTokenizer, Tokenizer, WordTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer", "DualEncoder", "Embeddings", "LogStdHead", "Tokenizer", "WordTokenizer",
    "build_dual_encoder", "build_tokenizer",
]
