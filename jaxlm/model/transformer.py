"""The decoder: embedding, a scanned stack of pre-norm blocks, final norm, heads.

The blocks' parameters are stacked on a leading `layers` axis and run with
`jax.lax.scan`, so compile time does not grow with depth.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.model import attention as attn_lib
from jaxlm.model import kv_cache, pipeline
from jaxlm.model.layers import MLP, Attention, Embed, RMSNorm, _normal, dense

_REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _dtypes(cfg: ModelConfig):
    return dict(dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def rope_scaling_of(cfg: ModelConfig) -> attn_lib.RopeScaling:
    """The RoPE frequency scaling that the config's rope_* fields describe."""
    return attn_lib.RopeScaling(cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                                cfg.rope_high_freq_factor, cfg.rope_original_max_len, cfg.rope_beta_fast,
                                cfg.rope_beta_slow, cfg.rope_attention_factor, cfg.rope_truncate)


def _rope(cfg: ModelConfig, positions_BT):
    """RoPE sin and cos tables [B, T, H/2], with the config's frequency scaling."""
    return attn_lib.rope_tables(positions_BT, cfg.head_dim, cfg.rope_theta, rope_scaling_of(cfg))


class Block(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=dt["param_dtype"], rngs=rngs)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.qkv_bias, cfg.init_std,
                              cfg.attention, **dt, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=dt["param_dtype"], rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.init_std, cfg.activation, **dt, rngs=rngs)

    def __call__(self, x_BTD, sin, cos, mask):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), sin, cos, mask)
        x_BTD = sharding.constrain(x_BTD, ("act_batch", "act_seq", "act_embed"))
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return sharding.constrain(x_BTD, ("act_batch", "act_seq", "act_embed"))

    def extend(self, x_BTD, sin, cos, mask, k_BKSH, v_BKSH, index, start_B, first: bool,
               layout: kv_cache.Layout):
        """The block on T new columns: writes their keys and values into this layer's cache at
        column `index` (in place; `write_cache`), attends over the cache (or, when `first`, over
        the chunk alone: nothing precedes it). Returns (x, k cache, v cache)."""
        q_BTNH, k_BTKH, v_BTKH = self.attn.project(self.attn_norm(x_BTD), sin, cos)
        k_BKSH = write_cache(k_BKSH, k_BTKH, index, start_B, first, layout)
        v_BKSH = write_cache(v_BKSH, v_BTKH, index, start_B, first, layout)
        if first:
            out_BTNH = attn_lib.attend(q_BTNH, k_BTKH, v_BTKH, mask, impl=self.attn.attention)
        else:
            out_BTNH = kv_cache.attention_cached(q_BTNH, k_BKSH, v_BKSH, mask)
        x_BTD = x_BTD + self.attn.output(out_BTNH)
        x_BTD = sharding.constrain(x_BTD, ("act_batch", "act_seq", "act_embed"))
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return sharding.constrain(x_BTD, ("act_batch", "act_seq", "act_embed")), k_BKSH, v_BKSH


def write_cache(cache_BKSH, x_BTKH, index, start_B, first: bool, layout: kv_cache.Layout):
    """The cache with T new columns index..index+T-1 written where `layout` puts them.

    Plain layout: one `dynamic_update_slice` at slot `index`. Ring layout: a prefill (`first`,
    index 0) writes its last R columns rolled into place (column c at slot sinks + c % R); a decode
    step writes its one column at sinks + index % R; and each row's sink slot j takes column
    start_B + j when it is among the new ones.
    """
    x_BKTH = x_BTKH.transpose(0, 2, 1, 3).astype(cache_BKSH.dtype)
    T = x_BKTH.shape[2]
    if not layout.window:
        return jax.lax.dynamic_update_slice(cache_BKSH, x_BKTH, (0, 0, index, 0))
    n = layout.sinks
    R = cache_BKSH.shape[2] - n
    if first:
        m = min(T, R)
        last = x_BKTH[:, :, T - m:]
        ring = jnp.roll(last, T % R, axis=2) if m == R else last  # columns T-R..T-1 to slots c % R
        cache_BKSH = jax.lax.dynamic_update_slice(cache_BKSH, ring, (0, 0, n, 0))
    else:
        if T != 1:
            raise ValueError(f"a cache with a sliding window takes one new column per decode step; got {T}")
        cache_BKSH = jax.lax.dynamic_update_slice(cache_BKSH, x_BKTH, (0, 0, n + index % R, 0))
    if n:
        rel_Bn = start_B[:, None] + jnp.arange(n) - index  # where each row's sink column is in the chunk
        new_BKnH = jnp.take_along_axis(x_BKTH, jnp.clip(rel_Bn, 0, T - 1)[:, None, :, None], axis=2)
        arrived = ((rel_Bn >= 0) & (rel_Bn < T))[:, None, :, None]
        cache_BKSH = jax.lax.dynamic_update_slice(
            cache_BKSH, jnp.where(arrived, new_BKnH, cache_BKSH[:, :, :n]), (0, 0, 0, 0))
    return cache_BKSH


# The cache's slots are never split over "sequence": a decode step writes and reads one column of every
# row, which context parallelism (training on long sequences) would turn into collectives per step.
CACHE_AXES = ("act_batch", "act_heads", None, "head_dim")


def cache_layout(cfg: ModelConfig) -> kv_cache.Layout:
    """The KV cache's layout: a ring (and sink slots) under a sliding window, plain otherwise."""
    return kv_cache.Layout(cfg.sliding_window, cfg.attention_sinks if cfg.sliding_window else 0)


def init_cache(cfg: ModelConfig, batch: int, length: int, start_B=None) -> kv_cache.KVCache:
    """An empty cache for `length` columns of `batch` rows (start_B: first real column per row).

    Under a sliding window W it has attention_sinks + min(length, W) slots, however long `length`:
    generation past model.max_seq_len at constant memory.
    """
    layout = cache_layout(cfg)
    slots = layout.sinks + min(length, layout.window) if layout.window else length
    shape = (batch, cfg.n_kv_heads, slots, cfg.head_dim)
    zeros = (sharding.constrain(jnp.zeros(shape, jnp.dtype(cfg.compute_dtype)), CACHE_AXES),) * cfg.n_layers
    start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else jnp.asarray(start_B, jnp.int32)
    return kv_cache.KVCache(zeros, zeros, jnp.zeros((), jnp.int32), start_B)


def value_head_init(cfg: ModelConfig, key: jax.Array) -> jax.Array:
    """The value head's initial weights [D] ~ N(0, 1 / (D + 1)) (as InstructGPT's reward model and
    TRL's): values of order 1 from the start, for unit-scale final-norm features."""
    std = 1.0 / (cfg.d_model + 1) ** 0.5
    return (std * jax.random.normal(key, (cfg.d_model,), jnp.float32)).astype(jnp.dtype(cfg.param_dtype))


def stacked_blocks(block_cls, cfg: ModelConfig, n: int, rngs: nnx.Rngs):
    """n blocks with their params stacked on a leading axis (one module, scanned at use)."""
    block_def = nnx.graphdef(nnx.eval_shape(lambda: block_cls(cfg, rngs=nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), n)
    return nnx.merge(block_def, jax.vmap(lambda k: nnx.state(block_cls(cfg, rngs=nnx.Rngs(k))))(keys))


def run_stack(cfg: ModelConfig, layers, x_BTD, *args):
    """x through the stacked blocks `layers` (each called as block(x, *args)): one `lax.scan`, or a
    Python loop over per-layer slices (model.scan_layers: false), rematerialized per model.remat; or,
    where `sharding.activate` runs a pipeline schedule, as that pipeline (`jaxlm.model.pipeline`)."""
    layer_def, layer_state = nnx.split(layers)
    pipelined = sharding.pipeline_schedule()
    if pipelined is not None:  # a "stage" mesh axis: the layers as a pipeline over it
        mesh, schedule = pipelined
        layer = lambda x_BTD, state, args: nnx.merge(layer_def, state)(x_BTD, *args)
        return pipeline.run(layer, layer_state, x_BTD, args, mesh=mesh, schedule=schedule,
                            remat=_REMAT_POLICIES.get(cfg.remat))

    def body(x_BTD, state):
        return nnx.merge(layer_def, state)(x_BTD, *args), None

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    n = jax.tree.leaves(layer_state)[0].shape[0]
    if cfg.scan_layers:
        return jax.lax.scan(body, x_BTD, layer_state, unroll=min(cfg.scan_unroll, n))[0]
    for layer in range(n):
        x_BTD, _ = body(x_BTD, jax.tree.map(lambda a: a[layer], layer_state))
    return x_BTD


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, **dt, rngs=rngs)
        self.layers = stacked_blocks(Block, cfg, cfg.n_layers, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=dt["param_dtype"], rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(
            _normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, dt["param_dtype"]),
            axes=("embed", "vocab"))
        self.value_head = None if not cfg.value_head else nnx.Param(value_head_init(cfg, rngs.params()),
                                                                    axes=("embed",))

    def hidden(self, tokens_BT, segment_ids_BT=None, positions_BT=None, prefix_len_B=None,
               prefix_mask_BT=None):
        """Final-norm hidden states [B, T, D] in the compute dtype."""
        cfg = self.cfg
        B, T = tokens_BT.shape
        mask = attn_lib.make_mask(T, segment_ids_BT, positions_BT, prefix_len_B, prefix_mask_BT,
                                  window=cfg.sliding_window, sinks=cfg.attention_sinks)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        sin, cos = _rope(cfg, positions_BT)
        x_BTD = sharding.constrain(self.embed(tokens_BT), ("act_batch", "act_seq", "act_embed"))
        return self.final_norm(run_stack(cfg, self.layers, x_BTD, sin, cos, mask))

    def extend(self, tokens_BT, cache: kv_cache.KVCache, *, first: bool = False,
               bidirectional: bool = False, layers=None):
        """Final-norm hidden states [B, T, D] of T new tokens per row at columns cache.index..,
        and the cache holding their keys and values (index advanced by T).

        Row b's token at column c has position c - cache.start_B[b]. `first`: the chunk starts
        at column 0, so it attends within itself only (prefill). `bidirectional`: the chunk
        attends to itself both ways (a prefix LM's prompt). `layers`: per-layer params (a list,
        `jaxlm.model.layer_params`) to run as an unrolled loop instead of the scan: a scan slices
        (copies) every layer's weights out of the stack on each call, which dominates a one-token
        decode step; slices made once before a decode loop are not copied again.
        """
        cfg = self.cfg
        T = tokens_BT.shape[1]
        L, S = len(cache.k_BKSH), cache.k_BKSH[0].shape[2]
        columns_T = cache.index + jnp.arange(T, dtype=jnp.int32)
        positions_BT = jnp.maximum(columns_T[None, :] - cache.start_B[:, None], 0)
        layout = cache_layout(cfg)
        mask = kv_cache.cache_mask(cache.start_B, cache.index, T, T if first else S, bidirectional,
                                   window=layout.window, sinks=layout.sinks,
                                   layout=kv_cache.Layout() if first else layout)
        sin, cos = _rope(cfg, positions_BT)
        x_BTD = sharding.constrain(self.embed(tokens_BT), ("act_batch", "act_seq", "act_embed"))
        layer_def, layer_state = nnx.split(self.layers)

        def body(x_BTD, xs):
            state, k_BKSH, v_BKSH = xs
            block = nnx.merge(layer_def, state)
            x_BTD, k_BKSH, v_BKSH = block.extend(x_BTD, sin, cos, mask, k_BKSH, v_BKSH, cache.index,
                                                 cache.start_B, first, layout)
            return x_BTD, (k_BKSH, v_BKSH)

        if layers is None and not cfg.scan_layers:
            layers = [jax.tree.map(lambda a, i=i: a[i], layer_state) for i in range(L)]
        if layers is None:  # the scan takes and gives the layers' caches stacked
            x_BTD, (k_LBKSH, v_LBKSH) = jax.lax.scan(
                body, x_BTD, (layer_state, jnp.stack(cache.k_BKSH), jnp.stack(cache.v_BKSH)),
                unroll=min(cfg.scan_unroll, L))
            k_BKSH, v_BKSH = jnp.unstack(k_LBKSH), jnp.unstack(v_LBKSH)
        else:
            k_BKSH, v_BKSH = [], []
            for state, k, v in zip(layers, cache.k_BKSH, cache.v_BKSH):
                x_BTD, (k, v) = body(x_BTD, (state, k, v))
                k_BKSH.append(k)
                v_BKSH.append(v)
        constrain = lambda caches: tuple(sharding.constrain(c, CACHE_AXES) for c in caches)
        return self.final_norm(x_BTD), cache._replace(k_BKSH=constrain(k_BKSH), v_BKSH=constrain(v_BKSH),
                                                      index=cache.index + T)

    def logits(self, x_BTD):
        """Vocabulary logits [B, T, V] in float32."""
        if self.lm_head is None:
            logits_BTV = self.embed.attend(x_BTD)
        else:
            logits_BTV = dense(x_BTD, self.lm_head[...].astype(x_BTD.dtype))
        return sharding.constrain(logits_BTV, ("act_batch", "act_seq", "act_vocab")).astype(jnp.float32)

    def values(self, x_BTD):
        """One scalar per token [B, T] in float32 (reward model, PPO critic)."""
        if self.value_head is None:
            raise ValueError("head='value' needs model.value_head=true in the model config")
        return jnp.einsum("BTD,D->BT", x_BTD.astype(jnp.float32), self.value_head[...].astype(jnp.float32))
