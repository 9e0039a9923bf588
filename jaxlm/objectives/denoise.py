"""Pretraining objectives as pure numpy transforms: one document -> one fixed-length example.

Each transform takes one document's tokens [n], the example length T (train.seq_len), the
special ids (`Specials`) and, where it draws, an explicit `np.random.Generator`, so the
Grain pipeline can seed every example from (seed, index). Each returns a dict of

    tokens [T] int32, targets [T] int32 (tokens shifted by one), loss_mask [T] float32,
    prefix_len: int, the leading positions that attend bidirectionally (0: causal).

Layout. An objective builds `inputs` (the bidirectional prefix, empty when causal) and a
`target`; seq = inputs + target, tokens = seq[:-1], targets = seq[1:], both right-padded
with `pad` to T. The loss covers exactly the target tokens, including the first, which the
last prefix position predicts; inputs and padding are never in the loss. Feed `prefix_len`
to `jaxlm.model.apply(..., prefix_len=...)` as an int32 array [B] so one compile serves all.

Truncation (documents longer than fits). CLM and prefix-LM keep the first T + 1 tokens of
doc + eos, so a cut document has no eos (it did not end). FIM, span corruption and UL2 cut
the document to its longest leading piece whose complete example fits in T + 1 tokens (and,
for span corruption, needs no more spans than there are sentinels); their eos closes the
target. Documents of any length, including 0, give an example of exactly T.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.objectives.fim import FIM_MODES, apply_fim, fim_permute, fim_split
from jaxlm.objectives.span import corrupt, random_spans_noise_mask, reconstruct, span_counts

__all__ = [
    "Specials", "Denoiser", "DEFAULT_UL2", "OBJECTIVES", "EXAMPLE_KEYS", "clm_example",
    "prefix_lm_example", "fim_example", "fim_infill_example", "span_corruption_example", "ul2_example",
    "sample_objective", "make_example", "apply_fim", "fim_permute", "fim_split", "corrupt",
    "random_spans_noise_mask", "reconstruct",
]


@dataclasses.dataclass(frozen=True)
class Specials:
    """Special token ids, reserved by the tokenizer. Sentinels number span-corruption spans."""

    pad: int
    eos: int
    fim_prefix: int
    fim_middle: int
    fim_suffix: int
    ul2_r: int
    ul2_s: int
    ul2_x: int
    sentinels: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "sentinels", tuple(int(s) for s in self.sentinels))
        ids = [self.eos, self.fim_prefix, self.fim_middle, self.fim_suffix, self.ul2_r,
               self.ul2_s, self.ul2_x, *self.sentinels]
        seen = set()
        for i in [self.pad, *ids]:
            if int(i) < 0:
                raise ValueError(f"special token id {i} must be >= 0")
        for i in ids:  # pad may share an id (e.g. with eos): padding is never in the loss
            if i in seen:
                raise ValueError(f"special token id {i} is used twice; ids must be distinct")
            seen.add(i)


def _check(doc, T: int) -> np.ndarray:
    if T < 4:
        raise ValueError(f"seq_len T={T} must be at least 4")
    doc = np.asarray(doc)
    if doc.ndim != 1 or not (doc.size == 0 or np.issubdtype(doc.dtype, np.integer)):
        raise ValueError(f"doc must be a 1-D integer token array; got shape {doc.shape}, "
                         f"dtype {doc.dtype}")
    return doc.astype(np.int32)


def _example(inputs, target, T: int, pad: int) -> dict:
    """The fixed-length example of seq = inputs + target (see the module docstring)."""
    inputs = np.asarray(inputs, np.int32)
    seq = np.concatenate([inputs, np.asarray(target, np.int32)])
    assert len(seq) <= T + 1, (len(seq), T)
    n = max(len(seq) - 1, 0)  # real positions
    tokens = np.full(T, pad, np.int32)
    targets = np.full(T, pad, np.int32)
    loss_mask = np.zeros(T, np.float32)
    tokens[:n], targets[:n] = seq[:n], seq[1:]
    loss_mask[max(len(inputs) - 1, 0):n] = 1.0
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
            "prefix_len": len(inputs)}


def clm_example(doc, T: int, sp: Specials) -> dict:
    """Next-token prediction on doc + eos; loss on every real target."""
    doc = _check(doc, T)
    return _example([], np.append(doc, np.int32(sp.eos))[:T + 1], T, sp.pad)


def _prefix_lm(doc, T, sp, rng, lead=()) -> dict:
    seq = np.append(doc, np.int32(sp.eos))[:T + 1 - len(lead)]
    m = len(seq)  # k leaves at least one document token (and eos) to predict
    k = int(rng.integers(1, m - 1)) if m > 2 else min(m - 1, 1)
    return _example(np.concatenate([np.asarray(lead, np.int32), seq[:k]]), seq[k:], T, sp.pad)


def prefix_lm_example(doc, T: int, sp: Specials, rng: np.random.Generator) -> dict:
    """Prefix LM: the first k tokens are a bidirectional prefix (prefix_len=k); loss only on
    the tokens after it. k is uniform over [1, m - 2], m the kept length of doc + eos, so at
    least one document token follows the prefix."""
    return _prefix_lm(_check(doc, T), T, sp, rng)


def fim_example(doc, T: int, sp: Specials, rng: np.random.Generator, mode: str = "psm",
                unit: str = "token") -> dict:
    """Fill-in-the-middle (see `jaxlm.objectives.fim`): the FIM form of the document + eos,
    causal, loss on every real target, so the summed loss is the FIM sequence's full NLL.

    The cuts are `fim_split(len(doc), rng)`, the generator's first draw. unit="token" only:
    cuts fall between tokens (character-level cuts of the decoded text are out of scope).
    """
    if unit != "token":
        raise ValueError(f"unit={unit!r} is not supported; allowed: token")
    doc = _check(doc, T)[:T - 3]  # + 3 sentinels + eos = T + 1 tokens at most
    i, j = fim_split(len(doc), rng)
    return _example([], np.append(fim_permute(doc, i, j, sp, mode), np.int32(sp.eos)), T, sp.pad)


def fim_infill_example(doc, i: int, j: int, T: int, sp: Specials) -> dict:
    """The infilling task for evaluation: PSM input `<pre> doc[:i] <suf> doc[j:] <mid>`, target
    `doc[i:j] + eos`; the loss only on the target, so its mean is the infill NLL per token
    (eos counted: knowing where the middle ends is part of infilling). Run causally."""
    doc = _check(doc, T)
    if not 0 <= i <= j <= len(doc) or len(doc) + 4 > T + 1:
        raise ValueError(f"need 0 <= i <= j <= len(doc) and len(doc) + 4 <= T + 1; got i={i}, j={j}, "
                         f"len(doc)={len(doc)}, T={T}")
    inputs = np.concatenate([[sp.fim_prefix], doc[:i], [sp.fim_suffix], doc[j:], [sp.fim_middle]])
    return _example(inputs, np.append(doc[i:j], np.int32(sp.eos)), T, sp.pad)


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
    return _example(np.concatenate([np.asarray(lead, np.int32), inputs]), target, T, sp.pad)


def span_corruption_example(doc, T: int, sp: Specials, rng: np.random.Generator,
                            noise_density: float = 0.15, mean_span: float = 3.0) -> dict:
    """T5 span corruption, decoder-only: the corrupted document (each noise span replaced by
    one sentinel) is the bidirectional prefix; the target is each span's sentinel then its
    tokens, then eos; loss only on the target. `reconstruct` inverts (inputs, target)."""
    return _span_corruption(_check(doc, T), T, sp, rng, noise_density, mean_span)


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: its mode token (Specials.ul2_<mode>), kind, span shape and weight."""

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


def ul2_example(doc, T: int, sp: Specials, rng: np.random.Generator,
                denoisers: tuple[Denoiser, ...] = DEFAULT_UL2) -> dict:
    """UL2 mixture of denoisers: draw one denoiser by weight, put its mode token first (inside
    the prefix), apply it. Returns the example plus `denoiser`, the index of the one used."""
    doc = _check(doc, T)
    if len(denoisers) == 0:
        raise ValueError("denoisers is empty; give at least one Denoiser")
    for d in denoisers:
        if d.mode not in ("r", "s", "x") or d.kind not in _UL2_KINDS or not d.weight > 0:
            raise ValueError(f"{d} needs mode r, s or x, kind span or prefix_lm, weight > 0")
    weights = np.array([d.weight for d in denoisers], np.float64)
    idx = int(rng.choice(len(denoisers), p=weights / weights.sum()))
    d = denoisers[idx]
    lead = (getattr(sp, f"ul2_{d.mode}"),)
    if d.kind == "prefix_lm":
        example = _prefix_lm(doc, T, sp, rng, lead)
    else:
        example = _span_corruption(doc, T, sp, rng, d.noise_density, d.mean_span, lead)
    return {**example, "denoiser": idx}


FIM_SPM_RATE = 0.5  # "fim" trains PSM and SPM jointly, as the FIM paper recommends

_MAKERS = {
    "clm": lambda doc, T, sp, rng: clm_example(doc, T, sp),
    "prefix_lm": prefix_lm_example,
    "fim": lambda doc, T, sp, rng: fim_example(
        doc, T, sp, rng, mode=FIM_MODES[int(rng.random() < FIM_SPM_RATE)]),
    "span_corruption": span_corruption_example,
    "ul2": ul2_example,
}
OBJECTIVES = tuple(_MAKERS)
EXAMPLE_KEYS = ("tokens", "targets", "loss_mask", "prefix_len")


def _check_name(name: str) -> None:
    if name not in _MAKERS:
        raise ValueError(f"objective {name!r} is not an objective; allowed: "
                         f"{', '.join(OBJECTIVES)}")


def sample_objective(weights: dict[str, float], rng: np.random.Generator) -> str:
    """One objective name drawn with probability proportional to its weight."""
    if not weights:
        raise ValueError(f"objective weights are empty; give positive weights to some of: "
                         f"{', '.join(OBJECTIVES)}")
    for name, w in weights.items():
        _check_name(name)
        if not (np.isfinite(w) and w > 0):
            raise ValueError(f"objective weight {name!r}={w} must be positive; allowed names: "
                             f"{', '.join(OBJECTIVES)}")
    names = list(weights)
    p = np.array([weights[k] for k in names], np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def make_example(name: str, doc, T: int, sp: Specials, rng: np.random.Generator) -> dict:
    """The example of objective `name` (one of OBJECTIVES), with the keys EXAMPLE_KEYS only,
    so examples of different objectives stack into one batch."""
    _check_name(name)
    example = _MAKERS[name](doc, T, sp, rng)
    return {k: example[k] for k in EXAMPLE_KEYS}
