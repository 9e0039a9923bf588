"""Causal and prefix LM examples, and the fixed-length layout every objective's example shares.

An objective builds `inputs` (the bidirectional prefix, empty when causal) and a `target`;
seq = inputs + target, tokens = seq[:-1], targets = seq[1:], both right-padded with `pad` to
T. The loss covers exactly the target tokens, including the first, which the last prefix
position predicts; inputs and padding are never in the loss (`example`).
"""
from __future__ import annotations

import numpy as np

from jaxlm.data.tokenizers.specials import SpecialIds


def check_doc(doc, T: int) -> np.ndarray:
    """`doc` as a 1-D int32 token array, or one clear ValueError."""
    if T < 4:
        raise ValueError(f"seq_len T={T} must be at least 4")
    doc = np.asarray(doc)
    if doc.ndim != 1 or not (doc.size == 0 or np.issubdtype(doc.dtype, np.integer)):
        raise ValueError(f"doc must be a 1-D integer token array; got shape {doc.shape}, "
                         f"dtype {doc.dtype}")
    return doc.astype(np.int32)


def example(inputs, target, T: int, pad: int) -> dict:
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


def clm_example(doc, T: int, sp: SpecialIds) -> dict:
    """Next-token prediction on doc + eos; loss on every real target."""
    doc = check_doc(doc, T)
    return example([], np.append(doc, np.int32(sp.eos))[:T + 1], T, sp.pad)


def prefix_lm(doc, T, sp, rng, lead=()) -> dict:
    """The prefix-LM example of a checked `doc`, with `lead` tokens (a UL2 mode token) first."""
    seq = np.append(doc, np.int32(sp.eos))[:T + 1 - len(lead)]
    m = len(seq)  # k leaves at least one document token (and eos) to predict
    k = int(rng.integers(1, m - 1)) if m > 2 else min(m - 1, 1)
    return example(np.concatenate([np.asarray(lead, np.int32), seq[:k]]), seq[k:], T, sp.pad)


def prefix_lm_example(doc, T: int, sp: SpecialIds, rng: np.random.Generator) -> dict:
    """Prefix LM: the first k tokens are a bidirectional prefix (prefix_len=k); loss only on
    the tokens after it. k is uniform over [1, m - 2], m the kept length of doc + eos, so at
    least one document token follows the prefix."""
    return prefix_lm(check_doc(doc, T), T, sp, rng)
