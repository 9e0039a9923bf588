"""The encoder-decoder (`model.arch: encoder_decoder`): T5's layout on the decoder's parts.

A bidirectional encoder (pre-norm blocks of self-attention and SwiGLU, as the decoder's) reads
the inputs; a causal decoder whose blocks add cross-attention to the encoder's final-norm output
writes the targets. One embedding table serves both sides (and the output head when tied), as
in T5. Both stacks are scanned over their stacked layer params, as `Transformer`.

Masks: an encoder token sees every token of its own segment; a decoder token sees the earlier
tokens of its own segment and, through cross-attention, every encoder token of the segment with
the same id, so packed rows (several examples per row, `encoder_segment_ids` and
`decoder_segment_ids` numbering them alike) never mix. Segment id 0 is padding, on either side.
Self-attention runs RoPE on each side's positions (restarting per segment), or with
`model.position: t5_relative` T5's learned bias per head by bucket of relative position (one table
per stack: bidirectional buckets in the encoder, one-way in the decoder); cross-attention has no
positions, as in T5.

Generation (`start_decoding`, `step`): the inputs are encoded once and every decoder layer's
cross-attention keys and values computed once; the decoder then runs one token at a time from
the start id (the pad id, as training's rows begin the decoder) over a KV cache of its own.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.model import attention as attn_lib
from jaxlm.model import kv_cache
from jaxlm.model.layers import MLP, Attention, Embed, RMSNorm, _normal
from jaxlm.model.transformer import (Block, Transformer, _dtypes, _rope, init_cache, run_stack, stacked_blocks,
                                     write_cache)

ACT = ("act_batch", "act_seq", "act_embed")


class CrossAttention(Attention):
    """Queries from the decoder, keys and values from the encoder's output; no RoPE."""

    def __call__(self, x_BTD, enc_BSD, mask):
        return self.output(attn_lib.attend(*self.qkv(x_BTD, enc_BSD), mask, impl=self.attention))

    def keys_values(self, enc_BSD):
        """The encoder output's keys and values in the cache layout [B, K, S, H], for generation."""
        _, k_BSKH, v_BSKH = self.qkv(enc_BSD[:, :1], enc_BSD)
        return k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)

    def cached(self, x_BTD, k_BKSH, v_BKSH, mask):
        """Cross-attention of new decoder columns over keys and values from `keys_values`."""
        q_BTNH = self.qkv(x_BTD, x_BTD[:, :1])[0]
        return self.output(kv_cache.attention_cached(q_BTNH, k_BKSH, v_BKSH, mask))


class DecoderBlock(nnx.Module):
    """x + self_attn(norm(x)), then x + cross_attn(norm(x), encoder output), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        args = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.qkv_bias, cfg.init_std, cfg.attention)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=dt["param_dtype"], rngs=rngs)
        self.attn = Attention(*args, **dt, rngs=rngs)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=dt["param_dtype"], rngs=rngs)
        self.cross = CrossAttention(*args, **dt, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=dt["param_dtype"], rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.init_std, cfg.activation, **dt, rngs=rngs)

    def __call__(self, x_BTD, sin, cos, mask, enc_BSD, cross_mask):
        x_BTD = sharding.constrain(x_BTD + self.attn(self.attn_norm(x_BTD), sin, cos, mask), ACT)
        x_BTD = sharding.constrain(x_BTD + self.cross(self.cross_norm(x_BTD), enc_BSD, cross_mask), ACT)
        return sharding.constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD)), ACT)

    def step(self, x_BTD, sin, cos, mask, k_BKSH, v_BKSH, index, cross_k, cross_v, cross_mask):
        """The block on new decoder columns at `index`, their keys and values written into this
        layer's cache (in place). Returns (x, k cache, v cache)."""
        q_BTNH, k_BTKH, v_BTKH = self.attn.project(self.attn_norm(x_BTD), sin, cos)
        start_B = jnp.zeros(x_BTD.shape[:1], jnp.int32)
        k_BKSH = write_cache(k_BKSH, k_BTKH, index, start_B, False, kv_cache.Layout())
        v_BKSH = write_cache(v_BKSH, v_BTKH, index, start_B, False, kv_cache.Layout())
        x_BTD = x_BTD + self.attn.output(kv_cache.attention_cached(q_BTNH, k_BKSH, v_BKSH, mask))
        x_BTD = x_BTD + self.cross.cached(self.cross_norm(x_BTD), cross_k, cross_v, cross_mask)
        return sharding.constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD)), ACT), k_BKSH, v_BKSH


def _positions(positions_BT, B: int, T: int):
    if positions_BT is not None:
        return positions_BT
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def cross_mask(decoder_segment_ids_BT, encoder_segment_ids_BS, B: int, T: int, S: int) -> attn_lib.Mask:
    """Decoder query t sees encoder key s iff their segment ids are equal (all of them without ids)."""
    if decoder_segment_ids_BT is None and encoder_segment_ids_BS is None:
        return attn_lib.Mask(jnp.ones((B, T, S), bool), causal=False)
    dec = jnp.ones((B, T), jnp.int32) if decoder_segment_ids_BT is None else decoder_segment_ids_BT
    enc = jnp.ones((B, S), jnp.int32) if encoder_segment_ids_BS is None else encoder_segment_ids_BS
    return attn_lib.Mask(dec[:, :, None] == enc[:, None, :], causal=False)


class DecodingCache(NamedTuple):
    """Generation state: the decoder's own KV cache (columns from 0, no padding), every layer's
    cross-attention keys and values [B, K, S, H] (tuples of L), and which encoder columns are real."""

    self_cache: kv_cache.KVCache
    cross_k: tuple
    cross_v: tuple
    enc_real_BS: jax.Array


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, **dt, rngs=rngs)
        self.encoder = stacked_blocks(Block, cfg, cfg.n_encoder_layers or cfg.n_layers, rngs)
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=dt["param_dtype"], rngs=rngs)
        self.decoder = stacked_blocks(DecoderBlock, cfg, cfg.n_layers, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=dt["param_dtype"], rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(
            _normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, dt["param_dtype"]),
            axes=("embed", "vocab"))
        # model.position=t5_relative: a bias [buckets, heads] per stack, shared by its layers
        table = lambda: nnx.Param(_normal(rngs, (cfg.relative_buckets, cfg.n_heads), cfg.init_std,
                                          dt["param_dtype"]), axes=("buckets", "q_heads"))
        relative = cfg.position == "t5_relative"
        self.encoder_relative = table() if relative else None
        self.decoder_relative = table() if relative else None

    def _positional(self, table, mask, q_pos_BT, k_pos_BS, bidirectional: bool):
        """(sin, cos, mask) for self-attention: RoPE's tables of the query positions, or with a
        relative `table` (model.position=t5_relative) none and `mask` carrying its bias."""
        if table is None:
            return (*_rope(self.cfg, q_pos_BT), mask)
        bias = attn_lib.relative_bias(table[...], q_pos_BT, k_pos_BS, bidirectional, self.cfg.relative_max_distance)
        return None, None, mask._replace(bias=bias)

    def encode(self, tokens_BS, segment_ids_BS=None, positions_BS=None):
        """The encoder's final-norm output [B, S, D]: bidirectional within each segment."""
        B, S = tokens_BS.shape
        everywhere_BS = jnp.ones((B, S), bool)  # a prefix as long as the row: both ways
        mask = attn_lib.make_mask(S, segment_ids_BS, positions_BS, prefix_mask_BT=everywhere_BS)
        positions_BS = _positions(positions_BS, B, S)
        sin, cos, mask = self._positional(self.encoder_relative, mask, positions_BS, positions_BS, True)
        x_BSD = sharding.constrain(self.embed(tokens_BS), ACT)
        return self.encoder_norm(run_stack(self.cfg, self.encoder, x_BSD, sin, cos, mask))

    def decode(self, enc_BSD, tokens_BT, segment_ids_BT=None, positions_BT=None, encoder_segment_ids_BS=None):
        """The decoder's final-norm hidden states [B, T, D] over the encoder output `enc_BSD`."""
        B, T = tokens_BT.shape
        mask = attn_lib.make_mask(T, segment_ids_BT, positions_BT)
        xmask = cross_mask(segment_ids_BT, encoder_segment_ids_BS, B, T, enc_BSD.shape[1])
        positions_BT = _positions(positions_BT, B, T)
        sin, cos, mask = self._positional(self.decoder_relative, mask, positions_BT, positions_BT, False)
        x_BTD = sharding.constrain(self.embed(tokens_BT), ACT)
        return self.final_norm(run_stack(self.cfg, self.decoder, x_BTD, sin, cos, mask, enc_BSD, xmask))

    def hidden(self, tokens_BS, segment_ids_BS=None, positions_BS=None, *, decoder_tokens, decoder_segment_ids=None,
               decoder_positions=None):
        enc_BSD = self.encode(tokens_BS, segment_ids_BS, positions_BS)
        return self.decode(enc_BSD, decoder_tokens, decoder_segment_ids, decoder_positions, segment_ids_BS)

    logits = Transformer.logits  # the same embedding / head, the same projection

    def start_decoding(self, tokens_BS, lengths_B, length: int) -> DecodingCache:
        """Encode left-padded inputs [B, S] (row b's in its last lengths_B[b] columns) and prepare
        `length` decoder columns: an empty self-attention cache and each layer's cross keys/values."""
        cfg = self.cfg
        B, S = tokens_BS.shape
        cols_S = jnp.arange(S, dtype=jnp.int32)
        first_B = S - jnp.asarray(lengths_B, jnp.int32)
        real_BS = cols_S[None, :] >= first_B[:, None]
        enc_BSD = self.encode(tokens_BS, real_BS.astype(jnp.int32), jnp.maximum(cols_S[None, :] - first_B[:, None], 0))
        layer_def, layer_state = nnx.split(self.decoder)
        _, (k_L, v_L) = jax.lax.scan(lambda _, s: (None, nnx.merge(layer_def, s).cross.keys_values(enc_BSD)),
                                     None, layer_state)
        own = init_cache(cfg, B, length)  # the decoder's columns start at 0: no padding
        return DecodingCache(own, tuple(jnp.unstack(k_L)), tuple(jnp.unstack(v_L)), real_BS)

    def step(self, tokens_BT, cache: DecodingCache):
        """Final-norm hidden states [B, T, D] of T new decoder tokens at columns cache index..
        (position = column), and the cache holding their keys and values."""
        own = cache.self_cache
        B, T = tokens_BT.shape
        N, S = own.k_BKSH[0].shape[2], cache.enc_real_BS.shape[1]
        mask = kv_cache.cache_mask(own.start_B, own.index, T, N)
        xmask = cross_mask(None, cache.enc_real_BS.astype(jnp.int32), B, T, S)  # every real input token
        q_pos_BT = jnp.broadcast_to(own.index + jnp.arange(T, dtype=jnp.int32), (B, T))
        k_pos_BN = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))  # column = position
        sin, cos, mask = self._positional(self.decoder_relative, mask, q_pos_BT, k_pos_BN, False)
        x_BTD = sharding.constrain(self.embed(tokens_BT), ACT)
        layer_def, layer_state = nnx.split(self.decoder)

        def body(x_BTD, xs):
            state, k, v, ck, cv = xs
            x_BTD, k, v = nnx.merge(layer_def, state).step(x_BTD, sin, cos, mask, k, v, own.index, ck, cv, xmask)
            return x_BTD, (k, v)

        stacked = (layer_state, *(jnp.stack(c) for c in (own.k_BKSH, own.v_BKSH, cache.cross_k, cache.cross_v)))
        x_BTD, (k_L, v_L) = jax.lax.scan(body, x_BTD, stacked)
        own = own._replace(k_BKSH=tuple(jnp.unstack(k_L)), v_BKSH=tuple(jnp.unstack(v_L)), index=own.index + T)
        return self.final_norm(x_BTD), cache._replace(self_cache=own)
