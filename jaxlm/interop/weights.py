"""Where each jaxlm parameter lives in a Hugging Face Llama/Qwen2/Mistral checkpoint.

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
    layered: bool = False  # a leading layers axis, one HF tensor per layer

    @property
    def hf_shape(self) -> tuple[int, ...]:
        groups = (self.view[:self.rows], self.view[self.rows:])
        return tuple(math.prod(g) for g in groups if g)

    def hf_names(self, n_layers: int) -> list[str]:
        layers = range(n_layers) if self.layered else [None]
        return [name.format(i=i) for i in layers for name in self.names]


def specs(cfg: ModelConfig) -> dict[tuple[str, ...], Spec]:
    """The Spec of every jaxlm parameter of `cfg`, keyed by its path in the params tree."""
    V, D, F = cfg.vocab_size, cfg.d_model, cfg.d_ff
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    layer = "model.layers.{i}."
    attn, mlp = layer + "self_attn.", layer + "mlp."
    out = {
        ("embed", "embedding"): Spec(("model.embed_tokens.weight",), (V, D), 1, (0, 1)),
        ("final_norm", "scale"): Spec(("model.norm.weight",), (D,), 1, (0,)),
        ("layers", "attn_norm", "scale"): Spec((layer + "input_layernorm.weight",), (D,), 1, (0,), layered=True),
        ("layers", "mlp_norm", "scale"): Spec((layer + "post_attention_layernorm.weight",), (D,), 1, (0,),
                                             layered=True),
        ("layers", "attn", "q"): Spec((attn + "q_proj.weight",), (N, H, D), 2, (2, 0, 1), layered=True),
        ("layers", "attn", "kv"): Spec((attn + "k_proj.weight", attn + "v_proj.weight"), (K, H, D), 2, (2, 0, 1),
                                       stack=1, layered=True),
        ("layers", "attn", "o"): Spec((attn + "o_proj.weight",), (D, N, H), 1, (1, 2, 0), layered=True),
        ("layers", "mlp", "gate_up"): Spec((mlp + "gate_proj.weight", mlp + "up_proj.weight"), (F, D), 1, (1, 0),
                                           stack=1, layered=True),
        ("layers", "mlp", "down"): Spec((mlp + "down_proj.weight",), (D, F), 1, (1, 0), layered=True),
    }
    if not cfg.tie_embeddings:
        out[("lm_head",)] = Spec(("lm_head.weight",), (V, D), 1, (1, 0))
    if cfg.qkv_bias:
        out[("layers", "attn", "q_bias")] = Spec((attn + "q_proj.bias",), (N, H), 2, (0, 1), layered=True)
        out[("layers", "attn", "kv_bias")] = Spec((attn + "k_proj.bias", attn + "v_proj.bias"), (K, H), 2, (0, 1),
                                                  stack=0, layered=True)
    return out


def check(reader, cfg: ModelConfig, table: dict[tuple[str, ...], Spec]) -> None:
    """Every tensor the model needs is there with its shape and a float dtype; nothing is left over."""
    wanted = {}
    for spec in table.values():
        for name in spec.hf_names(cfg.n_layers):
            wanted[name] = spec.hf_shape
    present = reader.names()
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
        per_layer.append(x.astype(dtype))
    return np.stack(per_layer) if spec.layered else per_layer[0]


def hf_tensor(spec: Spec, layer_param: np.ndarray, component: int = 0) -> np.ndarray:
    """The HF tensor of one layer's (or an unlayered) jaxlm parameter: the inverse of `_read_view`."""
    x = layer_param if spec.stack is None else np.take(layer_param, component, axis=spec.stack)
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
    for i in range(cfg.n_layers):
        for path in layered:
            out += entries(path, i)
    for path in table:
        if not table[path].layered and path != ("embed", "embedding"):
            out += entries(path, None)
    return out
