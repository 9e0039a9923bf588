"""The decoder: preset shapes and sizes, masks (causal, packed, prefix), kernels, remat, a numpy reference.

Sizes are deliberately odd (V=37, D=24, N=6, K=2 or 3, F=40, L=3) so that a transposed
axis cannot hide. Everything runs in float32; tolerances are stated per test.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model, sharding
from jaxlm.config import PRESET_NAMES, MeshConfig, ModelConfig, model_preset
from jaxlm.model import attention, kv_cache, layers

ODD = ModelConfig(vocab_size=37, d_model=24, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=40,
                  max_seq_len=64, rope_theta=100.0)
T = 12
# These tests compare numbers, not speed: skip XLA's expensive CPU passes (compiles ~2x faster).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_jit = functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)


@_jit
def _run(cfg, params, tokens, w_BTV, segment_ids=None, positions=None, prefix_len=None):
    """Logits, a weighted log-likelihood and its gradients: one compile per (cfg, mask kind).

    The loss weights every logit differently, so the gradients see every output.
    """
    def loss(p):
        logits = model.apply(cfg, p, tokens, segment_ids, positions, prefix_len)
        return jnp.sum(jax.nn.log_softmax(logits) * w_BTV), logits
    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, value, grads


def _random_params(cfg: ModelConfig, seed: int) -> dict:
    """Random params in the tree of `model.init` (no init compile): kernels ~N(0, 0.2^2),
    norm scales ~1 + N(0, 0.3^2), biases ~N(0, 0.3^2), so a dropped or transposed one shows."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            x = 1 + 0.3 * rng.standard_normal(a.shape)
        elif "bias" in name or "value_head" in name:
            x = 0.3 * rng.standard_normal(a.shape)
        else:
            x = 0.2 * rng.standard_normal(a.shape)
        return jnp.asarray(x, a.dtype)

    return jax.tree_util.tree_map_with_path(draw, model.abstract_params(cfg))


@pytest.fixture(scope="module")
def params():
    return _random_params(ODD, 0)


@pytest.fixture(scope="module")
def tokens():
    """[2, T] with every token distinct, so an embedding row belongs to one (row, position)."""
    return np.random.default_rng(1).permutation(ODD.vocab_size)[:2 * T].reshape(2, T).astype(np.int32)


@pytest.fixture(scope="module")
def w_BTV():
    return np.random.default_rng(2).standard_normal((2, T, ODD.vocab_size)).astype(np.float32)


def _masked(segment_ids=None, positions=None, prefix_len=None):
    """All three mask inputs, defaulted to no-ops, so every masked call shares one compile."""
    segment_ids = np.ones((2, T), np.int32) if segment_ids is None else np.asarray(segment_ids, np.int32)
    positions = (np.broadcast_to(np.arange(T, dtype=np.int32), (2, T)) if positions is None
                 else np.asarray(positions, np.int32))
    prefix_len = np.zeros(2, np.int32) if prefix_len is None else np.asarray(prefix_len, np.int32)
    return segment_ids, positions, prefix_len


def _assert_trees_close(a, b, rtol, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
                 a, b)


# --- shapes and sizes ----------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in PRESET_NAMES if model_preset(n).arch == "decoder"])
def test_preset_shapes_through_eval_shape(name):  # the encoder-decoders': tests/model/test_encdec.py
    cfg = model_preset(name)
    shapes = jax.eval_shape(lambda k: model.init(cfg, k), jax.random.key(0))
    V, D, L, N, K, F = cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff
    H = D // N
    expected = {
        "embed": {"embedding": (V, D)},
        "final_norm": {"scale": (D,)},
        "layers": {
            "attn_norm": {"scale": (L, D)},
            "attn": {"q": (L, D, N, H), "kv": (L, D, 2, K, H), "o": (L, N, H, D)},
            "mlp_norm": {"scale": (L, D)},
            "mlp": {"gate_up": (L, D, 2, F), "down": (L, F, D)},
        },
        "lm_head": (D, V),
    }
    assert jax.tree.map(lambda x: x.shape, shapes) == expected
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    assert jax.tree.map(lambda x: x.shape, model.abstract_params(cfg)) == expected
    axes = model.logical_axes(cfg)
    ndims = jax.tree.map(len, axes, is_leaf=lambda x: isinstance(x, tuple))
    assert ndims == jax.tree.map(lambda x: x.ndim, shapes)
    assert axes["layers"]["attn"]["kv"] == ("layers", "embed", "kv", "kv_heads", "head_dim")


def _llama_count(V, D, L, N, K, F):
    """Parameters of a LLaMA decoder, from the architecture (untied head, no biases)."""
    H = D // N
    attn = D * N * H + 2 * D * K * H + N * H * D
    mlp = 3 * D * F
    return V * D + L * (attn + mlp + 2 * D) + D + D * V


def test_7b_and_70b_parameter_counts():
    # Published: LLaMA-7B 6,738,415,616; LLaMA-2-70B 68,976,648,192 (the HF checkpoints' totals).
    assert _llama_count(32_000, 4096, 32, 32, 32, 11_008) == 6_738_415_616
    assert _llama_count(32_000, 8192, 80, 64, 8, 28_672) == 68_976_648_192
    for name, published in (("7b", 6_738_415_616), ("70b", 68_976_648_192)):
        cfg = model_preset(name)
        shapes = jax.eval_shape(lambda k: model.init(cfg, k), jax.random.key(0))
        assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == published
        assert model.param_count(cfg) == published


# --- masks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_causality_by_gradients(params, tokens, w_BTV, impl):
    """d logits[t] / d (embedding row of the token at s) is exactly 0 for s > t, nonzero else."""
    cfg = dataclasses.replace(ODD, attention=impl)
    later_TS = np.triu(np.ones((T, T), bool), k=1)
    for t in range(T):
        w_only_t = np.zeros_like(w_BTV)
        w_only_t[:, t] = w_BTV[:, t]
        grads = _run(cfg, params, tokens, w_only_t)[2]
        # Tokens are distinct: the embedding row of tokens[b, s] is used only at (b, s).
        g_BSD = np.asarray(grads["embed"]["embedding"])[tokens]
        size_BS = np.abs(g_BSD).max(-1)
        assert np.all(size_BS[:, later_TS[t]] == 0.0), (impl, t)
        assert np.all(size_BS[:, ~later_TS[t]] > 1e-7), (impl, t)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_packed_segments_equal_separate_runs(params, tokens, w_BTV, impl):
    cfg = dataclasses.replace(ODD, attention=impl)
    seg1, seg2 = tokens[0, :5], tokens[1, :4]
    # Row 0 packs [seg1 | seg2 | 3 pad]; row 1 is an unrelated unpacked row.
    packed = tokens.copy()
    packed[0] = np.concatenate([seg1, seg2, [0, 0, 0]])
    segment_ids = [[1] * 5 + [2] * 4 + [0] * 3, [1] * T]
    positions = [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], list(range(T))]
    packed_logits = np.asarray(_run(cfg, params, packed, w_BTV, *_masked(segment_ids, positions))[0])
    # Each segment alone, at the start of a row: what follows it cannot matter (causality).
    alone_logits = np.asarray(_run(cfg, params, tokens, w_BTV)[0])
    np.testing.assert_allclose(packed_logits[0, :5], alone_logits[0, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_logits[0, 5:9], alone_logits[1, :4], rtol=1e-5, atol=1e-5)
    # Without segment ids seg2 would see seg1: the comparison can tell.
    leaky = np.asarray(_run(cfg, params, packed, w_BTV, *_masked(None, positions))[0])
    assert np.abs(leaky[0, 5:9] - alone_logits[1, :4]).max() > 1e-3


def test_packed_segments_with_their_own_prefixes_equal_separate_runs(params, tokens):
    """prefix_mask gives each packed segment its own bidirectional prefix."""
    apply = _jit(lambda cfg, p, t, **kw: model.apply(cfg, p, t, **kw))
    seg1, seg2 = tokens[0, :5], tokens[1, :4]
    packed = np.concatenate([seg1, seg2, [0, 0, 0]])[None]
    segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 3])
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]])
    prefix_mask = np.array([[1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]], bool)  # prefixes of 2 and 3
    got = np.asarray(apply(ODD, params, packed, segment_ids=segment_ids, positions=positions,
                           prefix_mask=prefix_mask))
    alone1 = np.asarray(apply(ODD, params, seg1[None], prefix_len=np.array([2])))
    alone2 = np.asarray(apply(ODD, params, seg2[None], prefix_len=np.array([3])))
    np.testing.assert_allclose(got[0, :5], alone1[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0, 5:9], alone2[0], rtol=1e-5, atol=1e-5)
    # One row-level prefix_len cannot express this: with prefix_len=3 segment 1 differs.
    row = np.asarray(apply(ODD, params, packed, segment_ids=segment_ids, positions=positions,
                           prefix_len=np.array([3])))
    assert np.abs(row[0, :5] - alone1[0]).max() > 1e-4


def test_prefix_dependencies(params, tokens, w_BTV):
    """Logits at t depend on token s iff s <= t, or both lie in the example's prefix."""
    prefix = [4, 2]
    mask = _masked(prefix_len=prefix)
    base = np.asarray(_run(ODD, params, tokens, w_BTV, *mask)[0])
    depends_BTS = np.zeros((2, T, T), bool)
    for s in range(T):
        changed = tokens.copy()
        changed[:, s] = (changed[:, s] + 1) % ODD.vocab_size
        logits = np.asarray(_run(ODD, params, changed, w_BTV, *mask)[0])
        depends_BTS[:, :, s] = np.any(logits != base, axis=-1)
    t_idx, s_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    for b, P in enumerate(prefix):
        expected_TS = (s_idx <= t_idx) | ((s_idx < P) & (t_idx < P))
        np.testing.assert_array_equal(depends_BTS[b], expected_TS, err_msg=f"prefix_len={P}")


def test_make_mask_packed_with_per_segment_prefixes():
    # Row 0: segments [0:4] and [4:7], one pad token; prefix 2 in every segment (pad too).
    # Row 1: segments [0:3] and [3:8]; no prefix, so block-causal.
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 2, 2, 2, 2]])
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 3, 4]])
    mask = attention.make_mask(8, segment_ids, positions, jnp.array([2, 0]))
    row0 = [[1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 1]]
    row1 = [[1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1, 1]]
    np.testing.assert_array_equal(attention.dense_mask(mask, 2, 8), np.array([row0, row1], bool))
    plain = attention.make_mask(8)
    assert plain.dense_BTS is None
    np.testing.assert_array_equal(attention.dense_mask(plain, 2, 8), np.tril(np.ones((2, 8, 8), bool)))


# --- kernels and remat ---------------------------------------------------------------------

MASKS = {
    "causal": None,
    "packed": _masked([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [2] * 5],
                      [list(range(5)) + list(range(4)) + list(range(3)), list(range(7)) + list(range(5))]),
    "padded": _masked([[1] * 9 + [0] * 3, [1] * 10 + [0] * 2]),
    "prefix": _masked(prefix_len=[5, 0]),
    "packed+prefix": _masked([[1] * 7 + [2] * 5, [1] * 4 + [2] * 8],
                             [list(range(7)) + list(range(5)), list(range(4)) + list(range(8))], [3, 2]),
}


@pytest.mark.parametrize("kind", MASKS)
def test_dot_product_attention_matches_reference(params, tokens, w_BTV, kind):
    extra = MASKS[kind] or ()
    out = {impl: _run(dataclasses.replace(ODD, attention=impl), params, tokens, w_BTV, *extra)
           for impl in ("auto", "reference")}
    np.testing.assert_allclose(out["auto"][0], out["reference"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["auto"][1], out["reference"][1], rtol=1e-5)
    _assert_trees_close(out["auto"][2], out["reference"][2], rtol=1e-4, atol=1e-4)
    if kind != "causal":  # the mask matters: plain causal logits differ
        causal = _run(ODD, params, tokens, w_BTV)[0]
        assert float(jnp.abs(out["auto"][0] - causal).max()) > 1e-3


@pytest.mark.parametrize("kind", ["causal", "packed", "padded", "prefix"])
def test_causal_blocks_match_reference_with_gradients(kind):
    B, N, K, H, block = 2, 6, 2, 4, 4  # T = 12: three query blocks
    q, k, v, g = (jnp.asarray(np.random.default_rng(i).standard_normal((B, T, n, H)), jnp.float32)
                  for i, n in enumerate((N, K, K, N)))
    segment_ids, positions, prefix_len = (MASKS[kind] or _masked()) if kind != "prefix" else _masked(prefix_len=[5, 0])
    mask = attention.make_mask(T, None if kind == "causal" else segment_ids, positions,
                               prefix_len if kind == "prefix" else None)
    if kind == "prefix":  # keys after the query: blocks cannot skip them
        with pytest.raises(ValueError, match="causal"):
            attention.attention_causal_blocks(q, k, v, mask, block)
        return
    outs = {}
    for name, fn in (("blocks", functools.partial(attention.attention_causal_blocks, block=block)),
                     ("reference", attention.attention_reference)):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        outs[name] = (out, vjp(g))
    np.testing.assert_allclose(outs["blocks"][0], outs["reference"][0], rtol=1e-5, atol=1e-6)
    _assert_trees_close(outs["blocks"][1], outs["reference"][1], rtol=1e-5, atol=1e-5)


def test_causal_blocks_save_no_probabilities_and_match_reference_in_bfloat16():
    # The custom VJP keeps q, k, v, the output and one log-sum-exp per query row: nothing of
    # size [T, S] (the autodiff version kept every block's probabilities).
    B, N, K, H, block = 2, 6, 2, 4, 4
    q, k, v, g = (jnp.asarray(np.random.default_rng(i).standard_normal((B, T, n, H)), jnp.bfloat16)
                  for i, n in enumerate((N, K, K, N)))
    mask = attention.make_mask(T, jnp.asarray(MASKS["packed"][0]))
    blocks = functools.partial(attention.attention_causal_blocks, mask=mask, block=block)
    residuals = jax.vjp(blocks, q, k, v)[1]
    sizes = [x.size for x in jax.tree.leaves(residuals) if x.dtype != bool]
    assert sum(sizes) == 2 * q.size + k.size + v.size + B * T * N, sizes
    outs = {}
    for name, fn in (("blocks", blocks), ("reference", lambda q, k, v: attention.attention_reference(q, k, v, mask))):
        out, vjp = jax.vjp(fn, q, k, v)
        outs[name] = [np.asarray(x, np.float32) for x in (out, *vjp(g))]
    for got, want in zip(outs["blocks"], outs["reference"]):  # bfloat16: 8 bits of mantissa
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_cached_attention_matches_reference_over_the_cache_layout(bidirectional, dtype, tol):
    # Two new columns (index 9, 10) against a cache of 12, rows left-padded by 0 and 4 columns.
    B, N, K, H, S = 2, 6, 2, 4, 12
    q = jnp.asarray(np.random.default_rng(0).standard_normal((B, 2, N, H)), dtype)
    k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((B, S, K, H)), dtype) for i in (1, 2))
    mask = kv_cache.cache_mask(jnp.asarray([0, 4]), 9, 2, S, bidirectional)
    got = kv_cache.attention_cached(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    want = attention.attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)
    # The mask matters: row 1 would differ if its padding columns were attended to.
    unpadded = attention.attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                             kv_cache.cache_mask(jnp.asarray([0, 0]), 9, 2, S, bidirectional))
    assert float(jnp.abs(want[1] - unpadded[1]).max()) > 1e-2


def test_auto_attention_on_cpu_takes_blocks_and_matches_reference():
    # T = 128 is two blocks of 64: "auto" on CPU runs attention_causal_blocks (packed rows here).
    cfg = dataclasses.replace(ODD, max_seq_len=128)
    params = _random_params(cfg, 0)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg.vocab_size, (2, 128)).astype(np.int32)
    segment_ids = np.repeat(np.array([[1, 2, 3, 0], [1, 1, 2, 2]], np.int32), 32, axis=1)
    positions = np.tile(np.arange(32, dtype=np.int32), (2, 4))
    w = rng.standard_normal((2, 128, cfg.vocab_size)).astype(np.float32)
    q = k = v = jnp.ones((2, 128, 2, 4))
    mask = attention.make_mask(128, jnp.asarray(segment_ids), jnp.asarray(positions))
    takes_blocks = str(jax.make_jaxpr(lambda q: attention.attend(q, k, v, mask))(q)) == str(
        jax.make_jaxpr(lambda q: attention.attention_causal_blocks(q, k, v, mask))(q))
    assert takes_blocks == (jax.default_backend() == "cpu")
    out = {impl: _run(dataclasses.replace(cfg, attention=impl), params, tokens, w, segment_ids, positions,
                      np.zeros(2, np.int32)) for impl in ("auto", "reference")}
    np.testing.assert_allclose(out["auto"][0], out["reference"][0], rtol=1e-5, atol=1e-5)
    _assert_trees_close(out["auto"][2], out["reference"][2], rtol=1e-4, atol=1e-5)


def test_kernel_choice_per_mask_dtype_and_backend():
    causal, packed = attention.Mask(None), attention.make_mask(128, jnp.ones((1, 128), jnp.int32))
    prefix = attention.make_mask(128, prefix_len_B=jnp.array([5]))
    bf16, f32 = jnp.bfloat16, jnp.float32
    pick = lambda impl, mask, dtype=bf16, H=64, backend="gpu", cudnn=256, T=128: attention.kernel(
        impl, mask, T, T, dtype, H, backend, cudnn)
    # CPU: causal blocks wherever the mask stays inside the triangle and T is blocks of 64.
    assert [pick("auto", m, f32, backend="cpu", cudnn=0) for m in (causal, packed, prefix)] == [
        "blocks", "blocks", "xla"]
    assert pick("auto", causal, f32, backend="cpu", cudnn=0, T=96) == "xla"
    # CUDA GPU: cuDNN for the plain causal mask only; packed and prefix masks keep the XLA path,
    # where the explicit mask holds the segment boundaries.
    assert [pick("auto", m) for m in (causal, packed, prefix)] == ["cudnn", "xla", "xla"]
    assert pick("cudnn", packed) == "xla"
    assert pick("blocks", packed) == "blocks"
    # cuDNN takes bf16/fp16 and head dims that are multiples of 8 up to its limit.
    assert pick("auto", causal, jnp.float16) == "cudnn"
    assert [pick("auto", causal, f32), pick("auto", causal, H=36), pick("auto", causal, H=256, cudnn=128),
            pick("auto", causal, backend="tpu", cudnn=0), pick("auto", causal, cudnn=0)] == ["xla"] * 5
    assert pick("reference", causal) == "reference"
    with pytest.raises(ValueError,
                       match="model.attention=cudnn needs an Ampere or later CUDA GPU.*backend 'cpu', dtype float32"):
        pick("cudnn", causal, f32, backend="cpu", cudnn=0)
    if jax.default_backend() == "cpu":
        assert attention.cudnn_head_dim() == 0


@pytest.mark.skipif(attention.cudnn_head_dim() == 0, reason="needs a CUDA GPU with cuDNN")
def test_cudnn_attention_matches_reference_on_gpu():
    # The GPU path: "auto" in bf16 lowers to cuDNN's fused attention and gives the reference's
    # outputs and gradients; a packed mask stays on the XLA path and keeps its segments.
    # conftest.py puts the suite on CPU: on a GPU machine run this test with JAX_PLATFORMS=cuda.
    B, T, N, K, H = 2, 256, 8, 2, 64
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (B, T, n, H), jnp.bfloat16) for key, n in zip(keys, (N, K, K)))
    w = jax.random.normal(keys[3], (B, T, N, H), jnp.float32)
    segments = jnp.repeat(jnp.array([[1, 2], [1, 0]], jnp.int32), T // 2, axis=1)
    for mask, name in ((attention.Mask(None), "cudnn"), (attention.make_mask(T, segments), "xla")):
        loss = lambda impl: lambda q, k, v: jnp.sum(attention.attend(q, k, v, mask, impl).astype(jnp.float32) * w)
        assert attention.kernel("auto", mask, T, T, q.dtype, H, "gpu", attention.cudnn_head_dim()) == name
        hlo = jax.jit(loss("auto")).lower(q, k, v).as_text()
        assert ("cudnn" in hlo) == (name == "cudnn")
        # bf16 against a float32 reference: the kernel may err no more than twice the bf16
        # reference does (both keep the probabilities in bf16 for the second matmul).
        run = lambda impl, *a: jax.jit(jax.value_and_grad(loss(impl), argnums=(0, 1, 2)))(*a)
        exact = jax.tree.leaves(run("reference", *(x.astype(jnp.float32) for x in (q, k, v))))
        err = lambda got: [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
                           for a, b in zip(jax.tree.leaves(got), exact)]
        kernel_err, bf16_err = err(run("auto", q, k, v)), err(run("reference", q, k, v))
        assert all(a <= 2 * b + 1e-3 for a, b in zip(kernel_err, bf16_err)), (kernel_err, bf16_err)


def test_remat_policies_give_the_same_loss_and_gradients(params, tokens, w_BTV):
    out = {r: _run(dataclasses.replace(ODD, remat=r), params, tokens, w_BTV) for r in ("none", "dots", "full")}
    for r in ("dots", "full"):
        np.testing.assert_allclose(out[r][1], out["none"][1], rtol=1e-6)
        _assert_trees_close(out[r][2], out["none"][2], rtol=1e-5, atol=1e-6)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(out["none"][2]))


@pytest.mark.parametrize("change", [dict(scan_unroll=2), dict(scan_unroll=3), dict(scan_layers=False),
                                    dict(scan_layers=False, remat="full")])
def test_scan_unroll_and_unscanned_layers_give_the_same_logits(params, tokens, w_BTV, change):
    base = _run(ODD, params, tokens, w_BTV)
    out = _run(dataclasses.replace(ODD, **change), params, tokens, w_BTV)
    np.testing.assert_allclose(out[0], base[0], rtol=1e-5, atol=1e-6)
    _assert_trees_close(out[2], base[2], rtol=1e-5, atol=1e-6)


# --- variants ------------------------------------------------------------------------------

def test_qkv_bias_params():
    biased = model.abstract_params(dataclasses.replace(ODD, qkv_bias=True))
    assert biased["layers"]["attn"]["q_bias"].shape == (3, 6, 4)
    assert biased["layers"]["attn"]["kv_bias"].shape == (3, 2, 2, 4)
    assert "q_bias" not in model.abstract_params(ODD)["layers"]["attn"]
    # That the biases are used is checked against the numpy reference below.


def test_tied_embeddings_project_with_the_embedding_table(params, tokens, w_BTV):
    cfg = dataclasses.replace(ODD, tie_embeddings=True)
    tied = {k: v for k, v in params.items() if k != "lm_head"}
    assert set(model.abstract_params(cfg)) == set(tied)
    assert model.param_count(cfg) == model.param_count(ODD) - 24 * 37
    # Tied logits are an untied model's logits with lm_head = embedding^T.
    untied = {**params, "lm_head": params["embed"]["embedding"].T}
    np.testing.assert_allclose(_jit(model.apply)(cfg, tied, tokens),
                               _run(ODD, untied, tokens, w_BTV)[0], rtol=1e-5, atol=1e-5)


def test_value_head(params, tokens):
    with pytest.raises(ValueError, match="value_head"):
        jax.eval_shape(lambda: model.apply(ODD, params, tokens, head="value"))
    with pytest.raises(ValueError, match="lm, value"):
        jax.eval_shape(lambda: model.apply(ODD, params, tokens, head="values"))
    cfg = dataclasses.replace(ODD, value_head=True)
    p = {**params, "value_head": _random_params(cfg, 3)["value_head"]}
    assert p["value_head"].shape == (24,)
    both = _jit(lambda cfg, p: (model.hidden(cfg, p, tokens), model.apply(cfg, p, tokens, head="value")))
    hidden, values = both(cfg, p)
    assert values.shape == (2, T) and values.dtype == jnp.float32
    np.testing.assert_allclose(values, np.asarray(hidden) @ np.asarray(p["value_head"]), rtol=1e-5, atol=1e-5)


# --- a numpy reference ---------------------------------------------------------------------

def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * scale


def _rope(x_TH, theta):
    """Hugging Face Llama: x * cos + rotate_half(x) * sin, frequencies theta^(-2i/H) repeated twice."""
    T_, H = x_TH.shape
    inv_freq = theta ** (-np.arange(0, H, 2) / H)  # [H/2]
    freqs = np.concatenate([inv_freq, inv_freq])  # [H]
    angle = np.arange(T_)[:, None] * freqs[None, :]
    rotated = np.concatenate([-x_TH[:, H // 2:], x_TH[:, :H // 2]], axis=-1)
    return x_TH * np.cos(angle) + rotated * np.sin(angle)


def _reference_logits(cfg: ModelConfig, params, tokens_BT):
    """A LLaMA forward in float64 numpy, one head at a time, from the params dict alone."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
    out = []
    for tokens in np.asarray(tokens_BT):
        T_ = len(tokens)
        x = p["embed"]["embedding"][tokens]  # [T, D]
        for l in range(cfg.n_layers):
            a = jax.tree.map(lambda w: w[l], p["layers"])
            h = _rms_norm(x, a["attn_norm"]["scale"], cfg.norm_eps)
            attn = np.zeros_like(x)
            for n in range(N):
                kv_head = n // (N // K)  # HF repeat_kv: each kv head serves N/K consecutive heads
                q = h @ a["attn"]["q"][:, n, :]
                k = h @ a["attn"]["kv"][:, 0, kv_head, :]
                v = h @ a["attn"]["kv"][:, 1, kv_head, :]
                if cfg.qkv_bias:
                    q = q + a["attn"]["q_bias"][n]
                    k = k + a["attn"]["kv_bias"][0, kv_head]
                    v = v + a["attn"]["kv_bias"][1, kv_head]
                q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
                scores = q @ k.T / np.sqrt(H)
                scores[np.triu_indices(T_, 1)] = -np.inf
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                attn += (probs @ v) @ a["attn"]["o"][n]
            x = x + attn
            h = _rms_norm(x, a["mlp_norm"]["scale"], cfg.norm_eps)
            gate = h @ a["mlp"]["gate_up"][:, 0, :]
            up = h @ a["mlp"]["gate_up"][:, 1, :]
            x = x + (gate / (1 + np.exp(-gate)) * up) @ a["mlp"]["down"]
        x = _rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
        out.append(x @ p["lm_head"])
    return np.stack(out)


@pytest.mark.parametrize("n_heads, n_kv_heads, qkv_bias",
                         [(6, 2, False), (6, 3, True), (4, 2, False)])
def test_matches_numpy_reference(n_heads, n_kv_heads, qkv_bias):
    cfg = dataclasses.replace(ODD, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads, qkv_bias=qkv_bias,
                              norm_eps=1e-5, rope_theta=50.0)
    p = _random_params(cfg, 4)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    expected = _reference_logits(cfg, p, tokens)
    assert np.abs(expected).max() > 0.5  # the logits are far from fp32 noise
    actual = _jit(model.apply)(cfg, p, tokens)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape,w_shape,n_in", [((2, 5, 24), (24, 2, 40), 1),    # gate_up
                                                  ((2, 5, 6, 4), (6, 4, 24), 2),     # o
                                                  ((2, 5, 24), (24, 37), 1)])        # the head
def test_dense_matches_einsum_with_gradients(x_shape, w_shape, n_in):
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, w_shape))
    g = jnp.asarray(rng.standard_normal(x_shape[:2] + w_shape[n_in:]), jnp.float32)
    outs = {}
    for name, fn in (("dense", functools.partial(layers.dense, n_in=n_in)),
                     ("einsum", lambda x, w: jnp.tensordot(x, w, axes=n_in))):
        out, vjp = jax.vjp(fn, x, w)
        outs[name] = (out, vjp(g))
    assert outs["dense"][0].shape == x_shape[:2] + w_shape[n_in:]
    np.testing.assert_allclose(outs["dense"][0], outs["einsum"][0], rtol=1e-5, atol=1e-5)
    _assert_trees_close(outs["dense"][1], outs["einsum"][1], rtol=1e-5, atol=1e-5)


def test_dense_keeps_weights_whole_where_the_mesh_splits_a_merged_axis():
    # Merging [D, 2, F] into [D, 2F] with F split over "tensor" would reshard the weight: under
    # fsdp_tp with tensor=2, dense contracts the 3-D weight; under fsdp (F whole) it flattens it.
    x, w = jnp.ones((2, 4, 8)), jnp.ones((8, 2, 6))
    axes = ("embed", "gate", "mlp")

    def reshapes_w(rules):
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2, rules=rules))
        with sharding.activate(mesh, rules):
            jaxpr = jax.make_jaxpr(lambda x, w: layers.dense(x, w, w_axes=axes))(x, w)
        return any(e.primitive.name == "reshape" and e.invars[0] is jaxpr.jaxpr.invars[1]
                   for e in jaxpr.jaxpr.eqns)

    assert sharding.splits(("mlp",)) is False  # no mesh active
    assert reshapes_w("fsdp") and not reshapes_w("fsdp_tp")
