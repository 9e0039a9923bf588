"""The KV-cache sampler: cache == full forward, greedy == an argmax loop, batch invariance,
top-k / top-p supports, log-probs, stop tokens, prefix-LM prompts, sharded == unsharded, one
compile per shape; and the prompt builders of `jaxlm generate`.

Sizes are odd where they can be (V=37, F=56, prompts of 3, 5, 7, 11, 20 tokens); heads are
N=8, K=4 so that a 2 x 4 (data x tensor) mesh splits them. float32 throughout.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import generate as gen
from jaxlm import model, sharding
from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.data.examples.fim import fim_permute
from jaxlm.testing import random_params

CFG = ModelConfig(vocab_size=37, d_model=48, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=56,
                  max_seq_len=64, rope_theta=100.0, dtype="float32")
T_REF = 48  # the reference forward's fixed width: causal, so later columns never change earlier logits


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, 0)


_full_logits = jax.jit(lambda p, tokens, prefix_len: model.apply(CFG, p, tokens, prefix_len=prefix_len))


def _ref_logits(params, seq, prefix_len=None):
    """Logits [len(seq), V] of one row by a full forward pass (no cache) over `seq`."""
    buf = np.zeros((1, T_REF), np.int32)
    buf[0, :len(seq)] = seq
    pl = np.array([prefix_len or 0], np.int32)
    return np.asarray(_full_logits(params, buf, pl))[0, :len(seq)]


def _prompts(lengths, seed=1):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    prompts = np.zeros((len(lengths), lengths.max()), np.int32)
    for b, n in enumerate(lengths):
        prompts[b, :n] = rng.integers(3, CFG.vocab_size, n)
    return prompts, lengths


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


# --- the cache ------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=4)
def _teacher_forced(params, left_BP, lengths_B, next_BN, bidirectional):
    """Cache logits at every step: prefill, then feed the given tokens one at a time."""
    logits_BV, cache = model.prefill(CFG, params, left_BP, lengths_B, left_BP.shape[1] + next_BN.shape[1],
                                     bidirectional=bidirectional)

    def step(cache, tokens_B):
        logits_B1V, cache = model.decode(CFG, params, tokens_B[:, None], cache)
        return cache, logits_B1V[:, 0]

    _, logits_NBV = jax.lax.scan(step, cache, next_BN.T)
    return jnp.concatenate([logits_BV[:, None], jnp.swapaxes(logits_NBV, 0, 1)], axis=1)


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_cache_logits_equal_a_full_forward_over_the_prefix_at_every_step(params, prefix_lm):
    """Rows of 3, 7 and 11 prompt tokens, left-padded in one batch; at each of 6 decode steps the
    cache's logits equal a fresh forward over that row's whole prefix (with prefix_len = prompt
    length for a prefix LM), to 1e-5."""
    prompts, lengths = _prompts([3, 7, 11])
    N = 6
    nxt = np.random.default_rng(2).integers(3, CFG.vocab_size, (3, N)).astype(np.int32)
    width = gen.prompt_bucket(int(lengths.max()))
    left = gen.left_pad(prompts, lengths, width)
    cached = np.asarray(_teacher_forced(params, left, lengths, nxt, prefix_lm))
    for b, n in enumerate(lengths):
        seq = np.concatenate([prompts[b, :n], nxt[b]])
        for t in range(N + 1):
            ref = _ref_logits(params, seq[:n + t], prefix_len=n if prefix_lm else None)[-1]
            np.testing.assert_allclose(cached[b, t], ref, rtol=1e-5, atol=1e-5, err_msg=f"row {b} step {t}")
    if prefix_lm:  # the prefix really is bidirectional: a causal forward differs
        causal = _ref_logits(params, prompts[1, :7])[-1]
        assert np.abs(cached[1, 0] - causal).max() > 1e-3


@pytest.mark.parametrize("unroll_layers", [True, False])
def test_decode_loop_holds_the_weights_in_the_compute_dtype(unroll_layers):
    """`compute_params` casts once what the model casts at every use, to the same logits, and
    the sampler's decode loop then carries bfloat16 weights (float32 ones would be read and
    converted at every step): its only float32 operands are the norm scales, used in float32."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16", qkv_bias=True, value_head=True)
    params = random_params(cfg, 0)
    cast = model.compute_params(cfg, params)
    kept = {jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_leaves_with_path(cast) if a.dtype == jnp.float32}
    assert kept == {"['final_norm']['scale']", "['layers']['attn_norm']['scale']",
                    "['layers']['mlp_norm']['scale']", "['value_head']"}
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    forward = jax.jit(lambda p: model.apply(cfg, p, tokens))
    np.testing.assert_array_equal(forward(cast), forward(params))
    # bfloat16 params under float32 compute stay as they are: a cast would double their bytes.
    narrow = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    wide = dataclasses.replace(cfg, dtype="float32")
    assert all(a is b for a, b in zip(jax.tree.leaves(model.compute_params(wide, narrow)), jax.tree.leaves(narrow)))
    prompts, lengths = _prompts([3, 7, 11])
    args = (gen.left_pad(prompts, lengths, 16), lengths, np.full(3, 8, np.int32), np.full(8, -1, np.int32),
            jnp.float32(1), jnp.float32(1), gen._row_keys(0, 3))
    loop = functools.partial(gen._loop, cfg, max_new=8, greedy=True, top_k=None, use_top_p=False,
                             bidirectional=False, pad_id=0, on_token=None, mesh=None, rules="fsdp_tp",
                             unroll_layers=unroll_layers)
    (w,) = [e for e in jax.make_jaxpr(loop)(params, *args).jaxpr.eqns if e.primitive.name == "while"]
    consts = w.invars[w.params["cond_nconsts"]:][:w.params["body_nconsts"]]
    floats = [v.aval for v in consts if jnp.issubdtype(v.aval.dtype, jnp.floating)]
    norms = {(cfg.d_model,), (cfg.n_layers, cfg.d_model)}
    assert all(a.dtype == jnp.bfloat16 or a.shape in norms for a in floats), floats
    assert sum(a.dtype == jnp.bfloat16 for a in floats) >= 6


def test_left_pad_places_each_prompt_in_the_last_columns():
    prompts = np.array([[5, 6, 7], [8, 0, 0]], np.int32)
    np.testing.assert_array_equal(gen.left_pad(prompts, np.array([3, 1]), 5, pad_id=0),
                                  [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8]])


# --- greedy, batching, log-probs, stops -----------------------------------------------------

def _argmax_loop(params, prompt, n_new, prefix_len=None):
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(np.argmax(_ref_logits(params, seq, prefix_len)[-1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_greedy_equals_an_argmax_loop_without_cache(params, prefix_lm):
    prompts, lengths = _prompts([5, 3, 11], seed=3)
    out = gen.generate(CFG, params, prompts, lengths, 8, prefix_lm=prefix_lm)
    assert out.tokens.shape == (3, 8) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(out.lengths, [8, 8, 8])
    np.testing.assert_array_equal(out.logprobs, 0.0)  # greedy draws with probability 1
    for b, n in enumerate(lengths):
        expected = _argmax_loop(params, prompts[b, :n], 8, prefix_len=n if prefix_lm else None)
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), expected, err_msg=f"row {b}")


SAMPLED = dict(temperature=1.0, top_p=0.95)


def test_a_prompt_gives_the_same_output_alone_and_in_a_batch(params):
    """Sampled with its own key, alone (bucket 16: 9 pad columns) and between a 20-token and a
    3-token prompt (bucket 32: 25 pad columns): the same tokens and log-probs."""
    prompts, lengths = _prompts([20, 7, 3], seed=4)
    keys = jax.random.split(jax.random.key(5), 3)
    batch = gen.generate(CFG, params, prompts, lengths, 8, key=keys, **SAMPLED)
    alone = gen.generate(CFG, params, prompts[1:2, :7], lengths[1:2], 8, key=keys[1:2], **SAMPLED)
    assert len(set(np.asarray(batch.tokens[1]).tolist())) > 1  # a real draw, not a constant
    again = gen.generate(CFG, params, prompts, lengths, 8, key=keys, **SAMPLED)
    np.testing.assert_array_equal(again.tokens, batch.tokens)  # the same keys reproduce the draws
    np.testing.assert_array_equal(batch.tokens[1], alone.tokens[0])
    np.testing.assert_allclose(batch.model_logprobs[1], alone.model_logprobs[0], atol=1e-5)
    np.testing.assert_allclose(batch.logprobs[1], alone.logprobs[0], atol=1e-5)


def _filtered_logprobs(logits_V, temperature, top_k, top_p):
    """Numpy reference of the sampling law: temperature, then the k best, then the nucleus."""
    z = np.asarray(logits_V, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[:top_k or len(z)]] = True
    if top_p is not None:
        p = np.exp(_log_softmax(np.where(keep, z, -np.inf)))
        cum_before = np.cumsum(p[order]) - p[order]
        keep[order[cum_before >= top_p]] = False
    return _log_softmax(np.where(keep, z, -np.inf))


FILTERED = dict(temperature=0.7, top_k=6, top_p=0.9)


def test_returned_logprobs_equal_recomputed_ones(params):
    """Per token: the model's log-softmax at temperature 1 from a full forward, and the filtered,
    tempered law's log-prob from a numpy reference."""
    prompts, lengths = _prompts([6, 2, 9, 4], seed=11)
    temperature, top_k, top_p = FILTERED["temperature"], FILTERED["top_k"], FILTERED["top_p"]
    out = jax.device_get(gen.generate(CFG, params, prompts, lengths, 8, key=7, **FILTERED))
    for b, n in enumerate(lengths):
        seq = np.concatenate([prompts[b, :n], out.tokens[b, :out.lengths[b]]])
        logits = _ref_logits(params, seq)
        for t in range(out.lengths[b]):
            tok = seq[n + t]
            np.testing.assert_allclose(out.model_logprobs[b, t], _log_softmax(logits[n + t - 1])[tok], atol=1e-4)
            ref = _filtered_logprobs(logits[n + t - 1], temperature, top_k, top_p)[tok]
            assert np.isfinite(ref), (b, t)  # the drawn token is inside the filtered support
            np.testing.assert_allclose(out.logprobs[b, t], ref, atol=1e-4)


def test_stop_tokens_and_limits_end_rows_independently(params):
    prompts, lengths = _prompts([5, 8, 6], seed=8)
    free = np.asarray(gen.generate(CFG, params, prompts, lengths, 8).tokens)
    # A stop token that row 0 first emits at step t0 >= 2; rows 1 and 2 stop at their own
    # first occurrence of it, or run to their limit: 8 for row 1, 5 for row 2.
    t0 = next(t for t in range(2, 8) if free[0, t] not in free[0, :t])
    stop = int(free[0, t0])
    out = jax.device_get(gen.generate(CFG, params, prompts, lengths, np.array([8, 8, 5]),
                                      stop_tokens=[stop], pad_id=0))
    for b, limit in enumerate([8, 8, 5]):
        hits = np.flatnonzero(free[b, :limit] == stop)
        expected_len = int(hits[0]) + 1 if len(hits) else limit
        assert out.lengths[b] == expected_len, (b, out.lengths[b], expected_len)
        np.testing.assert_array_equal(out.tokens[b, :expected_len], free[b, :expected_len])
        np.testing.assert_array_equal(out.tokens[b, expected_len:], 0)
        np.testing.assert_array_equal(out.model_logprobs[b, expected_len:], 0.0)
    assert out.lengths[0] == t0 + 1


# --- the sampling law -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def draws():
    """4000 draws from each of 3 rows of random logits under top-k=5, and under top-p=0.8."""
    logits = np.random.default_rng(9).normal(0, 2, (3, 23)).astype(np.float32)
    keys = jax.random.split(jax.random.key(10), 4000 * 3).reshape(4000, 3)
    sample = jax.jit(jax.vmap(lambda k, top_k, top_p: gen.sample_logits(logits, k, 1.3, top_k, top_p),
                              (0, None, None)), static_argnums=1)
    return logits, {"k": jax.device_get(sample(keys, 5, None)), "p": jax.device_get(sample(keys, None, 0.8))}


def test_top_k_never_samples_outside_the_k_best(draws):
    logits, out = draws
    tokens, logp = out["k"]
    for b in range(3):
        best5 = set(np.argsort(-logits[b])[:5].tolist())
        assert set(tokens[:, b].tolist()) == best5  # inside, and every one of them is drawn
        ref = _filtered_logprobs(logits[b], 1.3, 5, None)
        np.testing.assert_allclose(logp[:, b], ref[tokens[:, b]], atol=1e-5)
        # frequencies follow the renormalized law (within 5 standard errors)
        freq = np.bincount(tokens[:, b], minlength=23) / len(tokens)
        p = np.exp(ref)
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / len(tokens)) + 1e-9)


def test_top_p_never_samples_outside_the_nucleus(draws):
    logits, out = draws
    tokens, logp = out["p"]
    for b in range(3):
        p = np.exp(_log_softmax(logits[b] / 1.3))
        order = np.argsort(-p)
        size = int(np.searchsorted(np.cumsum(p[order]), 0.8) + 1)  # smallest prefix with mass >= 0.8
        nucleus = set(order[:size].tolist())
        assert set(tokens[:, b].tolist()) == nucleus
        np.testing.assert_allclose(logp[:, b], _filtered_logprobs(logits[b], 1.3, None, 0.8)[tokens[:, b]],
                                   atol=1e-5)


# --- sharding and compiles ---------------------------------------------------------------------

def test_sharded_equals_unsharded(params):
    """Batch on data (2), heads and the cache's kv heads on tensor (4), on the 8 fake devices; the
    result whole on every device (each process of a multi-process run reads every row)."""
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=4, rules="fsdp_tp"))
    prompts, lengths = _prompts([6, 2, 9, 4], seed=11)
    kwargs = dict(key=12, stop_tokens=[5], **FILTERED)
    plain = jax.device_get(gen.generate(CFG, params, prompts, lengths, 8, **kwargs))
    sharded = gen.generate(CFG, params, prompts, lengths, 8, mesh=mesh, rules="fsdp_tp", **kwargs)
    for a in jax.tree.leaves(sharded):
        assert a.sharding.is_fully_replicated and a.sharding.device_set == set(mesh.devices.flat)
    sharded = jax.device_get(sharded)
    np.testing.assert_array_equal(sharded.tokens, plain.tokens)
    np.testing.assert_array_equal(sharded.lengths, plain.lengths)
    np.testing.assert_allclose(sharded.logprobs, plain.logprobs, atol=1e-5)
    np.testing.assert_allclose(sharded.model_logprobs, plain.model_logprobs, atol=1e-5)


def test_compiles_once_across_calls_with_the_same_shapes(params):
    """Same batch, prompt bucket and budget: other prompts and lengths, temperatures, top-p values,
    seeds, stop tokens and per-row limits reuse the compiled sampler."""
    def call(seed, **kw):
        prompts, lengths = _prompts(np.random.default_rng(seed).integers(1, 17, 1), seed=seed)
        return gen.generate(CFG, params, prompts, lengths, kw.pop("limit", 8), **kw)

    call(0, **SAMPLED)
    before = gen._compiled_loop._cache_size()
    call(1, temperature=0.5, top_p=0.9, key=3)
    call(2, temperature=2.0, top_p=0.5, key=jax.random.key(4), stop_tokens=[7, 8])
    call(3, temperature=1.0, top_p=1.0, top_k=None, key=jax.random.split(jax.random.key(5), 1))
    call(4, temperature=0.3, top_p=0.99, limit=np.array([8]))
    assert gen._compiled_loop._cache_size() == before


# --- prompts for `jaxlm generate` --------------------------------------------------------------

def test_prompt_symbols_encode_to_their_ids_when_asked_and_infill_matches_fim_training_layout():
    tok = ByteTokenizer()
    sp = tok.special_ids
    written = "<|fim_prefix|>ab<|fim_suffix|>c<|fim_middle|>"
    assert gen.encode_prompt(tok, written).tolist() == [tok.eos_id, *tok.encode(written)]  # text, by default
    ids = gen.encode_prompt(tok, written, specials=True)  # `jaxlm generate --specials`
    assert ids.tolist() == [tok.eos_id, sp.fim_prefix, *tok.encode("ab"), sp.fim_suffix, *tok.encode("c"),
                            sp.fim_middle]
    assert gen.infill_prompt(tok, "ab", "c").tolist() == ids.tolist()
    # the training transform with the middle at the end: the prompt is everything before it
    doc = tok.encode("abXYc")
    psm = fim_permute(doc, 2, 4, sp, "psm")
    assert psm.tolist() == ids.tolist()[1:] + tok.encode("XY").tolist()
    spm = fim_permute(doc, 2, 4, sp, "spm")
    assert spm.tolist()[:-2] == gen.infill_prompt(tok, "ab", "c", mode="spm", doc_start=False).tolist()
    assert gen.encode_prompt(tok, "ab", doc_start=False).tolist() == tok.encode("ab").tolist()


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prompt_lengths=[0, 2]), "prompt_lengths"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=70), "max_seq_len"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0, temperature=1.0), "top_k"),
    (dict(top_p=1.5, temperature=1.0), "top_p"),
])
def test_bad_arguments_are_one_line_errors(params, kwargs, fragment):
    args = dict(prompt_lengths=[2, 2], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=fragment):
        gen.generate(CFG, params, np.ones((2, 2), np.int32), args.pop("prompt_lengths"), args.pop("max_new_tokens"),
                     **args)
