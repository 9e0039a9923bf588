"""T5 span corruption on one document's tokens (Raffel et al. 2020, sections 3.1.4 and 3.3.4), and
the UL2 mixture of denoisers built from it and prefix LM (Tay et al. 2022).

`random_spans_noise_mask` is a numpy port of `random_spans_noise_mask` in
google-research/text-to-text-transfer-transformer `t5/data/preprocessors.py` (the version
seqio and UL2's `ul2_objective` use), without its optional `random_roll`:

    num_noise = round(length * density), clipped to [1, length - 1]
    num_spans = max(round(num_noise / mean_span), 1)
    noise and non-noise tokens are each cut into num_spans non-empty runs, uniformly over
    all such cuts, and the runs alternate non-noise, noise, ..., ending in noise.

Rounding is half-to-even in both (`tf.round`, `np.round`). Sentinels number the spans in
order; a document's tokens must never be sentinel ids, or `reconstruct` cannot invert.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.data.examples.lm import check_doc, example, prefix_lm
from jaxlm.data.tokenizers.specials import SpecialIds


def span_counts(length, noise_density: float, mean_span: float):
    """(noise tokens, noise spans) the mask of a `length`-token document will have.

    Elementwise over an array of lengths (int arrays out). Documents of fewer than 2 tokens
    get no noise: T5 pads them to length 2 and truncates the mask, whose first (non-noise)
    run always covers position 0.
    """
    length = np.asarray(length, np.int64)
    num_noise = np.clip(np.round(length * noise_density).astype(np.int64), 1,
                        np.maximum(length - 1, 1))
    num_spans = np.maximum(np.round(num_noise / mean_span).astype(np.int64), 1)
    # T5 assumes num_spans <= length - num_noise; holds unless density and mean_span are extreme.
    num_spans = np.minimum(num_spans, length - num_noise)
    none = (length < 2) | (noise_density == 0.0)
    return np.where(none, 0, num_noise), np.where(none, 0, num_spans)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths [num_segments] of a uniformly random cut of num_items into non-empty runs."""
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(num_items - 1) < num_segments - 1
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean noise mask [length]: random spans of mean length `mean_span`."""
    if not 0.0 <= noise_density < 1.0:
        raise ValueError(f"noise_density={noise_density} must be in [0, 1)")
    if mean_span < 1.0:
        raise ValueError(f"mean_span={mean_span} must be >= 1")
    num_noise, num_spans = (int(c) for c in span_counts(length, noise_density, mean_span))
    if num_spans == 0:
        return np.zeros(length, bool)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    run_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    run_start = np.zeros(length, np.int64)
    run_start[np.cumsum(run_lengths)[:-1]] = 1
    return np.cumsum(run_start) % 2 == 1


def corrupt(doc: np.ndarray, noise_mask: np.ndarray, sp: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, target) of span corruption.

    inputs: `doc` with each noise span replaced by one sentinel (sentinels[0], [1], ... in
    order). target: for each span, its sentinel then its tokens; then eos.
    """
    doc = np.asarray(doc, np.int32)
    noise_mask = np.asarray(noise_mask, bool)
    first_noise = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
    num_spans = int(first_noise.sum())
    if num_spans > len(sp.sentinels):
        raise ValueError(f"the noise mask has {num_spans} spans but the tokenizer has only "
                         f"{len(sp.sentinels)} sentinels")
    sentinels = np.asarray(sp.sentinels[:num_spans], np.int32)
    inputs = doc.copy()
    inputs[first_noise] = sentinels
    inputs = inputs[~noise_mask | first_noise]
    target = np.insert(doc[noise_mask], np.flatnonzero(first_noise[noise_mask]), sentinels)
    return inputs.astype(np.int32), np.append(target, np.int32(sp.eos)).astype(np.int32)


def reconstruct(inputs: np.ndarray, target: np.ndarray, sp: SpecialIds) -> np.ndarray:
    """The original document from span corruption's (inputs, target): the inverse of `corrupt`.

    A trailing eos on `target` is optional. Each sentinel in `inputs` is replaced by the tokens
    that follow the same sentinel in `target`, up to the next sentinel.
    """
    sentinel_ids = set(int(s) for s in sp.sentinels)
    target = [int(t) for t in target]
    if target and target[-1] == sp.eos:
        target = target[:-1]
    spans: dict[int, list[int]] = {}
    current = None
    for t in target:
        if t in sentinel_ids:
            current = spans.setdefault(t, [])
        elif current is None:
            raise ValueError(f"target must start with a sentinel; got token {t}")
        else:
            current.append(t)
    out: list[int] = []
    for t in (int(x) for x in inputs):
        if t in sentinel_ids:
            if t not in spans:
                raise ValueError(f"sentinel {t} is in inputs but not in target")
            out.extend(spans[t])
        else:
            out.append(t)
    return np.asarray(out, np.int32)


def _fit_span_doc(n: int, budget: int, noise_density: float, mean_span: float,
                  max_spans: int) -> int:
    """The longest leading piece L <= n with L + 2 * spans(L) <= budget, spans <= max_spans.

    seq = inputs (L - noise + spans) + target (spans + noise + eos): L + 2 spans + 1 tokens.
    """
    L = np.arange(min(n, budget) + 1)
    spans = span_counts(L, noise_density, mean_span)[1]
    return int(L[(L + 2 * spans <= budget) & (spans <= max_spans)].max())


def _span_corruption(doc, T, sp, rng, noise_density, mean_span, lead=()) -> dict:
    L = _fit_span_doc(len(doc), T - len(lead), noise_density, mean_span, len(sp.sentinels))
    mask = random_spans_noise_mask(L, noise_density, mean_span, rng)
    inputs, target = corrupt(doc[:L], mask, sp)
    return example(np.concatenate([np.asarray(lead, np.int32), inputs]), target, T, sp.pad)


def span_corruption_example(doc, T: int, sp: SpecialIds, rng: np.random.Generator,
                            noise_density: float = 0.15, mean_span: float = 3.0) -> dict:
    """T5 span corruption, decoder-only: the corrupted document (each noise span replaced by
    one sentinel) is the bidirectional prefix; the target is each span's sentinel then its
    tokens, then eos; loss only on the target. `reconstruct` inverts (inputs, target)."""
    return _span_corruption(check_doc(doc, T), T, sp, rng, noise_density, mean_span)


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: its mode token (SpecialIds.ul2[mode]), kind, span shape and weight."""

    mode: str  # r | s | x
    kind: str  # span (span corruption) | prefix_lm
    mean_span: float = 3.0
    noise_density: float = 0.15
    weight: float = 1.0


# UL2 (Tay et al. 2022, arXiv:2205.05131) section 3.1.2: the seven denoisers of the final
# mixture. R: (mu 3, r 0.15), (mu 8, r 0.15); S: prefix LM; X: (3, 0.5), (8, 0.5), (64, 0.15),
# (64, 0.5). Sampling weights: the three paradigms equally, split evenly within each.
DEFAULT_UL2 = (
    Denoiser("r", "span", 3.0, 0.15, 1 / 6),
    Denoiser("r", "span", 8.0, 0.15, 1 / 6),
    Denoiser("s", "prefix_lm", weight=1 / 3),
    Denoiser("x", "span", 3.0, 0.5, 1 / 12),
    Denoiser("x", "span", 8.0, 0.5, 1 / 12),
    Denoiser("x", "span", 64.0, 0.15, 1 / 12),
    Denoiser("x", "span", 64.0, 0.5, 1 / 12),
)
_UL2_KINDS = ("span", "prefix_lm")


def ul2_example(doc, T: int, sp: SpecialIds, rng: np.random.Generator,
                denoisers: tuple[Denoiser, ...] = DEFAULT_UL2) -> dict:
    """UL2 mixture of denoisers: draw one denoiser by weight, put its mode token first (inside
    the prefix), apply it. Returns the example plus `denoiser`, the index of the one used."""
    doc = check_doc(doc, T)
    if len(denoisers) == 0:
        raise ValueError("denoisers is empty; give at least one Denoiser")
    for d in denoisers:
        if d.mode not in ("r", "s", "x") or d.kind not in _UL2_KINDS or not d.weight > 0:
            raise ValueError(f"{d} needs mode r, s or x, kind span or prefix_lm, weight > 0")
    weights = np.array([d.weight for d in denoisers], np.float64)
    idx = int(rng.choice(len(denoisers), p=weights / weights.sum()))
    d = denoisers[idx]
    lead = (sp.ul2[d.mode],)
    if d.kind == "prefix_lm":
        example = prefix_lm(doc, T, sp, rng, lead)
    else:
        example = _span_corruption(doc, T, sp, rng, d.noise_density, d.mean_span, lead)
    return {**example, "denoiser": idx}
