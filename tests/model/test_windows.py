"""Sliding and Lambda-shaped attention windows: the masks against their definition, every kernel
against the einsum reference (forward and gradients, packed rows too), and the rolling KV cache
against a full forward at every decode step, far past the window and past model.max_seq_len.

Sizes are odd where they can be; float32 throughout.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import generate as gen
from jaxlm import model
from jaxlm.config import ConfigError, ModelConfig
from jaxlm.config.model import validate
from jaxlm.model import attention
from jaxlm.testing import random_params

T = 40
SEGMENTS = np.array([[1] * 13 + [2] * 27, [1] * 40])
POSITIONS = np.array([list(range(13)) + list(range(27)), list(range(40))])
WINDOWS = [(5, 0), (7, 3), (1, 0), (64, 0)]  # (window, sinks); 64 > T: the window never binds


def _numpy_mask(positions_T, segments_T, window, sinks):
    """Query t sees key s: same segment, s <= t, and t - s < window or position(s) < sinks."""
    want = np.zeros((len(positions_T),) * 2, bool)
    for t in range(len(positions_T)):
        for s in range(t + 1):
            near = positions_T[t] - positions_T[s] < window or positions_T[s] < sinks
            want[t, s] = segments_T[t] == segments_T[s] and near
    return want


@pytest.mark.parametrize("window, sinks", WINDOWS)
def test_masks_follow_the_definition(window, sinks):
    plain = attention.dense_mask(attention.make_mask(T, window=window, sinks=sinks), 1, T)[0]
    np.testing.assert_array_equal(plain, _numpy_mask(np.arange(T), np.ones(T), window, sinks))
    packed = attention.make_mask(T, jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS), window=window, sinks=sinks)
    for b in range(2):  # a packed row's sinks are each segment's first tokens
        np.testing.assert_array_equal(packed.dense_BTS[b], _numpy_mask(POSITIONS[b], SEGMENTS[b], window, sinks))


def _qkvg(dtype=jnp.float32):
    B, N, K, H = 2, 6, 2, 4
    return [jnp.asarray(np.random.default_rng(i).standard_normal((B, T, n, H)), dtype)
            for i, n in enumerate((N, K, K, N))]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("window, sinks", WINDOWS)
def test_kernels_match_the_reference_with_gradients(window, sinks, packed):
    """Causal blocks of 4 (skipping the key blocks outside the band) and `attend`'s XLA path
    (jax.nn.dot_product_attention with local_window_size, or the explicit mask) against einsum."""
    q, k, v, g = _qkvg()
    extra = (jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS)) if packed else ()
    mask = attention.make_mask(T, *extra, window=window, sinks=sinks)
    outs = {}
    for name, fn in (("blocks", functools.partial(attention.attention_causal_blocks, block=4)),
                     ("xla", attention.attend), ("reference", attention.attention_reference)):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        outs[name] = (out, *vjp(g))
    assert attention.kernel("auto", mask, T, T, jnp.float32, 4, backend="cpu") == "xla"  # T % 64 != 0
    for name in ("blocks", "xla"):
        for got, want in zip(outs[name], outs["reference"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    unwindowed = attention.attention_reference(q, k, v, attention.make_mask(T, *extra))
    binds = window < T
    assert (float(jnp.abs(unwindowed - outs["reference"][0]).max()) > 1e-2) == binds


def test_blocks_skip_the_key_blocks_outside_the_window():
    """Window 8 over 64 columns in blocks of 8: block i reads keys from block i - 1 on (and block 0
    for a sink), so the logits cover 120 of the causal triangle's 288 [8 x 8] tiles' columns."""
    assert attention._key_ranges(5, 8, 8, 0) == [(32, 48)]
    assert attention._key_ranges(5, 8, 8, 4) == [(0, 8), (32, 48)]
    assert attention._key_ranges(1, 8, 8, 4) == [(0, 16)]
    assert attention._key_ranges(5, 8, 0, 0) == [(0, 48)]
    q, k, v, _ = (jnp.zeros((1, 64, 2, 4)),) * 4
    jaxpr = str(jax.make_jaxpr(lambda q: attention.attention_causal_blocks(
        q, k, v, attention.make_mask(64, window=8), block=8))(q))
    assert "8,16]" in jaxpr and "8,64]" not in jaxpr  # [.., b, S_i] logits: 16 keys, never all 64


CFG = ModelConfig(vocab_size=37, d_model=48, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=56, max_seq_len=64,
                  rope_theta=100.0, dtype="float32")


@functools.partial(jax.jit, static_argnums=(0, 4))
def _teacher_forced(cfg, params, left_BP, lengths_B, length, next_BN):
    """Cache logits at every step: prefill, then feed the given tokens one at a time."""
    logits_BV, cache = model.prefill(cfg, params, left_BP, lengths_B, length)

    def step(cache, tokens_B):
        logits_B1V, cache = model.decode(cfg, params, tokens_B[:, None], cache)
        return cache, logits_B1V[:, 0]

    cache, logits_NBV = jax.lax.scan(step, cache, next_BN.T)
    return jnp.concatenate([logits_BV[:, None], jnp.swapaxes(logits_NBV, 0, 1)], axis=1), cache


@pytest.mark.parametrize("window, sinks", [(5, 0), (6, 3), (0, 0)])
def test_rolling_cache_logits_equal_a_full_forward_at_every_step(window, sinks):
    """Rows of 1, 7 and 11 prompt tokens, left-padded into 16 columns, then 40 decode steps: the cache
    (sinks + window slots, however long the run) gives a full forward's logits at every step. The
    1-token prompt takes its sinks during decoding; the 11-token one enters the ring wrapped."""
    cfg = dataclasses.replace(CFG, sliding_window=window, attention_sinks=sinks)
    params = random_params(cfg, 0)
    rng = np.random.default_rng(1)
    lengths, N = np.array([1, 7, 11]), 40
    seqs = [rng.integers(3, 37, n + N) for n in lengths]
    prompts = np.stack([np.pad(s[:n], (0, 11 - n)) for s, n in zip(seqs, lengths)])
    next_BN = np.stack([s[n:n + N - 1] for s, n in zip(seqs, lengths)])
    got, cache = _teacher_forced(cfg, params, gen.left_pad(prompts, lengths, 16), lengths, 16 + N, next_BN)
    assert cache.k_BKSH[0].shape[2] == (sinks + window if window else 16 + N)
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        want = model.apply(cfg, params, jnp.asarray(seq[None, :n + N - 1]))[0, n - 1:]
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=5e-5)  # float32 sums in another order


def test_generation_runs_past_max_seq_len_only_with_a_window():
    cfg = dataclasses.replace(CFG, sliding_window=8, attention_sinks=2)
    params = random_params(cfg, 0)
    prompts = np.random.default_rng(2).integers(3, 37, (2, 5))
    out = gen.generate(cfg, params, prompts, max_new_tokens=3 * cfg.max_seq_len)  # 192 tokens after 5
    assert np.asarray(out.lengths).tolist() == [192, 192]
    # the same greedy tokens as feeding the sequence through full forwards (the window bounds the
    # distances, so a full forward over all 196 positions is the reference)
    seq = np.concatenate([prompts[0], np.asarray(out.tokens)[0]])
    logits = model.apply(cfg, params, jnp.asarray(seq[None, :-1]))[0, 4:]
    np.testing.assert_array_equal(np.argmax(logits, -1), seq[5:])
    with pytest.raises(ValueError, match="model.sliding_window"):
        gen.generate(CFG, random_params(CFG, 0), prompts, max_new_tokens=cfg.max_seq_len)


@pytest.mark.parametrize("fields, fragment", [
    (dict(sliding_window=-1), "model.sliding_window=-1 must be >= 0"),
    (dict(attention_sinks=4), "model.attention_sinks=4 needs model.sliding_window > 0"),
])
def test_bad_windows_are_one_line_errors(fields, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(dataclasses.replace(CFG, **fields))
