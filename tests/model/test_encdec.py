"""The encoder-decoder: the encoder sees both ways and the decoder only back, cross-attention
sees exactly its own segment's encoder tokens, packed == unpacked, sharded == unsharded, and a
tiny one really learns a task that needs the whole input (reversal)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import model, sharding
from jaxlm.config import ConfigError, MeshConfig, ModelConfig
from jaxlm.testing import random_params

CFG = ModelConfig(arch="encoder_decoder", vocab_size=37, d_model=48, n_layers=2, n_encoder_layers=3, n_heads=8,
                  n_kv_heads=4, d_ff=56, max_seq_len=64, rope_theta=100.0, dtype="float32")


# T5's relative position buckets instead of RoPE, few enough that these short rows reach the log-spaced
# ones; and T5 v1.1's gated GELU
T5 = dataclasses.replace(CFG, position="t5_relative", activation="gelu_tanh", relative_buckets=8,
                         relative_max_distance=12)


@pytest.fixture(scope="module", params=[CFG, T5], ids=["rope", "t5_relative"])
def cfg(request):
    return request.param


@pytest.fixture(scope="module")
def params(cfg):
    return random_params(cfg, 0)


apply = jax.jit(model.apply, static_argnums=0)


def _tokens(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(3, CFG.vocab_size, shape), jnp.int32)


def test_params_and_axes():
    p = model.abstract_params(CFG)
    assert p["encoder"]["attn"]["q"].shape[0] == 3 and p["decoder"]["cross"]["kv"].shape[0] == 2
    axes = model.logical_axes(CFG)
    assert axes["decoder"]["cross"]["q"] == ("layers", "embed", "q_heads", "head_dim")
    shapes = jax.tree.map(lambda a, names: len(a.shape) == len(names), p, axes,
                          is_leaf=lambda x: isinstance(x, tuple))
    assert all(jax.tree.leaves(shapes))


def test_encoder_sees_both_ways_decoder_only_back(cfg, params):
    enc, dec = _tokens((1, 9), 1), _tokens((1, 7), 2)
    base = apply(cfg, params, enc, decoder_tokens=dec)
    # the encoder's last token reaches every decoder position (bidirectional encoder, cross-attention)
    moved = apply(cfg, params, enc.at[0, -1].set(3 if enc[0, -1] != 3 else 4), decoder_tokens=dec)
    assert bool((jnp.abs(moved - base).max(-1) > 1e-4).all())
    # a decoder token reaches only the positions from it on
    moved = apply(cfg, params, enc, decoder_tokens=dec.at[0, 4].set(3 if dec[0, 4] != 3 else 4))
    change_T = np.asarray(jnp.abs(moved - base).max(-1))[0]
    assert (change_T[:4] == 0).all() and (change_T[4:] > 1e-4).all()


def test_packed_rows_equal_each_example_alone(cfg, params):
    """Two examples in one row (encoder 5 + 3 tokens and 2 padding, decoder 4 + 4 and 1 padding)
    give each example's own logits: no attention, self or cross, crosses a segment."""
    enc_a, enc_b, dec_a, dec_b = _tokens((1, 5), 3), _tokens((1, 3), 4), _tokens((1, 4), 5), _tokens((1, 4), 6)
    enc = jnp.concatenate([enc_a, enc_b, jnp.zeros((1, 2), jnp.int32)], 1)
    dec = jnp.concatenate([dec_a, dec_b, jnp.zeros((1, 1), jnp.int32)], 1)
    seg = lambda *n: jnp.asarray(np.concatenate([np.full(k, i) for i, k in enumerate(n, 1)])[None], jnp.int32)
    pos = lambda *n: jnp.asarray(np.concatenate([np.arange(k) for k in n])[None], jnp.int32)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n)))  # segment id 0: padding
    packed = apply(cfg, params, enc, pad(seg(5, 3), 2), pad(pos(5, 3), 2),
                   decoder_tokens=dec, decoder_segment_ids=pad(seg(4, 4), 1), decoder_positions=pad(pos(4, 4), 1))
    alone_a = apply(cfg, params, enc_a, decoder_tokens=dec_a)
    alone_b = apply(cfg, params, enc_b, decoder_tokens=dec_b)
    np.testing.assert_allclose(packed[:, :4], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 4:8], alone_b, rtol=1e-5, atol=1e-5)


def test_sharded_equals_unsharded(cfg, params):
    enc, dec = _tokens((2, 9), 7), _tokens((2, 6), 8)
    want = apply(cfg, params, enc, decoder_tokens=dec)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=4, rules="fsdp_tp"))
    placed = model.place(cfg, params, mesh, "fsdp_tp")
    assert len(placed["decoder"]["cross"]["q"].sharding.device_set) == 8

    @jax.jit
    def run(p, enc, dec):
        with sharding.activate(mesh, "fsdp_tp"):
            return model.apply(cfg, p, enc, decoder_tokens=dec)

    np.testing.assert_allclose(run(placed, enc, dec), want, rtol=1e-4, atol=5e-5)  # sums split 4 ways


def test_a_tiny_encoder_decoder_learns_to_reverse():
    """Reversing 6 tokens needs every input token at every output step: a decoder that could not
    see the input stays at ln 8 = 2.08 (8 equally likely symbols); this one falls below 0.3 in 300
    Adam steps (0.17 measured)."""
    cfg = dataclasses.replace(CFG, vocab_size=12, n_layers=2, n_encoder_layers=2)
    params = model.init(cfg, jax.random.key(0))
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def loss_fn(p, src, tgt):
        bos = jnp.full((src.shape[0], 1), 1, jnp.int32)
        logits = model.apply(cfg, p, src, decoder_tokens=jnp.concatenate([bos, tgt[:, :-1]], 1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()

    @jax.jit
    def step(p, s, key):
        src = jax.random.randint(key, (32, 6), 4, 12)
        loss, g = jax.value_and_grad(loss_fn)(p, src, src[:, ::-1])
        updates, s = opt.update(g, s)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for i in range(300):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[0] > 2.08 and np.mean(losses[-10:]) < 0.3, (losses[0], losses[-10:])


@pytest.mark.parametrize("fields, fragment", [
    (dict(arch="t5"), "model.arch='t5'"),
    (dict(arch="encoder_decoder", value_head=True), "model.value_head=True is not supported"),
    (dict(n_encoder_layers=-1), "model.n_encoder_layers=-1"),
    (dict(position="t5_relative"), "model.position=t5_relative is for model.arch=encoder_decoder"),
    (dict(arch="encoder_decoder", position="t5_relative", attention="blocks"), "model.attention=blocks has no"),
])
def test_bad_arch_settings_are_one_line_errors(fields, fragment):
    from jaxlm.config import Config
    from jaxlm.config import validate as validate_all

    with pytest.raises(ConfigError, match=fragment):
        validate_all(Config(model=dataclasses.replace(ModelConfig(), **fields)))


def test_decoder_and_encoder_decoder_arguments_do_not_mix():
    with pytest.raises(ValueError, match="decoder_tokens"):
        model.apply(CFG, random_params(CFG, 0), _tokens((1, 4), 0))
    decoder = dataclasses.replace(CFG, arch="decoder")
    with pytest.raises(ValueError, match="model.arch=encoder_decoder"):
        model.apply(decoder, random_params(decoder, 0), _tokens((1, 4), 0), decoder_tokens=_tokens((1, 4), 0))


def test_cached_decoding_equals_a_full_forward_at_every_step(cfg, params):
    """Inputs of 3, 7 and 9 tokens left-padded into 12 columns, encoded once; the decoder fed 8
    given tokens one at a time from the start id: the logits at every step equal a full forward of
    the unpadded input and the decoder's tokens so far."""
    lengths, N, start = np.array([3, 7, 9]), 8, 0
    inputs = [np.asarray(_tokens((1, n), 10 + n))[0] for n in lengths]
    left = np.stack([np.pad(x, (12 - len(x), 0)) for x in inputs])
    given = np.asarray(_tokens((3, N), 20))

    @jax.jit
    def cached(left, given):
        logits_BV, cache = model.prefill(cfg, params, left, jnp.asarray(lengths), 12 + N - 1, start_id=start)
        out = [logits_BV]
        for t in range(N - 1):
            logits_B1V, cache = model.decode(cfg, params, given[:, t:t + 1], cache)
            out.append(logits_B1V[:, 0])
        return jnp.stack(out, 1)

    got = cached(jnp.asarray(left), jnp.asarray(given))
    for b, x in enumerate(inputs):
        decoder = np.concatenate([[start], given[b, :N - 1]])[None]
        want = apply(cfg, params, jnp.asarray(x[None]), decoder_tokens=jnp.asarray(decoder))[0]
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=2e-5)


def test_greedy_generation_is_an_argmax_loop_of_full_forwards():
    """On RoPE (t5_relative's sampler is checked against transformers in tests/interop/test_hf_t5.py)."""
    from jaxlm.generate import generate

    cfg, params = CFG, random_params(CFG, 0)

    prompts = np.asarray(_tokens((2, 5), 30))
    out = generate(cfg, params, prompts, np.array([5, 2]), max_new_tokens=6)
    for b, n in enumerate([5, 2]):
        decoder = [0]
        for _ in range(6):
            logits = apply(cfg, params, jnp.asarray(prompts[b:b + 1, :n]), decoder_tokens=jnp.asarray([decoder]))
            decoder.append(int(jnp.argmax(logits[0, -1])))
        assert np.asarray(out.tokens)[b].tolist() == decoder[1:]


def test_relative_buckets_as_t5():
    """Buckets worked out by hand from T5's formula: 32 buckets up to distance 128; both ways, 16 a
    side, exact below 8, then 8 + floor(8 ln(d / 8) / ln 16); one way, exact below 16, then 16 +
    floor(16 ln(d / 16) / ln 8), keys after the query in bucket 0."""
    from jaxlm.model.attention import relative_bucket

    rel = np.array([0, -1, 1, -7, -9, -20, -127, 20, -1000, 1000])
    assert relative_bucket(rel, True, 32, 128).tolist() == [0, 1, 17, 7, 8, 10, 15, 26, 15, 31]
    rel = np.array([0, 5, -5, -15, -20, -127, -1000])
    assert relative_bucket(rel, False, 32, 128).tolist() == [0, 0, 5, 15, 17, 31, 31]


def test_t5_presets_have_t5_v1_1s_parameter_counts():
    """google/t5-v1_1-base and -large as transformers counts them (T5ForConditionalGeneration with the
    untied head, built on the meta device)."""
    from jaxlm.config import model_preset

    assert model.param_count(model_preset("t5-base")) == 247_577_856
    assert model.param_count(model_preset("t5-large")) == 783_150_080
