"""Attention: RoPE, masks (causal, packed segments, bidirectional prefix, sliding and Lambda
windows) and the kernels; the generation cache is `jaxlm.model.kv_cache`.

`attend` runs the kernel that `kernel` picks: on CPU, masks inside the causal triangle (causal,
packed, padded, windowed) go through `attention_causal_blocks`, which skips the key blocks above
the diagonal and outside a window; on a CUDA GPU a plain causal mask in bf16/fp16 goes to cuDNN
flash attention; the rest (prefix masks; packed, padded and windowed ones on GPU) to
`jax.nn.dot_product_attention`'s XLA path with an explicit mask (a plain window as its
local_window_size). Where the active mesh splits the sequence (`mesh.sequence` > 1),
`attend` runs context-parallel instead (`jaxlm.model.context_parallel`), each shard's query rows
through `attention_rows`.
`attention_reference` is a plain einsum version the tests compare against.

Shapes: B batch, T query positions, S key positions, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sharding
from jaxlm.model import context_parallel


class RopeScaling(NamedTuple):
    """RoPE frequency scaling (`ModelConfig.rope_scaling*`): kind none | linear | llama3 | ntk | dynamic | yarn.

    original_max_len: the context length before scaling (llama3, yarn; dynamic's threshold).
    beta_fast, beta_slow, attention_factor (0: YaRN's 0.1 ln(factor) + 1), truncate: yarn only.
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0
    truncate: bool = True


def _plain_inv_freq(head_dim: int, base) -> jax.Array:
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def ntk_theta(theta, factor, head_dim: int):
    """NTK-aware base theta * factor^(H / (H - 2)) (bloc97 2023; YaRN, Peng et al. 2023, section 3.1):
    the lowest frequency turns factor times slower, the highest as before."""
    return theta * factor ** (head_dim / (head_dim - 2))


def _yarn_ramp(head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
    """[H/2]: 0 for the pairs that turn more than beta_fast times over original_max_len (kept),
    1 for those that turn fewer than beta_slow times (divided by factor), linear between.

    YaRN's "NTK-by-parts" (Peng et al. 2023, section 3.2) as its authors' code and transformers'
    `_compute_yarn_parameters` compute it: the ramp is linear in the pair index i, between the
    (fractional) i where original_max_len / (2 pi theta^(2i/H)) = beta_fast and = beta_slow,
    floored and ceiled with `truncate`, clipped to [0, H - 1].
    """
    def pair_index(rotations):
        return head_dim * math.log(scaling.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(scaling.beta_fast), pair_index(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    return jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling(),
                  seq_len=None) -> jax.Array:
    """Rotation frequencies [H/2] in radians per position, float32 as in Hugging Face.

    linear: every frequency / factor. llama3 (Llama 3.1): frequencies whose wavelength exceeds
    original_max_len / low_freq_factor are divided by factor, those shorter than
    original_max_len / high_freq_factor are kept, and the band between blends the two linearly
    in original_max_len / wavelength. ntk: plain RoPE with base `ntk_theta`. dynamic (dynamic
    NTK, transformers' "dynamic"): `ntk_theta` with factor * L / original_max_len - (factor - 1)
    in place of factor, L = max(seq_len, original_max_len): plain RoPE up to original_max_len.
    seq_len (an int or a traced int scalar) is the sequence length seen; None: original_max_len.
    yarn (Peng et al. 2023): frequencies / factor and unchanged ones blended by `_yarn_ramp`.
    """
    if scaling.kind == "none":
        return _plain_inv_freq(head_dim, theta)
    if scaling.kind == "linear":
        return _plain_inv_freq(head_dim, theta) / scaling.factor
    if scaling.kind == "llama3":
        inv_freq = _plain_inv_freq(head_dim, theta)
        wavelen = 2 * jnp.pi / inv_freq
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        # <= 0 in the low band (scaled), >= 1 in the high band (kept): clipping is the three cases.
        smooth = jnp.clip((scaling.original_max_len / wavelen - low) / (high - low), 0.0, 1.0)
        return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    if scaling.kind == "ntk":
        return _plain_inv_freq(head_dim, ntk_theta(theta, scaling.factor, head_dim))
    if scaling.kind == "dynamic":
        original = scaling.original_max_len
        L = jnp.maximum(jnp.asarray(original if seq_len is None else seq_len), original).astype(jnp.float32)
        stretch = scaling.factor * L / original - (scaling.factor - 1)  # 1 up to original_max_len
        return _plain_inv_freq(head_dim, ntk_theta(theta, stretch, head_dim))
    if scaling.kind == "yarn":
        pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
        extrapolated = 1 - _yarn_ramp(head_dim, theta, scaling)  # transformers' order of float32 ops
        return 1.0 / (scaling.factor * pos_freqs) * (1 - extrapolated) + 1.0 / pos_freqs * extrapolated
    raise ValueError(f"rope scaling {scaling.kind!r} is not supported; allowed: none, linear, llama3, ntk, "
                     "dynamic, yarn")


def yarn_mscale(factor: float, multiplier: float = 1.0) -> float:
    """YaRN's 0.1 ln(factor) + 1 (section 3.4's sqrt(1/t)), 1 when factor <= 1; DeepSeek's mscale
    puts `multiplier` on the 0.1."""
    return 0.1 * multiplier * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_attention_factor(scaling: RopeScaling) -> float:
    """What RoPE's sin and cos are multiplied by (so q.k by its square), as transformers does: YaRN's
    attention_factor, by default 0.1 ln(factor) + 1 (YaRN section 3.4's sqrt(1/t)); 1 otherwise."""
    if scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor:
        return float(scaling.attention_factor)
    return yarn_mscale(scaling.factor)


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float,
                scaling: RopeScaling = RopeScaling()):
    """sin and cos tables [B, T, H/2] for rotate-half RoPE (the Hugging Face Llama layout), both times
    `rope_attention_factor`.

    dynamic takes the sequence length L as the largest position of the batch + 1, as transformers
    does on every forward: a full forward matches its logits; in cached generation each chunk's keys
    keep the frequencies of the L they were written at while later queries use a longer L, the same
    as transformers' generation (which recomputes them as the sequence grows).
    """
    seq_len = jnp.max(positions_BT) + 1 if scaling.kind == "dynamic" else None
    angle_BTh = positions_BT.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta, scaling, seq_len)
    scale = rope_attention_factor(scaling)
    sin_BTh, cos_BTh = jnp.sin(angle_BTh), jnp.cos(angle_BTh)
    if scale != 1.0:
        sin_BTh, cos_BTh = sin_BTh * scale, cos_BTh * scale
    return sin_BTh, cos_BTh


def apply_rope(x_BTNH: jax.Array, sin_BTh: jax.Array, cos_BTh: jax.Array) -> jax.Array:
    """Rotate each (x[i], x[i + H/2]) pair by its position's angle."""
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_BTh[:, :, None, :], cos_BTh[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class Mask(NamedTuple):
    """What a query may see.

    `dense_BTS` [B, T, S] bool, or None for the causal mask on columns (the fast path): key column s
    is seen by query column t iff s <= t and s is in the band below. `causal`: no query sees a later
    column (true unless a bidirectional prefix is open). The band, `window` and `sinks` (0: none):
    every key that a query t sees has t - s < window or s < sinks. With `dense_BTS` it is a promise
    about the dense mask that kernels use to skip key blocks; without, it is the rule itself.
    `bias` [B or 1, N, T, S] float32: added to the scaled logits (T5's relative positions,
    `relative_bias`); only the reference and XLA paths take one.
    """

    dense_BTS: Optional[jax.Array]
    causal: bool = True
    window: int = 0
    sinks: int = 0
    bias: Optional[jax.Array] = None


def relative_bucket(relative, bidirectional: bool, buckets: int, max_distance: int):
    """T5's bucket of each relative position (key - query), Raffel et al. 2020 (Mesh TensorFlow's
    `_relative_position_bucket`, as transformers): bidirectional, half the buckets for keys after
    the query; of each half (all of them one way), the first half holds one distance each and the
    rest cover distances up to `max_distance` on a log scale, farther ones the last bucket. One way,
    keys after the query share bucket 0 (the causal mask hides them)."""
    relative = jnp.asarray(relative, jnp.int32)
    offset = 0
    if bidirectional:
        buckets //= 2
        offset = jnp.where(relative > 0, buckets, 0)
        distance = jnp.abs(relative)
    else:
        distance = jnp.maximum(-relative, 0)
    exact = buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, exact).astype(jnp.float32) / exact) / np.log(max_distance / exact)
    far = jnp.minimum(exact + (log_ratio * (buckets - exact)).astype(jnp.int32), buckets - 1)
    return offset + jnp.where(distance < exact, distance, far)


def relative_bias(table_RN, q_pos_BT, k_pos_BS, bidirectional: bool, max_distance: int) -> jax.Array:
    """The attention bias [B, N, T, S] float32 of T5's relative positions: table_RN[bucket] per head."""
    bucket_BTS = relative_bucket(k_pos_BS[:, None, :] - q_pos_BT[:, :, None], bidirectional, table_RN.shape[0],
                                 max_distance)
    return jnp.take(table_RN.astype(jnp.float32), bucket_BTS, axis=0).transpose(0, 3, 1, 2)


def in_window(q_pos, k_pos, window: int, sinks: int = 0):
    """The window's rule on positions (broadcast): |q - k| < window, or k is one of the first `sinks`
    positions (attention sinks: StreamingLLM, Xiao et al. 2023; LM-Infinite's Lambda-shaped mask,
    Han et al. 2023). `window` counts the query itself, as Mistral's sliding window (transformers:
    kv > q - window). window 0: everything."""
    if not window:
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
    seen = jnp.abs(q_pos - k_pos) < window
    return seen | (k_pos < sinks) if sinks else seen


def make_mask(T: int, segment_ids_BT: Optional[jax.Array] = None,
              positions_BT: Optional[jax.Array] = None,
              prefix_len_B: Optional[jax.Array] = None,
              prefix_mask_BT: Optional[jax.Array] = None, *, window: int = 0, sinks: int = 0) -> Mask:
    """Causal mask, restricted to equal segments, opened up inside the prefix, cut to a window.

    Query t sees key s iff they are in the same segment and either s <= t, or both lie in
    the bidirectional prefix. The prefix is `prefix_mask` [B, T] (True on every token of its
    segment's prefix: packed rows give each segment its own), or else `positions <
    prefix_len` [B] (one prefix length per row; positions restart in each segment).
    `window` > 0: besides, `in_window` of their positions (a sliding window; with `sinks`, the
    Lambda-shaped one). Positions (None: 0..T-1) count up by one within a segment, as packing
    makes them: the kernels' band relies on it.
    """
    if segment_ids_BT is None and prefix_len_B is None and prefix_mask_BT is None and (
            positions_BT is None or not window):  # positions matter to a window only
        return Mask(None, window=window, sinks=sinks if window else 0)
    idx = jnp.arange(T)
    allowed = (idx[None, :] <= idx[:, None])[None]  # [1, T, S]
    if positions_BT is None:
        batch = next(a.shape[0] for a in (segment_ids_BT, prefix_len_B, prefix_mask_BT) if a is not None)
        positions_BT = jnp.broadcast_to(idx, (batch, T))
    in_prefix_BT = prefix_mask_BT
    if in_prefix_BT is None and prefix_len_B is not None:
        in_prefix_BT = positions_BT < prefix_len_B[:, None]
    if in_prefix_BT is not None:
        in_prefix_BT = in_prefix_BT.astype(bool)
        allowed = allowed | (in_prefix_BT[:, :, None] & in_prefix_BT[:, None, :])
    if segment_ids_BT is not None:
        allowed = allowed & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    if window:
        allowed = allowed & in_window(positions_BT[:, :, None], positions_BT[:, None, :], window, sinks)
    # The band in columns: a packed row's sinks lie at each segment's start, not in columns [0, sinks).
    band = (0, 0) if sinks and segment_ids_BT is not None else (window, sinks if window else 0)
    return Mask(allowed, causal=in_prefix_BT is None, window=band[0], sinks=band[1])


def dense_mask(mask: Mask, B: int, T: int, S: Optional[int] = None) -> jax.Array:
    """The boolean [B, T, S] form of any mask (S = T unless keys come from a KV cache)."""
    if mask.dense_BTS is None:
        idx = jnp.arange(T)
        causal = (idx[None, :] <= idx[:, None]) & in_window(idx[:, None], idx[None, :], mask.window, mask.sinks)
        return jnp.broadcast_to(causal, (B, T, T))
    return jnp.broadcast_to(mask.dense_BTS, (B, T, T if S is None else S))


def attention_reference(q_BTNH, k_BSKH, v_BSKH, mask: Mask) -> jax.Array:
    """Plain einsum attention with float32 softmax: the reference for every kernel."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH).astype(jnp.float32)
    logits_BKGTS = _biased(logits_BKGTS / jnp.sqrt(jnp.float32(H)), mask.bias)
    allowed_BTS = dense_mask(mask, B, T, k_BSKH.shape[1])
    logits_BKGTS = jnp.where(allowed_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


BLOCK = 64  # query and key block of `attention_causal_blocks` under `attend`


def attention_causal_blocks(q_BTNH, k_BSKH, v_BSKH, mask: Mask, block: int = BLOCK) -> jax.Array:
    """`attention_reference` for a mask inside the causal triangle, by blocks of queries.

    Query block i sees keys [0, (i + 1) * block) only: with n = T / block blocks, the logits,
    softmax and matmuls cover (n + 1) / 2n of the [T, T] square instead of all of it; under a
    window (`Mask.window`, `Mask.sinks`) only the key blocks that reach into the band, so the work
    grows as T * window. As in flash attention, the forward keeps only the output and each row's
    log-sum-exp, and the backward recomputes each block's probabilities from them: no [T, S]
    tensor is saved, and the softmax backward is one elementwise pass, P * (dP - rowsum(dO * O)).
    Needs T == S, T a multiple of `block`, mask.causal.
    """
    T = q_BTNH.shape[1]
    if not mask.causal or k_BSKH.shape[1] != T or T % block:
        raise ValueError(f"causal blocks need a causal mask, T == S and T % {block} == 0; "
                         f"got T={T}, S={k_BSKH.shape[1]}, causal={mask.causal}")
    return _causal_blocks(q_BTNH, k_BSKH, v_BSKH, mask.dense_BTS, (block, mask.window, mask.sinks))


# Layout inside the blocks: heads grouped by kv head, [B, K, G, T, H] and [B, K, S, H], so that
# every matmul is a batched [rows, H] x [H, S] or [rows, S] x [S, H] over (B, K).


def _grouped(x_BTNH, K: int):
    B, T, N, H = x_BTNH.shape
    return x_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]


def _ungrouped(x_BKGTH):
    B, K, G, T, H = x_BKGTH.shape
    return x_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


def _scale(H: int) -> np.float32:
    return np.float32(1 / np.sqrt(H))


def _biased(logits_BKGTS, bias):
    """logits + `Mask.bias` [B or 1, N, T, S], its heads grouped as the logits' [K, G]."""
    if bias is None:
        return logits_BKGTS
    _, K, G, T, S = logits_BKGTS.shape
    return logits_BKGTS + bias.reshape(bias.shape[0], K, G, T, S).astype(jnp.float32)


def _scaled_masked(logits_BKGTS, allowed_BTS, H: int, bias=None):
    """float32 logits / sqrt(H) (+ `bias`), and float32's lowest where `allowed` [B, T, S] is false."""
    logits_BKGTS = _biased(logits_BKGTS * _scale(H), bias)
    return jnp.where(allowed_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)


def _key_ranges(i: int, block: int, window: int, sinks: int) -> list[tuple[int, int]]:
    """The key columns query block i needs, as [start, stop) ranges in order: up to its last row,
    from the block holding its first row's window start, plus the blocks holding the sinks."""
    stop = (i + 1) * block
    if not window:
        return [(0, stop)]
    start = max(0, i * block - window + 1) // block * block
    sink_stop = -(-sinks // block) * block
    return [(0, stop)] if sink_stop >= start else ([(0, sink_stop)] if sinks else []) + [(start, stop)]


def _take(x, ranges, axis: int):
    parts = [jax.lax.slice_in_dim(x, a, b, axis=axis) for a, b in ranges]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _block_logits(q_BKGbH, k_BKSH, allowed_BbS, i: int, block: int, ranges, window: int, sinks: int):
    """Scaled, masked float32 logits [B, K, G, b, S] of query block i against its key columns."""
    if allowed_BbS is None:  # the causal mask on columns, and its band
        t = i * block + jnp.arange(block)
        s = jnp.concatenate([jnp.arange(a, b) for a, b in ranges])
        allowed_BbS = ((s[None, :] <= t[:, None]) & in_window(t[:, None], s[None, :], window, sinks))[None]
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGbH, k_BKSH, preferred_element_type=jnp.float32)
    return _scaled_masked(logits, allowed_BbS, q_BKGbH.shape[-1])


def _blocks_of(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, shape):
    """Per query block i: (i, rows, key ranges, q [B, K, G, b, H], k and v [B, K, S_i, H], mask
    [B, b, S_i] or None)."""
    block, window, sinks = shape
    K = k_BSKH.shape[2]
    q_BKGTH = _grouped(q_BTNH, K)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    for i in range(q_BTNH.shape[1] // block):
        rows, ranges = slice(i * block, (i + 1) * block), _key_ranges(i, block, window, sinks)
        yield (i, rows, ranges, q_BKGTH[:, :, :, rows], _take(k_BKSH, ranges, 2), _take(v_BKSH, ranges, 2),
               None if allowed_BTS is None else _take(allowed_BTS[:, rows], ranges, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_blocks(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, shape):
    return _causal_blocks_fwd(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, shape)[0]


def _causal_blocks_fwd(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, shape):
    block, window, sinks = shape
    outs, lses = [], []
    for i, _, ranges, q, k, v, allowed in _blocks_of(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, shape):
        logits_BKGbS = _block_logits(q, k, allowed, i, block, ranges, window, sinks)
        max_BKGb1 = jnp.max(logits_BKGbS, axis=-1, keepdims=True)
        unnorm_BKGbS = jnp.exp(logits_BKGbS - max_BKGb1)
        sum_BKGb1 = jnp.sum(unnorm_BKGbS, axis=-1, keepdims=True)
        out = jnp.einsum("BKGTS,BKSH->BKGTH", unnorm_BKGbS.astype(v.dtype), v,
                         preferred_element_type=jnp.float32) / sum_BKGb1
        outs.append(out.astype(q_BTNH.dtype))
        lses.append((max_BKGb1 + jnp.log(sum_BKGb1))[..., 0])
    out_BTNH = _ungrouped(jnp.concatenate(outs, axis=3))
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, allowed_BTS, out_BTNH, lses)


def _causal_blocks_bwd(shape, res, dout_BTNH):
    block, window, sinks = shape
    q_BTNH, k_BSKH, v_BSKH, allowed_BTS, out_BTNH, lses = res
    B, T, K, H = k_BSKH.shape
    # dLogits = P * (dP - D) with D = rowsum(P * dP) = rowsum(dO * O), one number per query row.
    dout_BKGTH = _grouped(dout_BTNH, K)
    D_BKGT = _grouped(jnp.sum(dout_BTNH.astype(jnp.float32) * out_BTNH.astype(jnp.float32), axis=-1,
                              keepdims=True), K)[..., 0]
    dqs = []
    dk_BKHS = jnp.zeros((B, K, H, T), jnp.float32)
    dv_BKHS = jnp.zeros((B, K, H, T), jnp.float32)
    for i, rows, ranges, q, k, v, allowed in _blocks_of(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, shape):
        probs_BKGbS = jnp.exp(_block_logits(q, k, allowed, i, block, ranges, window, sinks) - lses[i][..., None])
        dout = dout_BKGTH[:, :, :, rows]
        dprobs = jnp.einsum("BKGTH,BKSH->BKGTS", dout, v, preferred_element_type=jnp.float32)
        dlogits = (probs_BKGbS * (dprobs - D_BKGT[:, :, :, rows, None])).astype(q.dtype)
        dq = jnp.einsum("BKGTS,BKSH->BKGTH", dlogits, k, preferred_element_type=jnp.float32)
        dqs.append(dq * _scale(H))
        dk = jnp.einsum("BKGTH,BKGTS->BKHS", q, dlogits, preferred_element_type=jnp.float32)
        dv = jnp.einsum("BKGTH,BKGTS->BKHS", dout, probs_BKGbS.astype(v.dtype), preferred_element_type=jnp.float32)
        offset = 0
        for a, b in ranges:  # each range's share of the block's key columns
            dk_BKHS = dk_BKHS.at[..., a:b].add(dk[..., offset:offset + b - a])
            dv_BKHS = dv_BKHS.at[..., a:b].add(dv[..., offset:offset + b - a])
            offset += b - a
    dq_BTNH = _ungrouped(jnp.concatenate(dqs, axis=3)).astype(q_BTNH.dtype)
    dk_BSKH = (dk_BKHS * _scale(H)).transpose(0, 3, 1, 2).astype(k_BSKH.dtype)
    return dq_BTNH, dk_BSKH, dv_BKHS.transpose(0, 3, 1, 2).astype(v_BSKH.dtype), None


_causal_blocks.defvjp(_causal_blocks_fwd, _causal_blocks_bwd)


def attention_rows(q_BTNH, k_BSKH, v_BSKH, mask: Mask, row0=0, block: int = BLOCK) -> jax.Array:
    """`attention_reference` for T query rows that are rows row0..row0+T-1 of a larger mask, against
    all S keys: a sequence shard's queries under context parallelism (`jaxlm.model.context_parallel`).

    `mask.dense_BTS` holds just these rows [B, T, S]; without it, the causal mask on columns (and its
    band) is taken at rows row0 + t. row0 may be traced (the shard's index), so no key block is
    skipped: every query block sees all S keys. As in `attention_causal_blocks`, the forward keeps
    only the output and each row's log-sum-exp and the backward recomputes each block's
    probabilities; the blocks run one after another in a loop (`jax.lax.map`, `jax.lax.scan`), so
    the working memory is one block's [block, S] logits per (B, N). Blocks of `block` rows where it
    divides T, else one block.
    """
    T = q_BTNH.shape[1]
    block = block if T % block == 0 else T
    return _rows(q_BTNH, k_BSKH, v_BSKH, mask.dense_BTS, jnp.asarray(row0, jnp.int32),
                 (block, mask.window, mask.sinks))


def _row_logits(q_BKGbH, k_BKSH, allowed_BbS, rows_b, shape):
    """Scaled, masked float32 logits [B, K, G, b, S] of the query rows `rows_b` (global) against all keys."""
    _, window, sinks = shape
    if allowed_BbS is None:
        s = jnp.arange(k_BKSH.shape[2])
        allowed_BbS = ((s[None, :] <= rows_b[:, None]) & in_window(rows_b[:, None], s[None, :], window, sinks))[None]
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGbH, k_BKSH, preferred_element_type=jnp.float32)
    return _scaled_masked(logits, allowed_BbS, q_BKGbH.shape[-1])


def _by_block(x, axis: int, block: int):
    """x with its `axis` of length n * block split into blocks, the block index leading: [n, ..., block, ...]."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocked(x, axis: int):
    """`_by_block`'s inverse: [n, ..., block, ...] -> [..., n * block, ...]."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _row_blocks(q_BTNH, K: int, allowed_BTS, row0, block: int):
    """Per query block, stacked on a leading axis n: q [n, B, K, G, b, H], global rows [n, b], mask
    rows [n, B, b, S] or None."""
    T = q_BTNH.shape[1]
    rows_nb = row0 + jnp.arange(T, dtype=jnp.int32).reshape(T // block, block)
    allowed_nBbS = None if allowed_BTS is None else _by_block(allowed_BTS, 1, block)
    return _by_block(_grouped(q_BTNH, K), 3, block), rows_nb, allowed_nBbS


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _rows(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, row0, shape):
    return _rows_fwd(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, row0, shape)[0]


def _rows_fwd(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, row0, shape):
    K = k_BSKH.shape[2]
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)

    def one(xs):
        q_BKGbH, rows_b, allowed_BbS = xs
        logits_BKGbS = _row_logits(q_BKGbH, k_BKSH, allowed_BbS, rows_b, shape)
        max_BKGb1 = jnp.max(logits_BKGbS, axis=-1, keepdims=True)
        unnorm_BKGbS = jnp.exp(logits_BKGbS - max_BKGb1)
        sum_BKGb1 = jnp.sum(unnorm_BKGbS, axis=-1, keepdims=True)
        out = jnp.einsum("BKGTS,BKSH->BKGTH", unnorm_BKGbS.astype(v_BKSH.dtype), v_BKSH,
                         preferred_element_type=jnp.float32) / sum_BKGb1
        return out.astype(q_BTNH.dtype), (max_BKGb1 + jnp.log(sum_BKGb1))[..., 0]

    out_nBKGbH, lse_nBKGb = jax.lax.map(one, _row_blocks(q_BTNH, K, allowed_BTS, row0, shape[0]))
    out_BTNH = _ungrouped(_unblocked(out_nBKGbH, 3))
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, allowed_BTS, row0, out_BTNH, lse_nBKGb)


def _rows_bwd(shape, res, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, allowed_BTS, row0, out_BTNH, lse_nBKGb = res
    B, S, K, H = k_BSKH.shape
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    # dLogits = P * (dP - D) with D = rowsum(P * dP) = rowsum(dO * O), one number per query row.
    D_BTN1 = jnp.sum(dout_BTNH.astype(jnp.float32) * out_BTNH.astype(jnp.float32), axis=-1, keepdims=True)
    D_nBKGb = _by_block(_grouped(D_BTN1, K)[..., 0], 3, shape[0])
    dout_nBKGbH = _by_block(_grouped(dout_BTNH, K), 3, shape[0])

    def one(carry, xs):
        dk_BKHS, dv_BKHS = carry
        (q_BKGbH, rows_b, allowed_BbS), dout, D_BKGb, lse_BKGb = xs
        probs = jnp.exp(_row_logits(q_BKGbH, k_BKSH, allowed_BbS, rows_b, shape) - lse_BKGb[..., None])
        dprobs = jnp.einsum("BKGTH,BKSH->BKGTS", dout, v_BKSH, preferred_element_type=jnp.float32)
        dlogits = (probs * (dprobs - D_BKGb[..., None])).astype(q_BKGbH.dtype)
        dq = jnp.einsum("BKGTS,BKSH->BKGTH", dlogits, k_BKSH, preferred_element_type=jnp.float32) * _scale(H)
        dk_BKHS += jnp.einsum("BKGTH,BKGTS->BKHS", q_BKGbH, dlogits, preferred_element_type=jnp.float32)
        dv_BKHS += jnp.einsum("BKGTH,BKGTS->BKHS", dout, probs.astype(v_BSKH.dtype), preferred_element_type=jnp.float32)
        return (dk_BKHS, dv_BKHS), dq.astype(q_BTNH.dtype)

    zeros = jnp.zeros((B, K, H, S), jnp.float32)
    xs = (_row_blocks(q_BTNH, K, allowed_BTS, row0, shape[0]), dout_nBKGbH, D_nBKGb, lse_nBKGb)
    (dk_BKHS, dv_BKHS), dq_nBKGbH = jax.lax.scan(one, (zeros, zeros), xs)
    dq_BTNH = _ungrouped(_unblocked(dq_nBKGbH, 3))
    dk_BSKH = (dk_BKHS * _scale(H)).transpose(0, 3, 1, 2).astype(k_BSKH.dtype)
    return dq_BTNH, dk_BSKH, dv_BKHS.transpose(0, 3, 1, 2).astype(v_BSKH.dtype), None, None


_rows.defvjp(_rows_fwd, _rows_bwd)


def kernel(impl: str, mask: Mask, T: int, S: int, dtype, H: int, backend: Optional[str] = None,
           cudnn_max_H: Optional[int] = None) -> str:
    """Which kernel `attend` runs: "reference", "blocks", "cudnn" or "xla".

    "blocks" (`attention_causal_blocks`) where the mask stays inside the causal triangle and T is
    a multiple of BLOCK (more than one block): on CPU under "auto", on any backend under "blocks". "cudnn" (cuDNN flash
    attention through `jax.nn.dot_product_attention`, which with no `implementation` runs XLA
    even on GPU) for a plain causal mask in bfloat16 / float16 with a head dim that cuDNN takes,
    a multiple of 8 up to `cudnn_max_H` (0: no cuDNN); under "auto" on GPU, and under
    "cudnn", which is an error where cuDNN cannot run it. Packed, padded, prefix and windowed masks
    on GPU go to the XLA path with the explicit mask (a plain sliding window as its
    local_window_size), so no kernel can drop a segment boundary.
    backend and cudnn_max_H default to this machine's (`jax.default_backend()`, `cudnn_head_dim()`).
    """
    backend = backend or jax.default_backend()
    cudnn_max_H = cudnn_head_dim() if cudnn_max_H is None else cudnn_max_H
    if impl == "reference":
        return "reference"
    if mask.bias is not None:
        return "xla"
    blocks_fit = mask.causal and S == T and T % BLOCK == 0 and T > BLOCK
    if blocks_fit and (impl == "blocks" or (impl == "auto" and backend == "cpu")):
        return "blocks"
    cudnn_fits = (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                  and H % 8 == 0 and H <= cudnn_max_H)
    if impl == "cudnn" and not cudnn_fits:
        raise ValueError(f"model.attention=cudnn needs an Ampere or later CUDA GPU and bfloat16 or float16 "
                         f"compute with a head dim that is a multiple of 8 up to 128 (256 from "
                         f"Hopper); here: backend {backend!r}, dtype {jnp.dtype(dtype).name}, head dim {H}")
    if mask.dense_BTS is None and not mask.window and cudnn_fits and impl in ("auto", "cudnn"):
        return "cudnn"
    return "xla"


def cudnn_head_dim() -> int:
    """The largest head dim cuDNN flash attention takes on this machine's first device: 256 on
    Hopper and later, 128 on Ampere and Ada, 0 where it does not run (CPU, TPU, ROCm, CUDA GPUs
    before Ampere, which cuDNN's fused attention does not support)."""
    import jax.extend

    device = jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in jax.extend.backend.get_backend().platform_version.lower():
        return 0
    major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
    return 256 if major >= 9 else 128 if major >= 8 else 0


def attend(q_BTNH, k_BSKH, v_BSKH, mask: Mask, impl: str = "auto") -> jax.Array:
    """Attention through the kernel that `kernel` picks for this mask, dtype and backend; where the
    active mesh splits the sequence (`mesh.sequence` > 1), context-parallel with `attention_rows` in
    each shard (`jaxlm.model.context_parallel`)."""
    B, T, N, H = q_BTNH.shape
    mesh, rules = sharding.sequence_mesh()
    if context_parallel.splits(mesh, T, k_BSKH.shape[1]):
        if mask.bias is not None:
            raise ValueError("mesh.sequence > 1 (context parallelism) does not take an attention bias yet "
                             "(model.position=t5_relative); allowed: mesh.sequence=1")
        local = lambda q, k, v, dense, row0: attention_rows(q, k, v, mask._replace(dense_BTS=dense), row0)
        return context_parallel.attend(mesh, rules, local, q_BTNH, k_BSKH, v_BSKH, mask.dense_BTS)
    name = kernel(impl, mask, T, k_BSKH.shape[1], q_BTNH.dtype, H)
    if name == "reference":
        return attention_reference(q_BTNH, k_BSKH, v_BSKH, mask)
    if name == "blocks":
        return attention_causal_blocks(q_BTNH, k_BSKH, v_BSKH, mask)
    if mask.dense_BTS is None and not mask.sinks and mask.bias is None:
        window = (mask.window - 1, 0) if mask.window else None
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True, local_window_size=window,
                                            implementation=name)
    bias = None if mask.bias is None else mask.bias.astype(q_BTNH.dtype)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias, dense_mask(mask, B, T, k_BSKH.shape[1])[:, None],
                                        implementation="xla")
