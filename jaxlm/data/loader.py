"""The pretraining / SFT loader: source mixtures, curricula, packing and exact resume on Grain.

Every row is a pure function of (seed, stream position), so the training loop keeps one
integer, `cursor` (rows consumed), as with `LMBatches`: `Loader.batch(cursor, global_batch,
process_index, process_count)` gives this process's rows of the global batch at `cursor`.

How each piece stays deterministic, and what a resume at cursor c costs:

- Mixture: position p draws its source from a counter-based RNG, u_p = element p % 4096 of
  `default_rng([seed, MIX, p // 4096]).random(4096)`, cut by the cumulative weights of the
  curriculum stage that p lies in. A source's own position (how many of positions < p drew
  it) is a prefix count of those draws, cached per block of 4096: a resume pays O(c / 4096)
  generator calls and O(c) vectorised counting once (~0.8 s per 10^7 positions), then O(batch).
  Grain's `MapDataset.mix` was not used: it is deterministic, but a fixed periodic interleave
  whose weights are truncated to integers with the smallest scaled to 100
  (`_float_to_int_proportions`), so 0.3 : 0.7 becomes 100 : 233, and it has no stage switch.
- Document order: source s visits its documents in epoch e in the order
  `default_rng([seed, ORDER, crc32(name), e]).permutation(N)`, a fresh shuffle per epoch like
  Grain's `shuffle`, but built whole in ~50 ms per 10^6 documents (Grain's `index_shuffle`
  answers one index at a time, ~10 us each from Python), which concat-then-split needs in
  order to prefix-sum an epoch's document lengths. Keys use the name, so adding or
  reordering sources leaves each source's order alone.
- packing="concat" (pretraining): each source's epochs of documents, each ending in exactly
  one eos, FIM applied at document level, form one endless token stream; the source's window
  k is tokens [k(T+1), (k+1)(T+1)) of it. Windows run across epoch boundaries, so every token
  of every epoch appears exactly once. Document lengths are read once per source (one pass,
  at first use); then window k is a binary search in its epoch's length prefix sums: random
  access, no replay, so a resume costs only the mixture count above. The source's k-th draw
  reads window `perm_b(k)`, windows permuted within blocks of `shuffle_block` (a fresh
  permutation per block b): each window still comes exactly once, but a batch no longer holds
  consecutive windows of one long document.
- packing="first_fit" (SFT and example-level objectives): the example stream is cut into
  groups of `lookahead` consecutive examples (a group never straddles a curriculum boundary,
  so each row has one stage) and each group is packed by first-fit decreasing. A group's row
  count depends on its examples' lengths, so group row offsets are computed in order and
  cached: a resume builds the examples before c once, O(c); consecutive calls are O(batch).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import zlib
from typing import Any, Optional, Sequence

import grain
import numpy as np

from jaxlm.data.examples import make_example, sample_objective
from jaxlm.data.examples.fim import apply_fim
from jaxlm.data.tokenizers.specials import SpecialIds

_BLOCK = 4096
_MIX, _ORDER, _FIM, _FIM_CUTS, _OBJ, _WINDOWS = range(6)  # RNG stream tags
_CONCAT_OBJECTIVES = ("clm", "fim")
PACKINGS = ("concat", "first_fit")


@dataclasses.dataclass(frozen=True)
class Source:
    """A named, weighted, random-access dataset: 1-D int token arrays (documents, with or
    without a trailing eos) or, for packing="first_fit", SFT example dicts of 1-D `tokens`,
    `targets`, `loss_mask` and an optional int `prefix_len`."""

    name: str
    docs: Any
    weight: float = 1.0


def process_rows(cursor: int, global_batch: int, process_index: int, process_count: int):
    """(first stream position, row count) of this process's slice of the global batch at `cursor`.

    Process p gets rows [cursor + p*B/P, cursor + (p+1)*B/P): contiguous and disjoint, and in
    process order they concatenate to the global batch.
    """
    if cursor < 0:
        raise ValueError(f"cursor={cursor} must be >= 0")
    if global_batch < 1 or process_count < 1 or global_batch % process_count:
        raise ValueError(f"process_count={process_count} must divide the global batch "
                         f"size {global_batch} (both positive)")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    rows = global_batch // process_count
    return cursor + process_index * rows, rows


def _body(doc, eos: int) -> np.ndarray:
    """The document's tokens without its trailing eos, if it has one."""
    doc = np.asarray(doc, np.int32)
    return doc[:-1] if len(doc) and doc[-1] == eos else doc


def _stream_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _order(seed: int, key: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _ORDER, key, epoch]).permutation(n)


def _stages(sources, curriculum, unit: str, T: int, packing: str):
    """(boundaries [n_stages - 1] in stream positions, probabilities [n_stages, S])."""
    names = [s.name for s in sources]
    allowed = ", ".join(names)
    from_sources = curriculum is None
    if from_sources:
        curriculum = [(None, {s.name: s.weight for s in sources})]
    if unit not in ("examples", "tokens"):
        raise ValueError(f"curriculum_unit={unit!r} is not a unit; allowed: examples, tokens")
    if unit == "tokens" and packing != "concat":
        raise ValueError("curriculum_unit='tokens' needs packing='concat' (one row = T tokens); "
                         "give first_fit stages in examples")
    bounds, table, last = [], [], 0
    for i, (until, weights) in enumerate(curriculum):
        if not weights:
            raise ValueError(f"curriculum stage {i} has no weights; give positive weights to some "
                             f"of: {allowed}")
        row = np.zeros(len(names))
        for name, w in weights.items():
            if name not in names:
                raise ValueError(f"curriculum stage {i} names source {name!r}, not a source; "
                                 f"allowed: {allowed}")
            if not (np.isfinite(w) and w > 0):
                where = "Source.weight" if from_sources else f"curriculum stage {i}"
                raise ValueError(f"{where}: weight of source {name!r} is {w}; weights "
                                 "must be positive (leave a source out to give it none)")
            row[names.index(name)] = w
        table.append(row / row.sum())
        if i == len(curriculum) - 1 and until is None:
            break
        pos = None if until is None else (-(-int(until) // T) if unit == "tokens" else int(until))
        if pos is None or pos <= last:
            raise ValueError(f"curriculum stage {i} ends at until={until}, which must be a number "
                             f"above the previous boundary ({last} positions); only the last stage "
                             "may have until=None")
        if i < len(curriculum) - 1:  # the last stage runs on past its `until`
            bounds.append(pos)
        last = pos
    return np.asarray(bounds, np.int64), np.stack(table)


class _Mixture:
    """Source and within-source index of each stream position (module docstring)."""

    def __init__(self, seed: int, bounds: np.ndarray, probs: np.ndarray):
        self.seed, self.bounds, self.n_sources = seed, bounds, probs.shape[1]
        self.edges = np.cumsum(probs, axis=1)[:, :-1]
        self.counts = [np.zeros(self.n_sources, np.int64)]  # [b]: draws per source before block b
        self._draws = functools.lru_cache(maxsize=4)(self._draws)  # per-instance caches

    def stage(self, p):
        return np.searchsorted(self.bounds, p, side="right")

    def _draws(self, b: int) -> np.ndarray:
        u = np.random.default_rng([self.seed, _MIX, b]).random(_BLOCK)
        stage = self.stage(b * _BLOCK + np.arange(_BLOCK))
        src = np.empty(_BLOCK, np.int64)
        for st in np.unique(stage):
            m = stage == st
            src[m] = np.searchsorted(self.edges[st], u[m], side="right")
        return src

    def locate(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(source [n], index within that source [n]) of positions start .. start+n-1."""
        src, idx = np.empty(n, np.int64), np.empty(n, np.int64)
        p = start
        while p < start + n:
            b, off = divmod(p, _BLOCK)
            while len(self.counts) <= b:
                prev = len(self.counts) - 1
                self.counts.append(self.counts[-1] + np.bincount(self._draws(prev),
                                                                 minlength=self.n_sources))
            draws = self._draws(b)
            take = min(_BLOCK - off, start + n - p)
            s = draws[off:off + take]
            rank = np.empty(take, np.int64)
            for k in np.unique(s):
                m = s == k
                rank[m] = self.counts[b][k] + np.count_nonzero(draws[:off] == k) + np.arange(m.sum())
            src[p - start:p - start + take], idx[p - start:p - start + take] = s, rank
            p += take
        return src, idx


class _ConcatSource:
    """One source's endless stream of documents (eos-terminated, FIM applied), cut in windows."""

    def __init__(self, docs, name: str, seed: int, width: int, eos: int, fim_rate: float,
                 specials: Optional[SpecialIds], shuffle_block: int, fim_piece: int):
        self.docs, self.key, self.seed, self.width = docs, _stream_key(name), seed, width
        self.shuffle_block, self.fim_piece = shuffle_block, fim_piece
        self.eos, self.fim_rate, self.specials = eos, fim_rate, specials
        self.n = len(docs)
        self._lengths = None
        self.starts = [0]  # first stream token of each epoch built so far
        self.epoch = functools.lru_cache(maxsize=4)(self.epoch)
        self.doc = functools.lru_cache(maxsize=256)(self.doc)
        self._block_order = functools.lru_cache(maxsize=4)(self._block_order)

    @property
    def lengths(self) -> np.ndarray:
        """Packed length (body + eos) of each document, read once."""
        if self._lengths is None:
            self._lengths = np.array([len(_body(self.docs[i], self.eos)) + 1 for i in range(self.n)],
                                     np.int64)
        return self._lengths

    def epoch(self, e: int):
        """(order [N], FIM flags [N] by slot, length prefix sums [N + 1]) of epoch e."""
        order = _order(self.seed, self.key, e, self.n)
        fim = np.zeros(self.n, bool)
        if self.fim_rate > 0:
            fim = np.random.default_rng([self.seed, _FIM, self.key, e]).random(self.n) < self.fim_rate
        lengths = self.lengths[order]
        pieces = -(-(lengths - 1) // self.fim_piece) if self.fim_piece else np.ones_like(lengths)
        # A FIM document: each piece gains 3 sentinels and all but the last an eos of its own.
        cum = np.concatenate([[0], np.cumsum(lengths + fim * (4 * np.maximum(pieces, 1) - 1))])
        return order, fim, cum

    def doc(self, e: int, j: int) -> np.ndarray:
        """Slot j of epoch e as packed: the document body (FIM form if drawn) + eos."""
        order, fim, _ = self.epoch(e)
        body = _body(self.docs[int(order[j])], self.eos)
        if not fim[j]:
            return np.append(body, np.int32(self.eos))
        rng = np.random.default_rng([self.seed, _FIM_CUTS, self.key, e * self.n + j])
        step = self.fim_piece or max(len(body), 1)
        pieces = [body[a:a + step] for a in range(0, len(body), step)] or [body]
        eos = np.int32(self.eos)
        return np.concatenate([np.append(apply_fim(piece, 1.0, rng, self.specials), eos) for piece in pieces])

    def _block_order(self, b: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _WINDOWS, self.key, b]).permutation(self.shuffle_block)

    def shuffled_window(self, k: int) -> np.ndarray:
        """Window k of the source's shuffled order: windows are permuted within consecutive
        blocks of `shuffle_block` (a bijection, so each window still comes exactly once), so that
        a batch does not hold consecutive windows of one long document."""
        if self.shuffle_block <= 1:
            return self.window(k)
        b, r = divmod(k, self.shuffle_block)
        return self.window(b * self.shuffle_block + int(self._block_order(b)[r]))

    def window(self, k: int) -> np.ndarray:
        """Tokens [k(T+1), (k+1)(T+1)) of the stream: [T + 1] int32."""
        pos, end, pieces = k * self.width, (k + 1) * self.width, []
        while pos < end:
            while self.starts[-1] <= pos:
                self.starts.append(self.starts[-1] + int(self.epoch(len(self.starts) - 1)[2][-1]))
            e = bisect.bisect_right(self.starts, pos) - 1
            cum = self.epoch(e)[2]
            j = int(np.searchsorted(cum, pos - self.starts[e], side="right")) - 1
            off = pos - self.starts[e] - int(cum[j])
            piece = self.doc(e, j)[off:off + end - pos]
            pieces.append(piece)
            pos += len(piece)
        return np.concatenate(pieces)


def pack_first_fit(examples: Sequence[dict], T: int, pad_id: int) -> tuple[dict, int]:
    """First-fit decreasing packing of variable-length examples into rows of T: (rows, truncated).

    Each example has 1-D `tokens`, `targets`, `loss_mask` of one length n and an int
    `prefix_len`; examples longer than T are cut to T (counted in `truncated`), empty ones
    skipped. Rows [R, T]: tokens, targets (pad_id in padding), loss_mask float32 (0 in
    padding), segment_ids int32 (1, 2, ... in placement order, 0 for padding), positions
    (restarting at 0 per segment, 0 in padding) and prefix_mask bool (the token lies in its
    segment's bidirectional prefix, positions < prefix_len).
    """
    lens = np.array([min(len(x["tokens"]), T) for x in examples], np.int64)
    truncated = sum(len(x["tokens"]) > T for x in examples)
    free = np.full(len(examples), T, np.int64)
    used, place = 0, []  # (row, start) per example in `order`
    order = np.argsort(-lens, kind="stable")
    for i in order:
        if lens[i] == 0:
            break
        r = int(np.argmax(free[:used] >= lens[i])) if used else 0
        if not used or free[r] < lens[i]:
            r, used = used, used + 1
        place.append((i, r, T - free[r]))
        free[r] -= lens[i]
    rows = {"tokens": np.full((used, T), pad_id, np.int32),
            "targets": np.full((used, T), pad_id, np.int32),
            "loss_mask": np.zeros((used, T), np.float32),
            "segment_ids": np.zeros((used, T), np.int32),
            "positions": np.zeros((used, T), np.int32),
            "prefix_mask": np.zeros((used, T), bool)}
    segments = np.zeros(max(used, 1), np.int32)
    for i, r, a in place:
        x, n = examples[i], lens[i]
        segments[r] += 1
        for key in ("tokens", "targets", "loss_mask"):
            rows[key][r, a:a + n] = x[key][:n]
        rows["segment_ids"][r, a:a + n] = segments[r]
        rows["positions"][r, a:a + n] = np.arange(n)
        rows["prefix_mask"][r, a:a + n] = np.arange(n) < x.get("prefix_len", 0)
    return rows, int(truncated)


class Loader:
    """Batches from a mixture of sources, packed to [B, T], read by stream position (cursor).

    packing="concat": rows are windows of documents concatenated and split (tokens, targets,
    loss_mask); objective_weights may name clm and fim only (FIM at document level, rate =
    w_fim / sum). packing="first_fit": rows are examples packed by first-fit decreasing over
    `lookahead` examples at a time, adding segment_ids, positions and prefix_mask; documents
    become examples through `jaxlm.data.examples.make_example` (objective drawn by
    weight, default clm), SFT dicts are used as they are. `curriculum`: stages
    [(until, {source: weight}), ...]; a stage covers stream positions before its `until`
    (rows for concat, examples for first_fit; `curriculum_unit="tokens"` counts T per row),
    the last runs on forever. Without one, `Source.weight` is the mixture. `shuffle_block`:
    concat windows are permuted within blocks of this many (1: in stream order). `fim_piece`:
    a document drawn for FIM is cut into pieces of at most this many tokens, each moved to FIM
    form and ended with eos on its own (0: the whole document is one piece), so that prefix,
    suffix and middle fit in one context even when documents are far longer. `stats` counts
    the examples, truncated examples, rows and real tokens of the first_fit groups built so far.
    `packer(examples, T, pad) -> (rows, truncated)`: how first_fit packs each group of examples
    (default `pack_first_fit`; another packer takes the sources' example dicts as they are, e.g.
    `jaxlm.data.examples.preference.pack_groups`). `bidirectional_prefix=False`: first_fit rows carry no
    prefix_mask, so a decoder reads every example causally, on the same tokens and loss targets.
    """

    def __init__(self, sources: Sequence[Source], seq_len: int, *, eos_id: int, seed: int = 0,
                 packing: str = "concat", curriculum=None, curriculum_unit: str = "examples",
                 objective_weights: Optional[dict] = None, specials: Optional[SpecialIds] = None,
                 lookahead: int = 256, shuffle_block: int = 65536, fim_piece: int = 0, packer=None,
                 bidirectional_prefix: bool = True):
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r} is not a packing; allowed: {', '.join(PACKINGS)}")
        if seq_len < 4 or seed < 0 or lookahead < 1:
            raise ValueError(f"need seq_len >= 4, seed >= 0, lookahead >= 1; got {seq_len}, "
                             f"{seed}, {lookahead}")
        names = [s.name for s in sources]
        if not sources or len(set(names)) != len(names):
            raise ValueError(f"sources must be non-empty with distinct names; got {names}")
        for s in sources:
            if len(s.docs) == 0:
                raise ValueError(f"source {s.name!r} has no documents")
            if packing == "concat" and isinstance(s.docs[0], dict):
                raise ValueError(f"source {s.name!r} holds example dicts, which need "
                                 "packing='first_fit'; packing='concat' takes token arrays")
        weights = dict(objective_weights or {"clm": 1.0})
        sample_objective(weights, np.random.default_rng(0))  # validates names and weights
        if packing == "concat" and set(weights) - set(_CONCAT_OBJECTIVES):
            raise ValueError(f"objectives {sorted(set(weights) - set(_CONCAT_OBJECTIVES))} need "
                             f"packing='first_fit'; with packing='concat' allowed: "
                             f"{', '.join(_CONCAT_OBJECTIVES)}")
        if set(weights) != {"clm"} and (specials is None or specials.eos != eos_id):
            raise ValueError(f"objectives {sorted(weights)} need `specials` with eos={eos_id}")
        self.seq_len, self.seed, self.packing, self.lookahead = seq_len, seed, packing, lookahead
        self.packer = packer or pack_first_fit
        self.bidirectional_prefix = bidirectional_prefix
        self.eos, self.specials, self.objective_weights = eos_id, specials, weights
        self.pad = specials.pad if specials is not None else eos_id
        bounds, probs = _stages(sources, curriculum, curriculum_unit, seq_len, packing)
        self.mixture = _Mixture(seed, bounds, probs)
        self.sources = list(sources)
        self._docs = [s.docs if isinstance(s.docs, grain.MapDataset) else grain.MapDataset.source(s.docs)
                      for s in sources]
        fim_rate = weights.get("fim", 0.0) / sum(weights.values())
        self._concat = [_ConcatSource(d, s.name, seed, seq_len + 1, eos_id, fim_rate, specials,
                                      shuffle_block, fim_piece)
                        for d, s in zip(self._docs, sources)] if packing == "concat" else []
        self._group_rows, self._group_start = [0], [0]  # first_fit: rows / examples before group g
        self.stats = {"examples": 0, "truncated": 0, "rows": 0, "real_tokens": 0}
        self._group = functools.lru_cache(maxsize=4)(self._group)
        self._order = functools.lru_cache(maxsize=16)(self._order_uncached)

    def batch(self, cursor: int, global_batch: int, process_index: int = 0,
              process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows [cursor + p*B/P, cursor + (p+1)*B/P) of the global batch at `cursor`.

        Numpy arrays [B/P, T]: tokens, targets int32, loss_mask float32; first_fit adds
        segment_ids, positions int32 and prefix_mask bool (unless bidirectional_prefix=False).
        """
        start, rows = process_rows(cursor, global_batch, process_index, process_count)
        if self.packing == "concat":
            return self._windows(start, rows)
        return self._packed(start, rows)

    def _windows(self, start: int, n: int) -> dict[str, np.ndarray]:
        src, idx = self.mixture.locate(start, n)
        w_BW = np.stack([self._concat[s].shuffled_window(int(k)) for s, k in zip(src, idx)])
        return {"tokens": np.ascontiguousarray(w_BW[:, :-1]),
                "targets": np.ascontiguousarray(w_BW[:, 1:]),
                "loss_mask": np.ones((n, self.seq_len), np.float32)}

    # --- first_fit ----------------------------------------------------------------------------

    def _example(self, q: int, s: int, i: int) -> dict:
        """Example-stream position q: item i of source s (in its epoch's order), as an example."""
        n = len(self._docs[s])
        item = self._docs[s][int(self._order(s, i // n)[i % n])]
        if isinstance(item, dict) and self.packer is not pack_first_fit:  # the packer's own kind of example
            return item
        if isinstance(item, dict):
            tokens = np.asarray(item["tokens"], np.int32)
            return {"tokens": tokens, "targets": np.asarray(item["targets"], np.int32),
                    "loss_mask": np.asarray(item.get("loss_mask", np.ones(len(tokens))), np.float32),
                    "prefix_len": int(item.get("prefix_len", 0))}
        body, T = _body(item, self.eos), self.seq_len
        rng = np.random.default_rng([self.seed, _OBJ, q])
        name = sample_objective(self.objective_weights, rng)
        if name == "clm":  # no specials needed: doc + eos, cut to T + 1
            seq = np.append(body, np.int32(self.eos))[:T + 1]
            return {"tokens": seq[:-1], "targets": seq[1:],
                    "loss_mask": np.ones(len(seq) - 1, np.float32), "prefix_len": 0}
        ex = make_example(name, body, T, self.specials, rng)
        n = int(np.flatnonzero(ex["loss_mask"])[-1]) + 1 if ex["loss_mask"].any() else 0
        return {**{key: ex[key][:n] for key in ("tokens", "targets", "loss_mask")},
                "prefix_len": int(ex["prefix_len"])}

    def _order_uncached(self, s: int, epoch: int) -> np.ndarray:
        return _order(self.seed, _stream_key(self.sources[s].name), epoch, len(self._docs[s]))

    def _group_end(self, start: int) -> int:
        nxt = self.mixture.bounds[self.mixture.bounds > start]
        return min(start + self.lookahead, int(nxt[0]) if len(nxt) else start + self.lookahead)

    def _group(self, g: int) -> dict:
        start = self._group_start[g]
        end = self._group_end(start)
        src, idx = self.mixture.locate(start, end - start)
        examples = [self._example(start + i, int(s), int(k)) for i, (s, k) in enumerate(zip(src, idx))]
        rows, truncated = self.packer(examples, self.seq_len, self.pad)
        return {"rows": rows, "truncated": truncated, "end": end, "examples": len(examples)}

    def _packed(self, start: int, n: int) -> dict[str, np.ndarray]:
        while self._group_rows[-1] < start + n:  # build groups in order; each is counted once
            g = self._group(len(self._group_rows) - 1)
            self._group_rows.append(self._group_rows[-1] + len(g["rows"]["tokens"]))
            self._group_start.append(g["end"])
            self.stats["examples"] += g["examples"]
            self.stats["truncated"] += g["truncated"]
            self.stats["rows"] += len(g["rows"]["tokens"])
            self.stats["real_tokens"] += int((g["rows"]["segment_ids"] > 0).sum())
        parts, pos = [], start
        while pos < start + n:
            gi = bisect.bisect_right(self._group_rows, pos) - 1
            rows = self._group(gi)["rows"]
            a = pos - self._group_rows[gi]
            b = min(len(rows["tokens"]), a + start + n - pos)
            parts.append({k: v[a:b] for k, v in rows.items()})
            pos += b - a
        keys = [k for k in parts[0] if self.bidirectional_prefix or k != "prefix_mask"]
        return {k: np.concatenate([p[k] for p in parts]) for k in keys}

    def rows_for_examples(self, examples: int) -> tuple[int, int]:
        """first_fit: (R, E): rows [0, R) hold exactly the stream's examples [0, E), E the first group
        boundary at or after `examples`. Which examples a group holds does not depend on the packer, so
        loaders that differ only in it (a decoder's and an encoder-decoder's) score the same targets there."""
        while self._group_start[-1] < examples:
            self._packed(self._group_rows[-1], 1)  # packs the next group
        g = bisect.bisect_left(self._group_start, examples)
        return self._group_rows[g], self._group_start[g]
