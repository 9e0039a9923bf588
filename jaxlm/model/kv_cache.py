"""The KV cache of generation: its layout (plain, or a ring with sink slots under a sliding
window), the mask of new queries over its slots, and attention over it in its [B, K, S, H] layout.

Shapes as in `jaxlm.model.attention`: B batch, T new query columns, S cache slots, N query heads,
K kv heads, H head dim.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.model.attention import Mask, _grouped, _scaled_masked, _ungrouped, dense_mask, in_window


class KVCache(NamedTuple):
    """Keys and values of every layer for a batch of left-padded rows, written up to column `index`.

    k_BKSH, v_BKSH: one [B, K, S, H] array per layer (tuples of L), in the compute dtype, heads
    before slots: a decode step hands each layer's keys and values to `attention_cached`'s
    matmuls as they lie, where slices of one stacked [L, ...] array, or a [B, S, K, H] layout,
    cost a copy per layer and step (docs/generation-eval.md, sampler speed). Row b's token at column c has
    position c - start_B[b]; columns before start_B[b] are padding and never attended to. Rows
    are left-padded so that every row writes the same slot at each step (one
    `dynamic_update_slice`, no scatter). index: int32 [], the next column to write.

    Which slot holds which column is `cache_columns`: without a window, slot s holds column s; with
    one (`Layout`), a ring of slots holds the latest columns and, before it, `sinks` slots hold
    each row's first tokens, so memory stays constant however long the generation.
    """

    k_BKSH: tuple
    v_BKSH: tuple
    index: jax.Array
    start_B: jax.Array


class Layout(NamedTuple):
    """How a cache's S slots hold columns. window 0: slot s holds column s. window > 0: slots
    [0, sinks) hold each row's first `sinks` real columns (start_B + j), the other S - sinks
    slots a ring where column c lands in slot sinks + c % (S - sinks)."""

    window: int = 0
    sinks: int = 0


def cache_columns(start_B: jax.Array, index, S: int, layout: Layout) -> jax.Array:
    """The column each slot holds [B, S] once the columns before `index` are written; negative
    where a slot holds nothing yet."""
    B = start_B.shape[0]
    if not layout.window:
        return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    n, R = layout.sinks, S - layout.sinks
    r = jnp.arange(R, dtype=jnp.int32)
    ring_R = index - 1 - jnp.mod(index - 1 - r, R)  # the latest column c < index with c % R == r
    sinks_Bn = start_B[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    sinks_Bn = jnp.where(sinks_Bn < index, sinks_Bn, -1)
    return jnp.concatenate([sinks_Bn, jnp.broadcast_to(ring_R, (B, R))], axis=1)


def attention_cached(q_BTNH, k_BKSH, v_BKSH, mask: Mask) -> jax.Array:
    """`attention_reference` over keys and values in the cache's [B, K, S, H] layout.

    With the heads ahead of the columns, both matmuls batch over (B, K) as the operands lie;
    over a [B, S, K, H] cache XLA copies every layer's keys and values transposed at every
    decode step (docs/generation-eval.md, sampler speed). Logits and softmax in float32.
    """
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1:3]
    q_BKGTH = _grouped(q_BTNH, K)
    logits_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH, preferred_element_type=jnp.float32)
    logits_BKGTS = _scaled_masked(logits_BKGTS, dense_mask(mask, B, T, S), H, mask.bias)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BKSH.dtype)
    out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS, v_BKSH, preferred_element_type=jnp.float32)
    return _ungrouped(out_BKGTH).astype(q_BTNH.dtype)


def cache_mask(start_B: jax.Array, index, T: int, S: int, bidirectional: bool = False, *, window: int = 0,
               sinks: int = 0, layout: Layout = Layout()) -> Mask:
    """What T new queries at columns index..index+T-1 see among S slots laid out as `layout`, the
    new columns written (a prefill passes S = T and the plain layout: the chunk on its own).

    Query column q sees the key in a slot holding column c iff c holds a real token (c >=
    start_B) and c <= q (with `bidirectional`, a prefix LM's prompt: every real column before
    index + T), and `in_window` of their positions (window 0: any); ring slots leave a row's
    first tokens to the layout's sink slots, so none is seen twice. A padding query sees itself
    only: its output is never used, and its softmax stays finite.
    """
    q_1T1 = (index + jnp.arange(T, dtype=jnp.int32))[None, :, None]
    cols_B1S = cache_columns(start_B, index + T, S, layout)[:, None, :]
    start_B11 = start_B[:, None, None]
    seen = (cols_B1S >= start_B11) & ((cols_B1S < index + T) if bidirectional else (cols_B1S <= q_1T1))
    if window:
        seen = seen & in_window(q_1T1 - start_B11, cols_B1S - start_B11, window, sinks)
    if layout.window and layout.sinks:
        in_ring = jnp.arange(S) >= layout.sinks
        seen = seen & ~(in_ring & (cols_B1S - start_B11 < layout.sinks))
    padding_self = (cols_B1S == q_1T1) & (q_1T1 < start_B11)
    return Mask(seen | padding_self, causal=not bidirectional)
