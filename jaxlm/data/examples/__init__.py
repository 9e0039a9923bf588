"""Examples: one record or document -> token arrays a batch is packed from, as pure numpy.

Pretraining objectives (`lm`, `fim`, `span`) turn one document's tokens [n], given the example
length T (train.seq_len), the tokenizer's special ids (`SpecialIds`) and, where they draw, an
explicit `np.random.Generator` (so the loader seeds every example from (seed, index)), into

    tokens [T] int32, targets [T] int32 (tokens shifted by one), loss_mask [T] float32,
    prefix_len: int, the leading positions that attend bidirectionally (0: causal).

Feed `prefix_len` to `jaxlm.model.apply(..., prefix_len=...)` as an int32 array [B] so one
compile serves all. `make_example(name, ...)` picks one by name; `OBJECTIVES` lists them.

Truncation (documents longer than fits). CLM and prefix-LM keep the first T + 1 tokens of
doc + eos, so a cut document has no eos (it did not end). FIM, span corruption and UL2 cut
the document to its longest leading piece whose complete example fits in T + 1 tokens (and,
for span corruption, needs no more spans than there are sentinels); their eos closes the
target. Documents of any length, including 0, give an example of exactly T.

Instruction and chat records become SFT examples in `chat`.
"""
from __future__ import annotations

import numpy as np

from jaxlm.data.examples.fim import FIM_MODES, fim_example
from jaxlm.data.examples.lm import clm_example, prefix_lm_example
from jaxlm.data.examples.span import span_corruption_example, ul2_example
from jaxlm.data.tokenizers.specials import SpecialIds

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


def make_example(name: str, doc, T: int, sp: SpecialIds, rng: np.random.Generator) -> dict:
    """The example of objective `name` (one of OBJECTIVES), with the keys EXAMPLE_KEYS only,
    so examples of different objectives stack into one batch."""
    _check_name(name)
    example = _MAKERS[name](doc, T, sp, rng)
    return {k: example[k] for k in EXAMPLE_KEYS}
