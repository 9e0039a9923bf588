"""Data: the embedded stdlib corpus, tokenizers, packing, and Grain batches with exact resume;
SFT formats (`formats`) and built-in verifiable tasks (`tasks`)."""
from jaxlm.data import formats, tasks
from jaxlm.data.corpus import (
    Corpus,
    bits_to_nats,
    nats_to_bits,
    split_documents,
    stdlib_documents,
    unigram_entropy_bits,
    unigram_entropy_nats,
)
from jaxlm.data.pipeline import build_lm_data
from jaxlm.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "bits_to_nats",
    "formats",
    "build_lm_data",
    "load_tokenizer",
    "nats_to_bits",
    "split_documents",
    "stdlib_documents",
    "tasks",
    "unigram_entropy_bits",
    "unigram_entropy_nats",
]
