"""Fill-in-the-middle on one document's tokens (Bavarian et al. 2022, arXiv:2207.14255).

A document is cut at two positions drawn uniformly at random into prefix, middle and
suffix, and reordered so that a causal model learns to write the middle last:

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

SPM is the paper's SPM mode (its section 3.1) in the variant with both sentinels up front,
which BigCode's Megatron-LM `permute` labels "variant 2 from FIM paper": the prefix runs
straight into the middle, so the middle continues the prefix token stream.

The transform works at the document level, before packing: the pipeline appends eos to
every document when it packs (`jaxlm.data.loader`, packing="concat"), giving the paper's
`... middle <EOT>`; `fim_example` builds one fixed-length example the same way. Cuts are
token positions only; the paper's character-level cuts (which split the decoded text and
re-encode) are out of scope here.
"""
from __future__ import annotations

import numpy as np

from jaxlm.data.examples.lm import check_doc, example
from jaxlm.data.tokenizers.specials import SpecialIds

FIM_MODES = ("psm", "spm")


def fim_split(n: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two cut positions 0 <= i <= j <= n, each uniform over [0, n], sorted.

    Any part may be empty (the paper's and BigCode's `randint(0, n + 1, size=2)`).
    """
    i, j = sorted(int(x) for x in rng.integers(0, n + 1, size=2))
    return i, j


def fim_permute(doc: np.ndarray, i: int, j: int, sp: SpecialIds, mode: str = "psm") -> np.ndarray:
    """The FIM form [n + 3] of `doc` cut into doc[:i], doc[i:j], doc[j:] (no eos)."""
    if mode not in FIM_MODES:
        raise ValueError(f"mode={mode!r} is not a FIM mode; allowed: {', '.join(FIM_MODES)}")
    doc = np.asarray(doc, np.int32)
    if not 0 <= i <= j <= len(doc):
        raise ValueError(f"FIM cuts (i={i}, j={j}) must satisfy 0 <= i <= j <= {len(doc)}")
    prefix, middle, suffix = doc[:i], doc[i:j], doc[j:]
    pre, suf, mid = ([np.int32(t)] for t in (sp.fim_prefix, sp.fim_suffix, sp.fim_middle))
    if mode == "psm":
        parts = [pre, prefix, suf, suffix, mid, middle]
    else:
        parts = [pre, suf, suffix, mid, prefix, middle]
    return np.concatenate(parts).astype(np.int32)


def apply_fim(doc: np.ndarray, rate: float, rng: np.random.Generator, sp: SpecialIds,
              spm_rate: float = 0.5) -> np.ndarray:
    """With probability `rate`, the FIM form of `doc` (SPM with probability `spm_rate`, else
    PSM); otherwise `doc` unchanged. Document-level, for use before concat-then-split packing.

    The paper's recommendation is joint PSM + SPM training (spm_rate 0.5) at a FIM rate of 0.5
    to 0.9. Draws: one uniform for `rate`, then (if transformed) the cuts and one for the mode.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fim rate={rate} must be in [0, 1]")
    if not 0.0 <= spm_rate <= 1.0:
        raise ValueError(f"spm_rate={spm_rate} must be in [0, 1]")
    doc = np.asarray(doc, np.int32)
    if rng.random() >= rate:
        return doc
    i, j = fim_split(len(doc), rng)
    mode = "spm" if rng.random() < spm_rate else "psm"
    return fim_permute(doc, i, j, sp, mode)


def fim_example(doc, T: int, sp: SpecialIds, rng: np.random.Generator, mode: str = "psm",
                unit: str = "token") -> dict:
    """Fill-in-the-middle (see `jaxlm.objectives.fim`): the FIM form of the document + eos,
    causal, loss on every real target, so the summed loss is the FIM sequence's full NLL.

    The cuts are `fim_split(len(doc), rng)`, the generator's first draw. unit="token" only:
    cuts fall between tokens (character-level cuts of the decoded text are out of scope).
    """
    if unit != "token":
        raise ValueError(f"unit={unit!r} is not supported; allowed: token")
    doc = check_doc(doc, T)[:T - 3]  # + 3 sentinels + eos = T + 1 tokens at most
    i, j = fim_split(len(doc), rng)
    return example([], np.append(fim_permute(doc, i, j, sp, mode), np.int32(sp.eos)), T, sp.pad)


def fim_infill_example(doc, i: int, j: int, T: int, sp: SpecialIds) -> dict:
    """The infilling task for evaluation: PSM input `<pre> doc[:i] <suf> doc[j:] <mid>`, target
    `doc[i:j] + eos`; the loss only on the target, so its mean is the infill NLL per token
    (eos counted: knowing where the middle ends is part of infilling). Run causally."""
    doc = check_doc(doc, T)
    if not 0 <= i <= j <= len(doc) or len(doc) + 4 > T + 1:
        raise ValueError(f"need 0 <= i <= j <= len(doc) and len(doc) + 4 <= T + 1; got i={i}, j={j}, "
                         f"len(doc)={len(doc)}, T={T}")
    inputs = np.concatenate([[sp.fim_prefix], doc[:i], [sp.fim_suffix], doc[j:], [sp.fim_middle]])
    return example(inputs, np.append(doc[i:j], np.int32(sp.eos)), T, sp.pad)
