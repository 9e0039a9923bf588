"""FLOPs per token against an independent count: the matmuls in the model's own jaxpr."""
import json
import math

import jax
import jax.numpy as jnp
import pytest

from jaxlm import model, perf
from jaxlm.config import ModelConfig

# odd sizes, so that a transposed axis cannot hide; the reference attention computes the whole
# [T, S] square, and a Python loop over the layers keeps every matmul in sight (no scan)
CFG = ModelConfig(vocab_size=97, d_model=36, n_heads=6, n_kv_heads=3, d_ff=52, n_layers=3, max_seq_len=16,
                  attention="reference", scan_layers=False)
T = 13


def _dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general in `jaxpr` and the jaxprs inside it."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), (batch, _) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            total += 2 * math.prod(lhs) * math.prod(rhs) // math.prod(lhs[i] for i in (*contract, *batch))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    total += _dot_flops(sub) * eqn.params.get("length", 1)
    return total


def _norm_scales(params) -> int:
    """Norm scales: in N by perf's convention (every parameter but the input table), in no matmul."""
    paths = jax.tree_util.tree_leaves_with_path(params)
    return sum(math.prod(x.shape) for path, x in paths if path[-1].key == "scale")


@pytest.mark.parametrize("tie", [False, True])
def test_decoder_flops_per_token_count_the_models_matmuls(tie):
    cfg = ModelConfig(**{**vars(CFG), "tie_embeddings": tie})
    params = model.abstract_params(cfg)
    tokens = jnp.zeros((1, T), jnp.int32)
    forward = _dot_flops(jax.make_jaxpr(lambda p: model.apply(cfg, p, tokens))(params).jaxpr)
    # training = 3 x the forward, less the causal half of the [T, T] score and value matmuls
    want = 3 * forward - 6 * cfg.n_layers * T * T * cfg.d_model
    assert T * perf.flops_per_token(cfg, T) - 6 * T * _norm_scales(params) == want


@pytest.mark.parametrize("n_encoder_layers", [0, 2])
def test_encoder_decoder_flops_per_token_count_the_models_matmuls_on_each_side(n_encoder_layers):
    cfg = ModelConfig(**{**vars(CFG), "arch": "encoder_decoder", "n_encoder_layers": n_encoder_layers})
    params = model.abstract_params(cfg)
    tokens = jnp.zeros((1, T), jnp.int32)  # T columns a side, as a packed row
    jaxpr = lambda f: jax.make_jaxpr(f)(params).jaxpr
    encoder = _dot_flops(jaxpr(lambda p: model._module(cfg, p).encode(tokens)))
    decoder = _dot_flops(jaxpr(lambda p: model.apply(cfg, p, tokens, decoder_tokens=tokens))) - encoder
    encoder_side = {k: v for k, v in params.items() if k.startswith("encoder")}  # its blocks and final norm
    decoder_side = {k: v for k, v in params.items() if not k.startswith("encoder")}
    per_encoder, per_decoder = perf.encoder_decoder_flops(cfg, T)
    # the encoder's tokens: 3 x its forward (bidirectional: the whole square is the model's work)
    assert T * per_encoder - 6 * T * _norm_scales(encoder_side) == 3 * encoder
    # the decoder's, with cross-attention over all T encoder columns: 3 x the rest of the forward,
    # less the causal half of self-attention's [T, T] matmuls
    want = 3 * decoder - 6 * cfg.n_layers * T * T * cfg.d_model
    assert T * per_decoder - 6 * T * _norm_scales(decoder_side) == want
    assert perf.flops_per_token(cfg, T) == per_encoder + per_decoder  # a row's column: one token a side


def test_the_peak_is_measured_once_per_machine_and_bench_keeps_the_highest(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
    readings = iter([2.0e9, 1.0e9, 3.0e9])
    monkeypatch.setattr(perf, "measure_peak_flops", lambda: next(readings))
    assert perf.peak_flops() == 2.0e9  # nothing kept yet: measured
    assert perf.peak_flops() == 2.0e9  # kept: not measured again
    assert perf.peak_flops(measure=True) == 1.0e9  # bench's own reading, a slow one...
    assert perf.peak_flops() == 2.0e9  # ...does not replace the higher one
    assert perf.peak_flops(measure=True) == 3.0e9
    assert perf.peak_flops() == 3.0e9
    (tmp_path / "peak_flops.json").write_text("not json")  # a damaged file: measured again, and written whole
    monkeypatch.setattr(perf, "measure_peak_flops", lambda: 4.0e9)
    assert perf.peak_flops() == 4.0e9 and list(json.loads((tmp_path / "peak_flops.json").read_text()).values()) == [4e9]
