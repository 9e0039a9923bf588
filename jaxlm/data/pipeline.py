"""Pretraining data for the loop: sources -> held-out split -> `Loader` (mixture, curriculum,
packing, objectives) with exact resume.

Resume contract: the training loop keeps one integer, `cursor` (rows consumed so far), in
its checkpoint. Row `i` of the stream is a pure function of `(seed, i)` (see
`jaxlm.data.loader`), and the batch at step k is `batch(cursor=rows before k, ...)`, so a run
resumed at cursor c sees exactly the batches it would have seen had it never stopped, on any
number of processes. No iterator object needs saving.

Two kinds of source (`data.source`):
- `stdlib`: the Python standard library's .py files, tokenized in memory (no files needed).
- `shards`: `data.sources`, token-shard directories written by `jaxlm data tokenize`, each
  with a mixture weight; `data.curriculum` can change the weights by stage.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.corpus import bits_to_nats, split_documents, stdlib_documents, unigram_entropy_bits
from jaxlm.data.tokenizers import load_tokenizer

SOURCES = ("stdlib", "shards")
_ENTROPY_ROWS = 256  # training rows the unigram baseline is measured on


class _Take:
    """Documents `idx` of a random-access dataset, as a sequence."""

    def __init__(self, docs, idx: np.ndarray):
        self._docs, self._idx = docs, idx

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, i: int):
        return self._docs[int(self._idx[i])]


class _Pieces:
    """Token ranges `[start[i], stop[i])` of documents `idx[i]` of a random-access dataset."""

    def __init__(self, docs, idx: np.ndarray, start: np.ndarray, stop: np.ndarray):
        self._docs, self._idx, self._start, self._stop = docs, idx, start, stop

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, i: int):
        return self._docs[int(self._idx[i])][int(self._start[i]):int(self._stop[i])]


def _both_sides(u: np.ndarray, fraction: float) -> np.ndarray:
    """`u < fraction`, moved by one document if needed so that both sides are non-empty."""
    held = u < fraction
    if fraction > 0 and len(u) >= 2:
        if not held.any():
            held[np.argmin(u)] = True
        elif held.all():
            held[np.argmax(u)] = False
    return held


def heldout_indices(name: str, n: int, fraction: float) -> np.ndarray:
    """A boolean [n]: which documents of source `name` are held out (a fixed hash of name and
    index, independent of the training seed). Both sides are non-empty when fraction > 0, n >= 2."""
    return _both_sides(np.random.default_rng([7, zlib.crc32(name.encode())]).random(n), fraction)


def split_heldout(name: str, docs, fraction: float, how: str):
    """(train, heldout, how): the documents of token source `name` split by `data.heldout_split`:
    `document` by a fixed hash of name and index (`heldout_indices`); `content` by a hash of each
    document's tokens, so a document lands on the same side whatever its source's name or place
    (and exact duplicates together); `tail` the last `fraction` of every document's tokens held
    out, so one long text can be validated on. A source of one document is split by `tail`
    whatever `how` says (`how` returned is the rule used). `content` and `tail` read every
    document once."""
    n = len(docs)
    if fraction == 0:
        return docs, _Take(docs, np.zeros(0, np.int64)), how
    if how != "tail" and n >= 2:
        if how == "content":
            u = np.array([zlib.crc32(np.asarray(docs[i], np.int32).tobytes(), 7) for i in range(n)]) / 2.0**32
            held = _both_sides(u, fraction)
        else:
            held = heldout_indices(name, n, fraction)
        return _Take(docs, np.flatnonzero(~held)), _Take(docs, np.flatnonzero(held)), how
    lengths = np.array([len(docs[i]) for i in range(n)])
    cut = np.clip(lengths - np.round(lengths * fraction).astype(np.int64), 1, np.maximum(lengths - 1, 1))
    long = np.flatnonzero(lengths >= 2)
    train = _Pieces(docs, np.arange(n), np.zeros(n, np.int64), cut)
    return train, _Pieces(docs, long, cut[long], lengths[long]), "tail"


def _specials(tokenizer, objective: dict):
    """The tokenizer's `SpecialIds`, or None when the objective is plain CLM."""
    if set(objective) <= {"clm"}:
        return None
    sp = tokenizer.special_ids
    missing = sp.missing(("pad", "eos", "fim_prefix", "fim_middle", "fim_suffix", "ul2_r", "ul2_s", "ul2_x",
                          "sentinels"))
    if missing:
        raise ConfigError(f"data.objective={objective} needs special tokens the tokenizer "
                          f"{tokenizer.name!r} lacks: {', '.join(missing)}; use the byte tokenizer "
                          "or one trained by `jaxlm data tokenizer`")
    return sp


def _stdlib_sources(data_cfg: DataConfig, tokenizer, info: dict):
    from jaxlm.data.loader import Source

    corpus = stdlib_documents(data_cfg.max_documents)
    train_docs, heldout_docs = split_documents(corpus.documents, data_cfg.heldout_fraction)
    encode = lambda docs: [np.append(tokenizer.encode(text), np.int32(tokenizer.eos_id)).astype(np.int32)
                           for _, text in docs]
    train, heldout = encode(train_docs), encode(heldout_docs)
    info.update(stdlib_root=corpus.root, docs_skipped=len(corpus.skipped), skipped=corpus.skipped,
                docs_train=len(train), docs_heldout=len(heldout),
                tokens_train=sum(map(len, train)), tokens_heldout=sum(map(len, heldout)))
    if not train:
        raise ConfigError("data.source=stdlib found no documents to train on; raise data.max_documents")
    return [Source("stdlib", train)], [Source("stdlib", heldout)] if heldout else []


def _check_tokenizer(name: str, index: dict, tokenizer: str) -> None:
    """The shards of source `name` must have been written with `tokenizer` (same file bytes)."""
    from jaxlm.data.tokenizers import file_sha256

    if tokenizer == "byte":
        same = index.get("tokenizer") == "byte"
    else:
        same = Path(tokenizer).is_file() and index.get("tokenizer_sha256") == file_sha256(Path(tokenizer))
    if not same:
        raise ConfigError(f"data.sources {name!r} was tokenized with "
                          f"{index.get('tokenizer_path') or index.get('tokenizer')!r}, but "
                          f"data.tokenizer={tokenizer!r}; they must be the same tokenizer")


def _shard_index(name: str, path: str, tokenizer: str) -> dict:
    """The index of the token shards in `path`, written with `tokenizer`, or one line saying why not."""
    from jaxlm.data.shards import load_index

    if not (Path(path) / "index.json").is_file():
        raise ConfigError(f"data.sources {name!r}: {path!r} holds no token shards "
                          "(index.json); write them with `jaxlm data tokenize`")
    index = load_index(path)
    _check_tokenizer(name, index, tokenizer)
    return index


def _shard_docs(name: str, path: str, tokenizer: str):
    from jaxlm.data.shards import read_shards

    _shard_index(name, path, tokenizer)
    return read_shards(path)


def _shard_sources(data_cfg: DataConfig, tokenizer, info: dict):
    from jaxlm.data.loader import Source
    from jaxlm.data.shards import read_shards

    if not data_cfg.sources:
        raise ConfigError("data.source=shards needs data.sources: [{name, path, weight}, ...] "
                          "(directories written by `jaxlm data tokenize`)")
    names = [s.name for s in data_cfg.sources]
    if "" in names or len(set(names)) != len(names):
        raise ConfigError(f"data.sources names must be non-empty and distinct; got {names}")
    train, heldout = [], []
    per_source = {}
    for s in data_cfg.sources:
        index = _shard_index(s.name, s.path, data_cfg.tokenizer)
        if s.weight <= 0:
            raise ConfigError(f"data.sources {s.name!r}: weight={s.weight} must be positive")
        docs = read_shards(s.path)
        n = min(len(docs), data_cfg.max_documents or len(docs))
        docs = _Take(docs, np.arange(n)) if n < len(docs) else docs
        if s.heldout_path:
            tr, he, how = docs, _shard_docs(s.name, s.heldout_path, data_cfg.tokenizer), "heldout_path"
        else:
            tr, he, how = split_heldout(s.name, docs, data_cfg.heldout_fraction, data_cfg.heldout_split)
        if len(tr) == 0:
            raise ConfigError(f"data.sources {s.name!r} has no training documents in {s.path!r}")
        train.append(Source(s.name, tr, s.weight))
        if len(he):
            heldout.append(Source(s.name, he, s.weight))
        per_source[s.name] = {"docs_train": len(tr), "docs_heldout": len(he), "heldout_split": how,
                              "tokens": index.get("tokens"), "documents": index.get("documents")}
    info.update(sources=per_source, docs_train=sum(v["docs_train"] for v in per_source.values()),
                docs_heldout=sum(v["docs_heldout"] for v in per_source.values()))
    return train, heldout


def packing_for(data_cfg: DataConfig) -> str:
    """`data.packing`, with auto resolved: concat-then-split for CLM/FIM, first-fit otherwise."""
    if data_cfg.packing != "auto":
        return data_cfg.packing
    return "concat" if set(data_cfg.objective) <= {"clm", "fim"} else "first_fit"


def _curriculum(data_cfg: DataConfig, batch_size: int, batch_ramp: bool):
    """(stages [(until, weights)], loader unit) from `data.curriculum`, or (None, "examples")."""
    if not data_cfg.curriculum:
        return None, "examples"
    unit, scale = data_cfg.curriculum_unit, 1
    if unit == "steps":
        if packing_for(data_cfg) != "concat" or batch_ramp:
            raise ConfigError("data.curriculum_unit=steps needs packing concat and no batch ramp "
                              "(one step = train.batch_size rows); use tokens or examples")
        unit, scale = "examples", batch_size
    stages = [(None if st.until is None else st.until * scale, dict(st.weights)) for st in data_cfg.curriculum]
    return stages, unit


def build_lm_data(data_cfg: DataConfig, seq_len: int, *, batch_size: int = 1, batch_ramp: bool = False,
                  arch: str = "decoder"):
    """(train, heldout, info): `Loader`s over the configured sources, and what they hold.

    arch="encoder_decoder": rows in encoder-decoder form (`jaxlm.data.examples.encdec`: each example's
    inputs to the encoder, its target to the decoder, packed first-fit on both sides), for objectives
    with inputs only (span_corruption, ul2, prefix_lm).

    `heldout` is None when nothing is held out. `info` holds document and token counts and the
    unigram entropy of the first 256 training rows' targets, in bits and nats per token: the
    loss a context-free model would reach.
    """
    from jaxlm.data.loader import Loader

    if data_cfg.source not in SOURCES:
        raise ConfigError(f"data.source={data_cfg.source!r} is not a source; choose one of: "
                          f"{', '.join(SOURCES)}")
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    packing = packing_for(data_cfg)
    packer = None
    if arch == "encoder_decoder":
        from jaxlm.data.examples.encdec import pack_encoder_decoder

        plain = sorted(set(data_cfg.objective) & {"clm", "fim"})
        if plain or packing != "first_fit":
            raise ConfigError(f"model.arch=encoder_decoder trains on objectives with inputs and targets "
                              f"(span_corruption, ul2, prefix_lm) packed first_fit; data.objective has "
                              f"{', '.join(plain) or 'none of them'}, data.packing={data_cfg.packing}")
        packer = pack_encoder_decoder
    info = {"source": data_cfg.source, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "packing": packing, "objective": dict(data_cfg.objective)}
    build = _stdlib_sources if data_cfg.source == "stdlib" else _shard_sources
    train_sources, heldout_sources = build(data_cfg, tokenizer, info)
    curriculum, unit = _curriculum(data_cfg, batch_size, batch_ramp)
    common = dict(eos_id=tokenizer.eos_id, seed=data_cfg.seed, packing=packing,
                  objective_weights=dict(data_cfg.objective),
                  specials=_specials(tokenizer, data_cfg.objective), lookahead=data_cfg.lookahead,
                  shuffle_block=data_cfg.shuffle_block,
                  fim_piece=data_cfg.fim_max_tokens or max(seq_len // 2, 1), packer=packer,
                  bidirectional_prefix=data_cfg.bidirectional_prefix)
    try:
        train = Loader(train_sources, seq_len, curriculum=curriculum, curriculum_unit=unit, **common)
        heldout = Loader(heldout_sources, seq_len, **common) if heldout_sources else None
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    sample = train.batch(0, _ENTROPY_ROWS)
    bits = unigram_entropy_bits(sample["targets"][sample["loss_mask"] > 0], tokenizer.vocab_size)
    info.update(unigram_entropy_bits=bits, unigram_entropy_nats=bits_to_nats(bits))
    return train, heldout, info
