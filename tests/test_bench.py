"""`jaxlm bench`'s decode bound: the bytes a decode step must read, counted from the real arrays."""
import math

import jax
import numpy as np
import pytest

from jaxlm import bench, model, perf
from jaxlm.config import ConfigError, from_dict

TREE = {"model": dict(vocab_size=96, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=80,
                      max_seq_len=64),
        "train": dict(batch_size=2, seq_len=32)}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_bytes_are_the_weights_and_the_filled_cache(tied, dtype):
    cfg = from_dict({**TREE, "model": {**TREE["model"], "tie_embeddings": tied, "dtype": dtype}}).model
    params = model.abstract_params(cfg)
    item = np.dtype(dtype).itemsize
    # Every weight once in the compute dtype; the untied input table only gives B rows.
    weights = sum(a.size for path, a in jax.tree_util.tree_leaves_with_path(params)
                  if tied or "embed" not in jax.tree_util.keystr(path)) * item
    B, S, context = 3, 40, 17.5
    cache = jax.eval_shape(lambda: model.init_cache(cfg, B, S))
    arrays = jax.tree.leaves((cache.k_BKSH, cache.v_BKSH))
    assert len(arrays) == 2 * cfg.n_layers and {np.dtype(a.dtype).itemsize for a in arrays} == {item}
    kv = sum(a.size for a in arrays) * item * context / S
    assert perf.decode_bytes(cfg, B, context) == pytest.approx(weights + kv)


def test_sampler_report_sets_decode_against_the_bandwidth_bound():
    cfg = from_dict({**TREE, "train": {**TREE["train"], "peak_bandwidth_gbs": 7.5}})
    r = bench.sampler_report(cfg, rounds=1, prompt_len=8, new_tokens=6)
    assert (r["sampler_batch"], r["sampler_prompt"], r["sampler_new"]) == (2, 8, 6)
    assert r["bandwidth_gbs"] == 7.5
    # The decode steps see 9..13 positions: their mean context is P + N / 2 = 11.
    assert r["decode_limit_tokens_per_s"] == pytest.approx(2 * 7.5e9 / perf.decode_bytes(cfg.model, 2, 11))
    assert r["decode_of_limit"] == pytest.approx(r["decode_tokens_per_s"] / r["decode_limit_tokens_per_s"])
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0


def test_measured_bandwidth_is_a_rate_of_the_bytes_moved():
    bandwidth = perf.measure_bandwidth(8 << 20, repeats=2)
    assert math.isfinite(bandwidth) and bandwidth > 0


def test_negative_peaks_are_config_errors():
    for key in ("peak_tflops", "peak_bandwidth_gbs"):
        with pytest.raises(ConfigError, match=f"train.{key}=-1.0 must be >= 0"):
            from_dict({**TREE, "train": {**TREE["train"], key: -1.0}})


def test_an_encoder_decoder_is_one_line_not_a_traceback():
    from jaxlm import bench

    cfg = from_dict({**TREE, "model": {**TREE.get("model", {}), "arch": "encoder_decoder"}})
    with pytest.raises(ConfigError, match="model.arch=encoder_decoder is not benchmarked yet"):
        bench.run(cfg, steps=1)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU kernels")
@pytest.mark.parametrize("seq_len, kernel", [(128, "blocks"), (32, "xla"), (128, "reference"), (128, "rows")])
def test_report_names_the_attention_kernel_of_the_step(seq_len, kernel):
    attention = "reference" if kernel == "reference" else "auto"
    cfg = from_dict({"model": {**TREE["model"], "max_seq_len": 128, "attention": attention},
                     "train": {**TREE["train"], "seq_len": seq_len, "peak_tflops": 1.0},
                     "mesh": {"sequence": 2 if kernel == "rows" else 1}})  # rows: context parallel
    r = bench.report(cfg, 1.0, {"params": 1, "compile_s": 0.0, "peak_bytes": 0, "loss": 0.0})
    assert r["attention"] == kernel
