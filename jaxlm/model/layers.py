"""NNX layers of the LLaMA-style decoder: each takes only the sizes it needs.

Every parameter carries its logical axis names in `axes` metadata; `jaxlm.sharding` maps
them to mesh axes through one table. Parameters are stored in `param_dtype` and cast to
the compute `dtype` at use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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


class Embed(nnx.Module):
    """Token embedding table [V, D]; `attend` is the tied output projection."""

    def __init__(self, vocab: int, dim: int, std: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(_normal(rngs, (vocab, dim), std, param_dtype),
                                   axes=("vocab", "embed"))

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...].astype(self.dtype), tokens_BT, axis=0)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        return jnp.einsum("BTD,VD->BTV", x_BTD, self.embedding[...].astype(self.dtype))


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
        """Queries [B, T, N, H], keys and values [B, T, K, H], RoPE applied to q and k."""
        cast = lambda p: p[...].astype(self.dtype)
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, cast(self.q))
        kv_BTCKH = jnp.einsum("BTD,DCKH->BTCKH", x_BTD, cast(self.kv))
        if self.q_bias is not None:
            q_BTNH = q_BTNH + cast(self.q_bias)
            kv_BTCKH = kv_BTCKH + cast(self.kv_bias)
        k_BTKH, v_BTKH = kv_BTCKH[:, :, 0], kv_BTCKH[:, :, 1]
        q_BTNH = attn_lib.apply_rope(q_BTNH, sin_BTH, cos_BTH)
        k_BTKH = attn_lib.apply_rope(k_BTKH, sin_BTH, cos_BTH)
        return q_BTNH, k_BTKH, v_BTKH

    def output(self, out_BTNH):
        return jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o[...].astype(self.dtype))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up share one kernel [D, 2, F]."""

    def __init__(self, dim: int, hidden: int, std: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.gate_up = nnx.Param(_normal(rngs, (dim, 2, hidden), std, param_dtype),
                                 axes=("embed", "gate", "mlp"))
        self.down = nnx.Param(_normal(rngs, (hidden, dim), std, param_dtype), axes=("mlp", "embed"))

    def __call__(self, x_BTD):
        h_BTCF = jnp.einsum("BTD,DCF->BTCF", x_BTD, self.gate_up[...].astype(self.dtype))
        h_BTF = jax.nn.silu(h_BTCF[:, :, 0]) * h_BTCF[:, :, 1]
        return jnp.einsum("BTF,FD->BTD", h_BTF, self.down[...].astype(self.dtype))
