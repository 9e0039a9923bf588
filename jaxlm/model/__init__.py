"""The model as pure functions: `init(cfg, key) -> params`, `apply(cfg, params, tokens)`.

`model.arch` picks the module: the decoder (`Transformer`) or the encoder-decoder
(`jaxlm.model.encdec.EncoderDecoder`, whose `apply` takes the targets' side as `decoder_tokens=`).

Params are a nested dict of arrays. Inside, the layers are Flax NNX modules: the module's
structure (graphdef) is built once per config, and `apply` merges it with the params.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.model.kv_cache import KVCache
from jaxlm.model.encdec import EncoderDecoder
from jaxlm.model.transformer import Transformer, init_cache

__all__ = ["init", "apply", "logical_axes", "abstract_params", "shardings", "init_sharded", "place", "param_count",
           "KVCache", "init_cache", "prefill", "decode", "layer_params", "compute_params"]


def _module_class(cfg: ModelConfig):
    return EncoderDecoder if cfg.arch == "encoder_decoder" else Transformer


def init(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters: a nested dict of `param_dtype` arrays."""
    return nnx.to_pure_dict(nnx.state(_module_class(cfg)(cfg, rngs=nnx.Rngs(params=key))))


@functools.lru_cache(maxsize=32)
def _structure(cfg: ModelConfig):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _module_class(cfg)(cfg, rngs=nnx.Rngs(0))))
    return graphdef, state


def abstract_params(cfg: ModelConfig, mesh=None, rules: str = "fsdp") -> dict:
    """ShapeDtypeStructs of the parameters, with no memory allocated; given a mesh, each carries its
    sharding under the logical-axis `rules` (a target to restore a checkpoint onto)."""
    abstract = nnx.to_pure_dict(_structure(cfg)[1])
    if mesh is None:
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        shardings(cfg, mesh, rules))


def shardings(cfg: ModelConfig, mesh, rules: str) -> dict:
    """The `NamedSharding` of every parameter on `mesh` under `rules` (same tree as the params)."""
    return sharding.param_shardings(mesh, rules, abstract_params(cfg), logical_axes(cfg))


def init_sharded(cfg: ModelConfig, key: jax.Array, mesh, rules: str) -> dict:
    """Fresh parameters created where they live: each device computes only its own shards."""
    return jax.jit(init, static_argnums=0, out_shardings=shardings(cfg, mesh, rules))(cfg, key)


def place(cfg: ModelConfig, params: dict, mesh, rules: str) -> dict:
    """`params` laid out on `mesh` as training lays them out under `rules`."""
    return jax.device_put(params, shardings(cfg, mesh, rules))


def logical_axes(cfg: ModelConfig) -> dict:
    """Logical axis names per parameter (same tree as the params); stacked layers lead with 'layers'
    (the decoder's `layers`, the encoder-decoder's `encoder` and `decoder`)."""
    state = _structure(cfg)[1]
    axes = jax.tree.map(lambda v: tuple(v.get_metadata()["axes"]), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    axes = nnx.to_pure_dict(axes) if not isinstance(axes, dict) else axes
    for stack in ("layers", "encoder", "decoder"):
        if stack in axes:
            axes[stack] = jax.tree.map(lambda a: ("layers",) + a, axes[stack], is_leaf=lambda x: isinstance(x, tuple))
    return axes


def param_count(cfg: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def _module(cfg: ModelConfig, params: dict) -> Transformer:
    return nnx.merge(_structure(cfg)[0], params)


def apply(cfg: ModelConfig, params: dict, tokens: jax.Array, segment_ids=None, positions=None,
          prefix_len=None, *, prefix_mask=None, head: str = "lm", decoder_tokens=None,
          decoder_segment_ids=None, decoder_positions=None) -> jax.Array:
    """Run the model on tokens [B, T] int32.

    head="lm" returns float32 logits [B, T, V]; head="value" returns float32 values [B, T].
    segment_ids [B, T]: packed sequences (no attention across segments; pass positions that
    restart per segment). positions [B, T]: explicit RoPE positions. prefix_len [B]: number
    of leading positions that attend bidirectionally. prefix_mask [B, T] bool: the per-token
    form, True on each packed segment's own prefix (wins over prefix_len).

    model.arch=encoder_decoder: `tokens` (with segment_ids, positions) are the encoder's inputs
    [B, S] and `decoder_tokens` [B, T] (with decoder_segment_ids, decoder_positions; a packed
    row numbers its examples alike on both sides) the decoder's; logits are the decoder's [B, T, V].
    """
    model = _module(cfg, params)
    if cfg.arch == "encoder_decoder":
        if decoder_tokens is None or prefix_len is not None or prefix_mask is not None or head != "lm":
            raise ValueError("model.arch=encoder_decoder takes decoder_tokens=, no prefix_len or prefix_mask "
                             "(the encoder is bidirectional), and head='lm'")
        return model.logits(model.hidden(tokens, segment_ids, positions, decoder_tokens=decoder_tokens,
                                         decoder_segment_ids=decoder_segment_ids,
                                         decoder_positions=decoder_positions))
    if decoder_tokens is not None:
        raise ValueError("decoder_tokens= is for model.arch=encoder_decoder; this model is a decoder")
    x_BTD = model.hidden(tokens, segment_ids, positions, prefix_len, prefix_mask)
    if head == "lm":
        return model.logits(x_BTD)
    if head == "value":
        return model.values(x_BTD)
    raise ValueError(f"head={head!r} is not a head; allowed: lm, value")


def hidden(cfg: ModelConfig, params: dict, tokens, segment_ids=None, positions=None, prefix_len=None,
           *, prefix_mask=None):
    """Final-norm hidden states [B, T, D] (for losses that project in chunks); the decoder's only."""
    if cfg.arch != "decoder":
        raise ValueError(f"model.hidden is the decoder's; model.arch={cfg.arch} (use model.apply)")
    return _module(cfg, params).hidden(tokens, segment_ids, positions, prefix_len, prefix_mask)


def prefill(cfg: ModelConfig, params: dict, tokens_BP, lengths_B, length: int, *,
            bidirectional: bool = False, start_id: int = 0):
    """Run left-padded prompts through the decoder into a fresh KV cache of `length` columns.

    tokens_BP [B, P] int32: row b's prompt fills its last lengths_B[b] columns (1 <= length
    <= P). `bidirectional`: the prompt is a prefix LM's prefix (as `apply(prefix_len=lengths)`).
    Returns (logits [B, V] float32 of the token after each prompt, cache with index P).

    model.arch=encoder_decoder: the prompts are the encoder's inputs; the decoder starts from
    `start_id` (the pad id, as training's rows) at column 0 of a cache of length - P + 1 columns.
    """
    B, P = tokens_BP.shape
    if cfg.arch == "encoder_decoder":
        module = _module(cfg, params)
        cache = module.start_decoding(tokens_BP, lengths_B, length - P + 1)
        x_B1D, cache = module.step(jnp.full((B, 1), start_id, jnp.int32), cache)
        return module.logits(x_B1D)[:, 0], cache
    cache = init_cache(cfg, B, length, P - jnp.asarray(lengths_B, jnp.int32))
    module = _module(cfg, params)
    x_BPD, cache = module.extend(tokens_BP, cache, first=True, bidirectional=bidirectional)
    return module.logits(x_BPD[:, -1:])[:, 0], cache


def layer_params(cfg: ModelConfig, params: dict) -> list[dict] | None:
    """The stacked layer params as one dict per layer (copies), for `decode(layers=...)`; None for
    the encoder-decoder, whose decoding scans its stack."""
    if cfg.arch != "decoder":
        return None
    return [jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(cfg.n_layers)]


_FLOAT32_AT_USE = ("scale", "value_head")  # the RMSNorm scales and the value head


def compute_params(cfg: ModelConfig, params: dict) -> dict:
    """`params` with every weight that the model casts to a narrower compute dtype at use (float32
    params, bfloat16 compute) cast once here, to the same values; the norm scales and the value
    head, used in float32, stay, and so does everything where the compute dtype is not narrower.

    For a loop that applies the same weights at every step (decoding): inside the loop the
    weights are then read in the compute dtype, whether or not XLA would have hoisted each cast
    out of the `while_loop` itself.
    """
    dtype = jnp.dtype(cfg.compute_dtype)

    def cast(path, a):
        narrower = jnp.issubdtype(a.dtype, jnp.floating) and dtype.itemsize < jnp.dtype(a.dtype).itemsize
        return a.astype(dtype) if narrower and path[-1].key not in _FLOAT32_AT_USE else a

    return jax.tree_util.tree_map_with_path(cast, params)


def decode(cfg: ModelConfig, params: dict, tokens_BT, cache: KVCache, *, layers=None):
    """Append T tokens per row at column cache.index: (logits [B, T, V] float32, cache).

    layers: `layer_params(cfg, params)`, made once outside a decode loop: the layers then run
    unrolled on them, without re-slicing every layer's weights out of the stack at each step
    (1.45x faster decoding of the 125m preset on one CPU thread; costs a second copy of the layer
    weights).
    """
    module = _module(cfg, params)
    if cfg.arch == "encoder_decoder":
        x_BTD, cache = module.step(tokens_BT, cache)
    else:
        x_BTD, cache = module.extend(tokens_BT, cache, layers=layers)
    return module.logits(x_BTD), cache


def head_kernel(cfg: ModelConfig, params: dict) -> jax.Array:
    """The output projection [D, V] in param dtype (the embedding table's transpose when tied)."""
    return params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]
