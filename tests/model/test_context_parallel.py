"""Context parallelism: a sequence split over the "sequence" mesh axis gives the unsharded numbers."""
import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import generate as gen
from jaxlm import model, sharding
from jaxlm.config import MeshConfig
from jaxlm.model import attention as attn
from jaxlm.testing import ODD, random_params

B, T = 4, 128  # T / 2 = two query blocks of 32 per shard, T / 4 = one
MASKS = {  # model overrides, and which apply() arguments carry the mask
    "causal": ({}, ()),
    "window_sinks": (dict(sliding_window=20, attention_sinks=3), ()),  # the band on columns at row offsets
    "packed_window": (dict(sliding_window=20, attention_sinks=3), ("segment_ids", "positions")),  # dense rows
    "prefix": ({}, ("prefix_len",)),  # not causal
    "mqa": (dict(n_heads=4, n_kv_heads=1), ()),  # tensor splits the query heads, not the one kv head
}
TP = dict(fsdp=2, sequence=2, tensor=2, rules="fsdp_tp")
CASES = [(dict(fsdp=4, sequence=2), mask) for mask in MASKS if mask != "mqa"] + [
    (dict(data=2, fsdp=1, sequence=4), "causal"), (dict(data=2, fsdp=1, sequence=4), "packed_window"),
    (TP, "packed_window"), (TP, "mqa")]


def _inputs(names):
    rng = np.random.default_rng(3)
    segment_ids = np.sort(rng.integers(1, 5, (B, T)), axis=1)  # packed rows of up to 4 segments
    starts = np.maximum.accumulate(np.where(np.diff(segment_ids, prepend=0, axis=1) != 0, np.arange(T), 0), axis=1)
    every = {"segment_ids": segment_ids, "positions": np.arange(T) - starts, "prefix_len": np.array([0, 5, 50, 100])}
    return {k: jnp.asarray(every[k], jnp.int32) for k in names}


def _loss(cfg, mesh, rules, params, tokens, kw):
    """Next-token cross-entropy (the last position predicts the first token)."""
    with sharding.activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
        logp_BTV = jax.nn.log_softmax(model.apply(cfg, params, tokens, **kw))
    return -jnp.mean(jnp.take_along_axis(logp_BTV, jnp.roll(tokens, -1, axis=1)[..., None], axis=-1))


@functools.lru_cache(maxsize=None)
def _setup(mask):
    cfg = dataclasses.replace(ODD, max_seq_len=T, **MASKS[mask][0])
    params = random_params(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    kw = _inputs(MASKS[mask][1])
    plain = jax.jit(jax.value_and_grad(lambda p: _loss(cfg, None, "fsdp", p, tokens, kw)))(params)
    return cfg, params, tokens, kw, plain


@pytest.mark.parametrize("mesh_kw, mask", CASES, ids=[f"{'-'.join(f'{k}{v}' for k, v in m.items())}-{k}"
                                                      for m, k in CASES])
def test_sequence_sharded_loss_and_grads_equal_unsharded(mesh_kw, mask):
    cfg, params, tokens, kw, (loss, grads) = _setup(mask)
    mc = MeshConfig(**mesh_kw)
    mesh = sharding.make_mesh(mc)
    got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: _loss(cfg, mesh, mc.rules, p, tokens, kw)))(params)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(got_grads),
                          jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4, err_msg=str(path[0]))


def test_hidden_states_are_split_along_the_sequence_and_keys_gathered():
    """Per device, the layers' hidden states are [B/2, T/4, D]: no device ever holds a whole
    sequence's [B/2, T, D]; attention all-gathers keys and values over "sequence"."""
    cfg, params, tokens, _, _ = _setup("causal")
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, sequence=4))

    def hidden(params, tokens):
        with sharding.activate(mesh, "fsdp"):
            return model.hidden(cfg, params, tokens)

    compiled = jax.jit(hidden).lower(params, tokens).compile()
    hlo, D = compiled.as_text(), cfg.d_model
    assert f"f32[{B // 2},{T // 4},{D}]" in hlo
    assert f"f32[{B // 2},{T},{D}]" not in hlo  # not inside the scanned layers either
    assert "all-gather" in hlo
    x = compiled(params, tokens)
    assert x.addressable_shards[0].data.shape == (B // 2, T // 4, D)
    assert sharding.sequence_mesh() == (None, "")  # only inside `activate` with sequence > 1


@pytest.mark.parametrize("mask", ["causal", "window", "dense"])
def test_attention_rows_equals_the_reference_rows_at_any_offset(mask):
    """`attention_rows` on rows row0..row0+t (row0 traced) == those rows of `attention_reference`,
    outputs and gradients."""
    S, t, N, K, H = 192, 64, 6, 2, 4
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, S, n, H)), jnp.float32) for n in (N, K, K))
    w = jnp.asarray(rng.standard_normal((2, t, N, H)), jnp.float32)
    if mask == "dense":
        full = attn.make_mask(S, jnp.asarray(np.sort(rng.integers(1, 4, (2, S)), axis=1)), window=50)
    else:
        full = attn.Mask(None, window=50 if mask == "window" else 0, sinks=3 if mask == "window" else 0)
    for row0 in (0, 64, 128):
        rows = slice(row0, row0 + t)
        local = full if full.dense_BTS is None else full._replace(dense_BTS=full.dense_BTS[:, rows])

        def ours(q, k, v, row0):
            out = attn.attention_rows(q[:, rows], k, v, local, row0, block=32)
            return jnp.sum(out * w), out

        def ref(q, k, v):
            out = attn.attention_reference(q, k, v, full)[:, rows]
            return jnp.sum(out * w), out

        got = jax.jit(jax.grad(ours, argnums=(0, 1, 2), has_aux=True))(q, k, v, row0)
        want = jax.grad(ref, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_generation_under_a_sequence_mesh_equals_unsharded():
    """The sampler runs on a mesh with sequence > 1: the prefill goes context-parallel where the
    prompt width divides, decode steps and the cache leave the sequence whole."""
    cfg = dataclasses.replace(ODD, max_seq_len=T)
    params = random_params(cfg)
    prompts = jnp.asarray(np.random.default_rng(5).integers(1, cfg.vocab_size, (4, 8)), jnp.int32)
    lengths = jnp.asarray([8, 3, 5, 1], jnp.int32)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, sequence=4))
    plain = jax.device_get(gen.generate(cfg, params, prompts, lengths, 6, temperature=1.0, key=4))
    sharded = jax.device_get(gen.generate(cfg, params, prompts, lengths, 6, temperature=1.0, key=4, mesh=mesh,
                                          rules="fsdp"))
    np.testing.assert_array_equal(sharded.tokens, plain.tokens)
    np.testing.assert_allclose(sharded.logprobs, plain.logprobs, atol=1e-5)


def test_encoder_decoder_sequence_sharded_equals_unsharded():
    """Both sides split: the encoder's bidirectional and the cross-attention's dense masks by rows."""
    cfg = dataclasses.replace(ODD, arch="encoder_decoder", max_seq_len=T)
    params = random_params(cfg)
    rng = np.random.default_rng(2)
    enc, dec = (jnp.asarray(rng.integers(1, cfg.vocab_size, (B, n)), jnp.int32) for n in (48, 32))
    seg = lambda n: jnp.asarray(np.repeat([[1, 2]], n // 2, axis=1).reshape(1, n).repeat(B, 0), jnp.int32)
    mesh = sharding.make_mesh(MeshConfig(fsdp=4, sequence=2))

    def loss(p, mesh):
        with sharding.activate(mesh, "fsdp") if mesh is not None else contextlib.nullcontext():
            logits = model.apply(cfg, p, enc, seg(48), decoder_tokens=dec, decoder_segment_ids=seg(32))
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 1])

    want = jax.jit(jax.value_and_grad(lambda p: loss(p, None)))(params)
    got = jax.jit(jax.value_and_grad(lambda p: loss(p, mesh)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
