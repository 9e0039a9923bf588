"""The chunked LM loss: same loss, metrics and gradients as the full-logits loss, less memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model, perf
from jaxlm.config import ModelConfig
from jaxlm.objectives.lm import lm_loss
from jaxlm.testing import random_batch
from jaxlm.train.pretrain import lm_objective


def lm_loss_fn(cfg, loss_chunk=0):
    """The policy's (loss_sum, metrics) as a function of its params alone."""
    loss = lm_objective(cfg, loss_chunk).loss
    return lambda params, batch: loss({"policy": params}, {}, batch)


def _batch(rng, B, T, V):
    """One [B, T] batch, 70% of its positions in the loss."""
    return {k: jnp.asarray(v[0]) for k, v in random_batch(rng, 1, B, T, V, keep=0.7).items()}


def test_lm_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 5, 11)) * 3).astype(np.float32)
    targets = rng.integers(0, 11, (3, 5))
    targets[0] = logits[0].argmax(-1)  # a row of hits
    mask = (rng.random((3, 5)) < 0.8).astype(np.float32)
    loss_of = lambda x: lm_loss(x, jnp.asarray(targets), jnp.asarray(mask))
    (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(logits))

    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    onehot = np.eye(11)[targets]
    nll = -(logp * onehot).sum(-1)
    np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-6)
    assert float(metrics["accuracy"][0]) == ((x.argmax(-1) == targets) * mask).sum()
    assert float(metrics["accuracy"][1]) == float(metrics["loss"][1]) == mask.sum()
    expected = (np.exp(logp) - onehot) * mask[..., None] / mask.sum()  # softmax - onehot
    np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_full_loss_and_gradients(tied):
    cfg = ModelConfig(vocab_size=67, d_model=24, n_layers=2, n_heads=3, n_kv_heads=1, d_ff=40,
                      max_seq_len=32, tie_embeddings=tied, dtype="float32")
    params = model.init(cfg, jax.random.key(0))
    batch = _batch(np.random.default_rng(1), B=3, T=24, V=cfg.vocab_size)
    full = jax.value_and_grad(lm_loss_fn(cfg), has_aux=True)
    chunked = jax.value_and_grad(lm_loss_fn(cfg, loss_chunk=8), has_aux=True)  # 3 chunks
    (lf, mf), gf = full(params, batch)
    (lc, mc), gc = chunked(params, batch)
    np.testing.assert_allclose(lc, lf, rtol=1e-5)
    assert float(mc["loss"][1]) == float(mf["loss"][1])  # tokens
    assert float(mc["accuracy"][0]) == float(mf["accuracy"][0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), gc, gf)


def test_chunked_loss_keeps_the_logits_out_of_memory():
    # Logits [2, 512, 8192] float32 are 32 MiB (and their gradient as much); chunks of 64 positions
    # hold 4 MiB at a time.
    cfg = ModelConfig(vocab_size=8192, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                      max_seq_len=512, dtype="float32")
    params = model.abstract_params(cfg)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                         _batch(np.random.default_rng(0), B=2, T=512, V=cfg.vocab_size))
    peak = {}
    for chunk in (0, 64):
        grad = jax.jit(jax.grad(lambda p, b: lm_loss_fn(cfg, chunk)(p, b)[0]))
        peak[chunk] = perf.peak_bytes(grad.lower(params, batch).compile())
    if peak[0] is None:
        pytest.skip("this backend reports no memory analysis")
    assert peak[64] < peak[0] / 2.5, peak
