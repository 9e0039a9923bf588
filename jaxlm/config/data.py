"""`data.*` (what training reads) and the data-stage sections `prepare.*`, `tokenizer.*`, `tokenize.*`."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from jaxlm.config.schema import check


@dataclasses.dataclass(frozen=True)
class MixSourceConfig:
    """One training source: a token-shard directory written by `jaxlm data tokenize`."""

    name: str = ""  # how weights, curricula and metrics name the source
    path: str = ""  # the shard directory (tokenize.out_dir)
    weight: float = 1.0  # mixture weight (normalised over the sources)
    heldout_path: str = ""  # token shards held out for this source (then all of `path` trains)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """A curriculum stage: `weights` ({source: weight}) until `until` (in data.curriculum_unit);
    the last stage may leave `until` out and runs on to the end."""

    until: Optional[int] = None  # the stage ends here (data.curriculum_unit); null: the last stage
    weights: dict = dataclasses.field(default_factory=dict)  # source name -> mixture weight in this stage


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # stdlib: the standard library's .py files in memory | shards: `sources`
    tokenizer: str = "byte"  # byte (UTF-8 bytes and jaxlm's specials), SentencePiece .model, tokenizer.json
    sources: tuple[MixSourceConfig, ...] = ()
    curriculum: tuple[StageConfig, ...] = ()  # empty: the sources' weights throughout
    curriculum_unit: str = "tokens"  # tokens | steps (concat packing) | examples
    objective: dict = dataclasses.field(default_factory=lambda: {"clm": 1.0})  # name -> weight
    packing: str = "auto"  # auto: concat for clm/fim objectives, first_fit otherwise
    lookahead: int = 256  # first_fit: examples packed together
    # first_fit rows for a decoder: true: each example's inputs (span corruption's corrupted text,
    # prefix LM's prefix, UL2's) attend both ways, a prefix decoder (rows carry prefix_mask) | false:
    # a causal decoder on the same tokens and loss targets (no prefix_mask). model.arch=encoder_decoder:
    # true (its encoder reads the inputs both ways)
    bidirectional_prefix: bool = True
    # concat: sequences are drawn in a random order within blocks of this many (each exactly
    # once per block); 1: in stream order. Small blocks keep a batch to a few documents for many
    # steps (train loss falls below held-out); the default covers 16.8M tokens at seq_len 256.
    shuffle_block: int = 65536
    fim_max_tokens: int = 0  # FIM: documents are cut into pieces this long, each FIM'd alone; 0: seq_len // 2
    heldout_fraction: float = 0.02  # of the documents (or tokens, heldout_split: tail) held out
    # of data.sources (stdlib: by a hash of each file's path): document: a hash of source name and
    # index | content: a hash of the document's tokens | tail: the last heldout_fraction of every
    # document (a source of one document: always tail)
    heldout_split: str = "document"
    max_documents: int = 0  # 0: all (per source)
    seed: int = 0  # the data order's seed (batch k is a function of it and k)


SPLITS = ("document", "paragraphs", "chunks")  # how `prepare` cuts a record's text into documents


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One raw-document source for `jaxlm data prepare`."""

    name: str = ""  # names the output file (OUT_DIR/NAME.jsonl) and the report's rows
    paths: tuple[str, ...] = ()  # files or globs
    format: str = "auto"  # auto (by suffix; .gz .zst .bz2 .xz read decompressed) | jsonl | parquet | text
    text_field: str = "text"  # the JSONL / Parquet field holding the text
    id_field: str = ""  # a field naming each document, kept in rejects.jsonl; "": none
    split: str = "document"  # document (a record is one) | paragraphs (blank-line separated) | chunks
    chunk_chars: int = 20_000  # split: chunks: pieces of at most this many characters, cut at breaks
    rules: Optional[dict] = None  # rule name -> params (or true); None: prepare.rules


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """`jaxlm data prepare`: filter, scrub and deduplicate raw documents, per source."""

    sources: tuple[SourceConfig, ...] = ()
    # filter and scrub rules in order, name -> params (or true): html, language, gopher_quality,
    # gopher_repetition, c4, fineweb, min_words, blocklist, pii, quality_classifier, perplexity
    rules: dict = dataclasses.field(default_factory=lambda: {
        "html": True, "gopher_quality": True, "gopher_repetition": True, "c4": True, "pii": True})
    exact_dedup: bool = True  # drop documents whose normalized text hashes alike
    minhash_dedup: bool = True  # drop near duplicates: MinHash LSH on word n-grams
    minhash_ngram: int = 5  # words per n-gram
    minhash_bands: int = 14  # LSH bands x rows = hashes per document
    minhash_rows: int = 8  # hashes per band: a pair shares a band with probability s^rows (s: Jaccard)
    suffix_dedup: bool = False  # exact repeated spans (Lee et al. 2022), on UTF-8 bytes
    suffix_min_len: int = 50  # shortest repeated span removed, in bytes
    max_chars: int = 1_000_000  # longer documents are counted and skipped
    # a source whose records are unusable as read (malformed, no text field, empty, too long) in
    # more than this fraction stops the run, as does a source with no usable record or none kept
    max_unusable: float = 0.5
    out_dir: str = "data/prepared"  # OUT_DIR/NAME.jsonl per source, report.json, report.txt, rejects.jsonl
    workers: int = 0  # map processes; 0: one per CPU core
    executor: str = "local"  # local (a process pool) | ray (prepare.ray_address; work dir on a shared filesystem)
    ray_address: str = ""  # "": a Ray instance started for the run | auto | ray://HOST:PORT
    task_mb: float = 8.0  # a map task reads a source's consecutive files until this many MiB
    write_rejects: bool = True  # RUN_DIR/rejects.jsonl: every dropped document with its reason


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """`jaxlm data tokenizer`: train SentencePiece with the special symbols reserved."""

    inputs: tuple[str, ...] = ()  # prepared JSONL (or text/Parquet) files or globs
    text_field: str = "text"  # the JSONL / Parquet field holding the text
    out: str = "data/tokenizer"  # model prefix: writes OUT.model and OUT.vocab
    vocab_size: int = 8192  # pieces, the reserved special symbols included
    model_type: str = "bpe"  # bpe | unigram
    n_sentinels: int = 100  # span-corruption sentinels reserved
    max_documents: int = 0  # 0: all


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """`jaxlm data tokenize`: tokenize documents in worker processes into ArrayRecord shards."""

    inputs: tuple[str, ...] = ()  # prepared JSONL (or text/Parquet) files or globs
    text_field: str = "text"  # the JSONL / Parquet field holding the text
    tokenizer: str = "data/tokenizer.model"  # a SentencePiece .model, or "byte"
    out_dir: str = "data/tokens"  # ArrayRecord shards and index.json: a data.sources[].path
    workers: int = 0  # 0: one per CPU core
    docs_per_shard: int = 8192  # documents per ArrayRecord shard
    overwrite: bool = False  # replace an existing out_dir (else a finished one is refused, a partial one resumed)


CHOICES = {
    "data.source": ("stdlib", "shards"),
    "data.curriculum_unit": ("tokens", "steps", "examples"),
    "data.packing": ("auto", "concat", "first_fit"),
    "data.heldout_split": ("document", "content", "tail"),
    "prepare.executor": ("local", "ray"),
    "tokenizer.model_type": ("bpe", "unigram"),
}


def _check_tokenizer_name(key: str, value: str) -> None:
    check(value == "byte" or value.endswith((".model", ".json")),
          f"{key}={value!r} is not a tokenizer; allowed: byte, the path of a SentencePiece .model, "
          "or of a Hugging Face tokenizer.json")


def validate_data(d: DataConfig) -> None:
    _check_tokenizer_name("data.tokenizer", d.tokenizer)
    from jaxlm.data.examples import OBJECTIVES

    for name, w in d.objective.items():
        check(name in OBJECTIVES, f"data.objective has {name!r}, not an objective; allowed: "
              f"{', '.join(OBJECTIVES)}")
        check(isinstance(w, (int, float)) and math.isfinite(w) and w > 0,
              f"data.objective.{name}={w!r} must be a positive, finite weight")
    check(bool(d.objective), f"data.objective is empty; give weights to some of: {', '.join(OBJECTIVES)}")
    check(d.lookahead > 0, f"data.lookahead={d.lookahead} must be positive")
    check(d.shuffle_block > 0, f"data.shuffle_block={d.shuffle_block} must be positive")
    check(d.fim_max_tokens >= 0, f"data.fim_max_tokens={d.fim_max_tokens} must be >= 0 "
          "(0: half of train.seq_len)")
    check(d.max_documents >= 0, f"data.max_documents={d.max_documents} must be >= 0 (0: all)")
    check(0 <= d.heldout_fraction < 1, f"data.heldout_fraction={d.heldout_fraction} must be in [0, 1)")


def validate_prepare(p: PrepareConfig) -> None:
    check(0 <= p.max_unusable <= 1, f"prepare.max_unusable={p.max_unusable} must be in [0, 1]")
    check(p.max_chars >= 0, f"prepare.max_chars={p.max_chars} must be >= 0 (0: no limit)")
    check(p.workers >= 0, f"prepare.workers={p.workers} must be >= 0 (0: one per CPU core)")
    check(p.task_mb > 0, f"prepare.task_mb={p.task_mb} must be positive")
    for i, src in enumerate(p.sources):
        check(src.split in SPLITS, f"prepare.sources[{i}].split={src.split!r} is not allowed; choose one of: "
              f"{', '.join(SPLITS)}")
        check(src.chunk_chars > 0, f"prepare.sources[{i}].chunk_chars={src.chunk_chars} must be positive")


def validate_tokenizer(t: TokenizerConfig) -> None:
    check(t.vocab_size > 0, f"tokenizer.vocab_size={t.vocab_size} must be positive")


def validate_tokenize(t: TokenizeConfig) -> None:
    _check_tokenizer_name("tokenize.tokenizer", t.tokenizer)
    check(t.workers >= 0, f"tokenize.workers={t.workers} must be >= 0 (0: all cores)")
    check(t.docs_per_shard > 0, f"tokenize.docs_per_shard={t.docs_per_shard} must be positive")
