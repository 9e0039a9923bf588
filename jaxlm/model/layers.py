"""NNX layers of the LLaMA-style decoder: each takes only the sizes it needs.

Every parameter carries its logical axis names in `axes` metadata; `jaxlm.sharding` maps
them to mesh axes through one table. Parameters are stored in `param_dtype` and cast to
the compute `dtype` at use.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.model import attention as attn_lib


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, w_axes: tuple = ()) -> jax.Array:
    """x [B, T, *in] @ w [*in, *out] -> [B, T, *out], run as one [B*T, in] x [in, out] matmul.

    XLA:CPU runs the einsum form of this slower: for a [B, T, D] input the weight gradient
    contracts two axes, and where `out` has several axes the backward transposes the cotangent
    (a copy the size of the activations). On flattened rows both gradients are plain matmuls
    (benchmarks/README.md). Merging weight axes that the mesh splits (tensor parallelism) would
    reshard the weight, so where `w_axes` (w's logical names) says so the einsum stays; and so
    where the sequence is split (context parallelism): rows split over batch and sequence do not
    merge in place, and the partitioner would gather the whole sequence.
    """
    lead, ins, outs = x.shape[:-n_in], w.shape[:n_in], w.shape[n_in:]
    merged = (w_axes[:n_in] if n_in > 1 else ()) + (w_axes[n_in:] if len(outs) > 1 else ())
    if sharding.splits(merged) or (len(lead) > 1 and sharding.splits(("act_seq",))):
        return jnp.tensordot(x, w, axes=n_in)
    y = x.reshape(math.prod(lead), math.prod(ins)) @ w.reshape(math.prod(ins), math.prod(outs))
    return y.reshape(*lead, *outs)


class Embed(nnx.Module):
    """Token embedding table [V, D]; `attend` is the tied output projection."""

    def __init__(self, vocab: int, dim: int, std: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(_normal(rngs, (vocab, dim), std, param_dtype),
                                   axes=("vocab", "embed"))

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...].astype(self.dtype), tokens_BT, axis=0)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        return dense(x_BTD, self.embedding[...].astype(self.dtype).T)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE: N query heads share K kv heads."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qkv_bias: bool, std: float,
                 attention: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        H = dim // n_heads
        self.dtype, self.attention = dtype, attention
        self.q = nnx.Param(_normal(rngs, (dim, n_heads, H), std, param_dtype),
                           axes=("embed", "q_heads", "head_dim"))
        # k and v in one kernel [D, 2, K, H]: one matmul instead of two.
        self.kv = nnx.Param(_normal(rngs, (dim, 2, n_kv_heads, H), std, param_dtype),
                            axes=("embed", "kv", "kv_heads", "head_dim"))
        self.o = nnx.Param(_normal(rngs, (n_heads, H, dim), std, param_dtype),
                           axes=("q_heads", "head_dim", "embed"))
        if qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((n_heads, H), param_dtype), axes=("q_heads", "head_dim"))
            self.kv_bias = nnx.Param(jnp.zeros((2, n_kv_heads, H), param_dtype),
                                     axes=("kv", "kv_heads", "head_dim"))
        else:
            self.q_bias = self.kv_bias = None

    def __call__(self, x_BTD, sin_BTH, cos_BTH, mask):
        q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, sin_BTH, cos_BTH)
        return self.output(attn_lib.attend(q_BTNH, k_BTKH, v_BTKH, mask, impl=self.attention))

    def project(self, x_BTD, sin_BTH, cos_BTH):
        """Queries [B, T, N, H], keys and values [B, T, K, H], RoPE applied to q and k (none where the
        tables are None: positions enter as an attention bias instead)."""
        q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, x_BTD)
        if sin_BTH is None:
            return q_BTNH, k_BTKH, v_BTKH
        q_BTNH = attn_lib.apply_rope(q_BTNH, sin_BTH, cos_BTH)
        k_BTKH = attn_lib.apply_rope(k_BTKH, sin_BTH, cos_BTH)
        return q_BTNH, k_BTKH, v_BTKH

    def qkv(self, x_BTD, x_BSD):
        """Queries [B, T, N, H] of x_BTD, keys and values [B, S, K, H] of x_BSD (the same x for
        self-attention, the encoder's output for cross-attention); no positions."""
        cast = lambda p: p[...].astype(self.dtype)
        q_BTNH = dense(x_BTD, cast(self.q), w_axes=self.q.axes)
        kv_BSCKH = dense(x_BSD, cast(self.kv), w_axes=self.kv.axes)
        if self.q_bias is not None:
            q_BTNH = q_BTNH + cast(self.q_bias)
            kv_BSCKH = kv_BSCKH + cast(self.kv_bias)
        # a split, not two slices: its gradient is one concatenate instead of two padded adds
        k_BSKH, v_BSKH = (a[:, :, 0] for a in jnp.split(kv_BSCKH, 2, axis=2))
        return q_BTNH, k_BSKH, v_BSKH

    def output(self, out_BTNH):
        return dense(out_BTNH, self.o[...].astype(self.dtype), n_in=2, w_axes=self.o.axes)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
    """Gated feed-forward, down(act(gate(x)) * up(x)): SwiGLU (act silu) or GeGLU (gelu_tanh); gate
    and up share one kernel [D, 2, F]."""

    def __init__(self, dim: int, hidden: int, std: float, activation: str = "silu", *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.dtype, self.activation = dtype, activation
        self.gate_up = nnx.Param(_normal(rngs, (dim, 2, hidden), std, param_dtype),
                                 axes=("embed", "gate", "mlp"))
        self.down = nnx.Param(_normal(rngs, (hidden, dim), std, param_dtype), axes=("mlp", "embed"))

    def __call__(self, x_BTD):
        h_BTCF = dense(x_BTD, self.gate_up[...].astype(self.dtype), w_axes=self.gate_up.axes)
        gate_BTF, up_BTF = (a[:, :, 0] for a in jnp.split(h_BTCF, 2, axis=2))
        return dense(ACTIVATIONS[self.activation](gate_BTF) * up_BTF, self.down[...].astype(self.dtype))
