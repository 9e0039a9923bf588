"""Where each jaxlm parameter lives in a Hugging Face Llama/Qwen2/Mistral or T5 checkpoint.

Every jaxlm leaf is a reshape and transpose of one HF tensor per layer (two, stacked, for
the fused kv and gate_up kernels). A `Spec` records it: the HF tensor viewed as `view`
(its rows split into view[:rows], its columns into view[rows:]) has its axes permuted by
`perm` into the jaxlm layout. So any block of a jaxlm array maps to a block of rows and
columns of the HF tensor, which is all the importer reads. RoPE is rotate-half in both, so
q and k need no permutation.

    jaxlm                          Hugging Face (torch Linear weights are [out, in])
    embed.embedding  [V, D]        model.embed_tokens.weight [V, D]
    lm_head          [D, V]        lm_head.weight [V, D] (absent when tied)
    attn.q           [D, N, H]     self_attn.q_proj.weight [N*H, D]
    attn.kv          [D, 2, K, H]  self_attn.{k,v}_proj.weight [K*H, D]
    attn.o           [N, H, D]     self_attn.o_proj.weight [D, N*H]
    attn.q_bias      [N, H]        self_attn.q_proj.bias (Qwen2)
    attn.kv_bias     [2, K, H]     self_attn.{k,v}_proj.bias (Qwen2)
    mlp.gate_up      [D, 2, F]     mlp.{gate,up}_proj.weight [F, D]
    mlp.down         [F, D]        mlp.down_proj.weight [D, F]
    attn_norm/mlp_norm.scale [D]   input_layernorm / post_attention_layernorm.weight
    final_norm.scale [D]           model.norm.weight

T5 (`T5ForConditionalGeneration`, v1.1 and UL2: gated feed-forward, no biases) has the same
tensors under other names (`t5_specs`), two changes folded in as a constant factor (`Spec.scale`):
T5 does not divide the attention logits by sqrt(head_dim), so jaxlm's queries are T5's times
sqrt(head_dim); and where T5 scales the decoder's output by d_model^-0.5 before the head (a tied
one), jaxlm's final norm scale holds the factor.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.interop.hf_config import InteropError
from jaxlm.interop.safetensors_io import FLOAT_DTYPES

# HF tensors that are recomputed, not learned: present in some older checkpoints.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Spec:
    names: tuple[str, ...]  # HF tensor names ({i}: the layer); several are stacked on `stack`
    view: tuple[int, ...]
    rows: int  # how many leading axes of `view` split the HF rows (the rest split the columns)
    perm: tuple[int, ...]  # jaxlm axis j (per layer, without the stack axis) is view axis perm[j]
    stack: Optional[int] = None  # jaxlm axis (per layer) holding one HF tensor per index
    layers: int = 0  # a leading axis of this many layers, one HF tensor per layer (0: none)
    scale: float = 1.0  # jaxlm's values are the HF tensor's times this

    @property
    def layered(self) -> bool:
        return self.layers > 0

    @property
    def hf_shape(self) -> tuple[int, ...]:
        groups = (self.view[:self.rows], self.view[self.rows:])
        return tuple(math.prod(g) for g in groups if g)

    def hf_names(self) -> list[str]:
        layers = range(self.layers) if self.layered else [None]
        return [name.format(i=i) for i in layers for name in self.names]


def specs(cfg: ModelConfig, *, scaled_output: Optional[bool] = None) -> dict[tuple[str, ...], Spec]:
    """The Spec of every jaxlm parameter of `cfg`, keyed by its path in the params tree (T5's for
    the encoder-decoder: `t5_specs`, whose `scaled_output` this passes on)."""
    if cfg.arch == "encoder_decoder":
        return t5_specs(cfg, scaled_output=cfg.tie_embeddings if scaled_output is None else scaled_output)
    V, D, F = cfg.vocab_size, cfg.d_model, cfg.d_ff
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    L = cfg.n_layers
    layer = "model.layers.{i}."
    attn, mlp = layer + "self_attn.", layer + "mlp."
    out = {
        ("embed", "embedding"): Spec(("model.embed_tokens.weight",), (V, D), 1, (0, 1)),
        ("final_norm", "scale"): Spec(("model.norm.weight",), (D,), 1, (0,)),
        ("layers", "attn_norm", "scale"): Spec((layer + "input_layernorm.weight",), (D,), 1, (0,), layers=L),
        ("layers", "mlp_norm", "scale"): Spec((layer + "post_attention_layernorm.weight",), (D,), 1, (0,),
                                             layers=L),
        ("layers", "attn", "q"): Spec((attn + "q_proj.weight",), (N, H, D), 2, (2, 0, 1), layers=L),
        ("layers", "attn", "kv"): Spec((attn + "k_proj.weight", attn + "v_proj.weight"), (K, H, D), 2, (2, 0, 1),
                                       stack=1, layers=L),
        ("layers", "attn", "o"): Spec((attn + "o_proj.weight",), (D, N, H), 1, (1, 2, 0), layers=L),
        ("layers", "mlp", "gate_up"): Spec((mlp + "gate_proj.weight", mlp + "up_proj.weight"), (F, D), 1, (1, 0),
                                           stack=1, layers=L),
        ("layers", "mlp", "down"): Spec((mlp + "down_proj.weight",), (D, F), 1, (1, 0), layers=L),
    }
    if not cfg.tie_embeddings:
        out[("lm_head",)] = Spec(("lm_head.weight",), (V, D), 1, (1, 0))
    if cfg.qkv_bias:
        out[("layers", "attn", "q_bias")] = Spec((attn + "q_proj.bias",), (N, H), 2, (0, 1), layers=L)
        out[("layers", "attn", "kv_bias")] = Spec((attn + "k_proj.bias", attn + "v_proj.bias"), (K, H), 2, (0, 1),
                                                  stack=0, layers=L)
    return out


def t5_specs(cfg: ModelConfig, *, scaled_output: bool) -> dict[tuple[str, ...], Spec]:
    """The Spec of every parameter of a jaxlm encoder-decoder in a Hugging Face T5 checkpoint.

    `scaled_output`: the checkpoint scales the decoder's output by d_model^-0.5 before the head
    (transformers' `scale_decoder_outputs`; T5 with a tied head).
    """
    V, D, F, N, H = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.head_dim
    E, L = cfg.n_encoder_layers or cfg.n_layers, cfg.n_layers
    out = {
        ("embed", "embedding"): Spec(("shared.weight",), (V, D), 1, (0, 1)),
        ("encoder_norm", "scale"): Spec(("encoder.final_layer_norm.weight",), (D,), 1, (0,)),
        ("final_norm", "scale"): Spec(("decoder.final_layer_norm.weight",), (D,), 1, (0,),
                                      scale=D ** -0.5 if scaled_output else 1.0),
    }
    if not cfg.tie_embeddings:
        out[("lm_head",)] = Spec(("lm_head.weight",), (V, D), 1, (1, 0))
    if cfg.position == "t5_relative":
        for stack in ("encoder", "decoder"):
            name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            out[(f"{stack}_relative",)] = Spec((name,), (cfg.relative_buckets, N), 1, (0, 1))

    def attention(path, prefix, n):
        return {
            (*path, "q"): Spec((prefix + "q.weight",), (N, H, D), 2, (2, 0, 1), layers=n, scale=H ** 0.5),
            (*path, "kv"): Spec((prefix + "k.weight", prefix + "v.weight"), (N, H, D), 2, (2, 0, 1), stack=1,
                                layers=n),
            (*path, "o"): Spec((prefix + "o.weight",), (D, N, H), 1, (1, 2, 0), layers=n),
        }

    def feed_forward(stack, prefix, n):
        return {
            (stack, "mlp", "gate_up"): Spec((prefix + "wi_0.weight", prefix + "wi_1.weight"), (F, D), 1, (1, 0),
                                            stack=1, layers=n),
            (stack, "mlp", "down"): Spec((prefix + "wo.weight",), (D, F), 1, (1, 0), layers=n),
        }

    norm = lambda name, n: Spec((name,), (D,), 1, (0,), layers=n)
    block = "encoder.block.{i}.layer."
    out[("encoder", "attn_norm", "scale")] = norm(block + "0.layer_norm.weight", E)
    out.update(attention(("encoder", "attn"), block + "0.SelfAttention.", E))
    out[("encoder", "mlp_norm", "scale")] = norm(block + "1.layer_norm.weight", E)
    out.update(feed_forward("encoder", block + "1.DenseReluDense.", E))
    block = "decoder.block.{i}.layer."
    out[("decoder", "attn_norm", "scale")] = norm(block + "0.layer_norm.weight", L)
    out.update(attention(("decoder", "attn"), block + "0.SelfAttention.", L))
    out[("decoder", "cross_norm", "scale")] = norm(block + "1.layer_norm.weight", L)
    out.update(attention(("decoder", "cross"), block + "1.EncDecAttention.", L))
    out[("decoder", "mlp_norm", "scale")] = norm(block + "2.layer_norm.weight", L)
    out.update(feed_forward("decoder", block + "2.DenseReluDense.", L))
    return out


# HF tensors that repeat another (T5's per-stack views of its shared embedding), left unread
DUPLICATES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def check(reader, cfg: ModelConfig, table: dict[tuple[str, ...], Spec]) -> None:
    """Every tensor the model needs is there with its shape and a float dtype; nothing is left over."""
    wanted = {}
    for spec in table.values():
        for name in spec.hf_names():
            wanted[name] = spec.hf_shape
    present = reader.names() - set(DUPLICATES if cfg.arch == "encoder_decoder" else ())
    for name, shape in wanted.items():
        if name not in present:
            raise InteropError(f"tensor {name} is missing from the checkpoint")
        if reader.shape(name) != shape:
            raise InteropError(f"tensor {name} has shape {list(reader.shape(name))}; the config implies "
                               f"{list(shape)}")
        if reader.dtype(name) not in FLOAT_DTYPES:
            raise InteropError(f"tensor {name} has dtype {reader.dtype(name)}; supported: "
                               f"{', '.join(FLOAT_DTYPES)} (quantized checkpoints are not)")
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()  # unused when tied, as in transformers
    extra = sorted(n for n in present - set(wanted) - tied_head if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise InteropError(f"tensor {extra[0]} has no place in a jaxlm model"
                           + (f" ({len(extra) - 1} more such)" if len(extra) > 1 else ""))


def _ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[range]:
    return [range(*s.indices(n)) for s, n in zip(index, shape)]


def _read_view(reader, name: str, spec: Spec, block: list[range]) -> np.ndarray:
    """jaxlm block (per layer, unstacked axes) of one HF tensor: read its rows x columns, then reshape."""
    view_block = [None] * len(spec.view)
    for j, axis in enumerate(spec.perm):
        view_block[axis] = block[j]
    groups = [(0, spec.rows), (spec.rows, len(spec.view))]
    hf_ranges, shape = [], []
    for lo, hi in groups:
        if lo == hi:
            continue
        inner = math.prod(spec.view[lo + 1:hi])  # whole inner axes: the outer range is contiguous
        outer = view_block[lo]
        hf_ranges.append(slice(outer.start * inner, outer.stop * inner))
        shape += [len(outer), *spec.view[lo + 1:hi]]
    x = reader.read(name, tuple(hf_ranges)).reshape(shape)
    inner_index = tuple(slice(None) if k in (0, spec.rows) else slice(r.start, r.stop)
                        for k, r in enumerate(view_block))
    return x[inner_index].transpose(spec.perm)


def read_block(reader, spec: Spec, shape: tuple[int, ...], index: tuple[slice, ...], dtype) -> np.ndarray:
    """The block `jaxlm_param[index]` of a parameter of `shape`, read from the HF tensors."""
    block = _ranges(index, shape)
    layers = block[0] if spec.layered else [None]
    rest = block[1:] if spec.layered else block
    per_layer = []
    for i in layers:
        if spec.stack is None:
            x = _read_view(reader, spec.names[0].format(i=i), spec, rest)
        else:
            unstacked = rest[:spec.stack] + rest[spec.stack + 1:]
            x = np.stack([_read_view(reader, spec.names[c].format(i=i), spec, unstacked)
                          for c in rest[spec.stack]], axis=spec.stack)
        per_layer.append((x * np.float32(spec.scale) if spec.scale != 1.0 else x).astype(dtype))
    return np.stack(per_layer) if spec.layered else per_layer[0]


def hf_tensor(spec: Spec, layer_param: np.ndarray, component: int = 0) -> np.ndarray:
    """The HF tensor of one layer's (or an unlayered) jaxlm parameter: the inverse of `_read_view`."""
    x = layer_param if spec.stack is None else np.take(layer_param, component, axis=spec.stack)
    if spec.scale != 1.0:
        x = (x.astype(np.float32) / np.float32(spec.scale)).astype(x.dtype)
    return np.ascontiguousarray(x.transpose(np.argsort(spec.perm)).reshape(spec.hf_shape))


def export_plan(cfg: ModelConfig, table: dict[tuple[str, ...], Spec], get: Callable, itemsize: int) -> list:
    """(name, nbytes, make) for every HF tensor in checkpoint order: embedding, layer by layer, head.

    `get(path, layer)` returns the host array of parameter `path` (its layer `layer`, or the
    whole array for layer None); `make()` builds the HF tensor from it.
    """
    def entries(path, i):
        spec = table[path]
        return [(name.format(i=i), math.prod(spec.hf_shape) * itemsize,
                 lambda c=c: hf_tensor(spec, get(path, i), c)) for c, name in enumerate(spec.names)]

    layered = [p for p in table if table[p].layered]
    out = entries(("embed", "embedding"), None)
    for i in range(max((table[p].layers for p in layered), default=0)):
        for path in layered:
            if i < table[path].layers:
                out += entries(path, i)
    for path in table:
        if not table[path].layered and path != ("embed", "embedding"):
            out += entries(path, None)
    return out
