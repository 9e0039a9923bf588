"""Safetensors import/export without transformers: round trips, sharded reading, and bad checkpoints."""
import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from jaxlm import model, sharding
from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.interop import InteropError, load_hf, save_hf
from jaxlm.interop.safetensors_io import INDEX, SafetensorsDir


def one_device_mesh():
    return sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


def test_round_trip_is_bitwise(hf_dir, odd_cfg, assert_same):
    path, params, hf = hf_dir(odd_cfg)
    assert hf["architectures"] == ["LlamaForCausalLM"]
    cfg, loaded = load_hf(path, mesh=one_device_mesh())
    assert cfg == odd_cfg
    assert_same(params, loaded)


def test_sharded_files_with_an_index(hf_dir, odd_cfg, assert_same):
    path, params, _ = hf_dir(odd_cfg, max_shard_bytes=4000)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 3 and (path / INDEX).is_file()
    index = json.loads((path / INDEX).read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == 4 * model.param_count(odd_cfg)
    assert_same(params, load_hf(path, mesh=one_device_mesh())[1])


def test_streamed_into_shards_reading_only_slices(hf_dir, assert_same, monkeypatch):
    """On a (data 2, fsdp 2, tensor 2) mesh with tensor parallelism, every device's block is read
    alone: no read covers a whole sharded tensor, and the arrays equal an unsharded import."""
    cfg = ModelConfig(vocab_size=41, d_model=36, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=22, max_seq_len=32,
                      qkv_bias=True, tie_embeddings=True)
    path, params, hf = hf_dir(cfg)
    assert hf["architectures"] == ["Qwen2ForCausalLM"]
    reads = []
    original = SafetensorsDir.read
    monkeypatch.setattr(SafetensorsDir, "read", lambda self, name, ranges: reads.append((name, ranges))
                        or original(self, name, ranges))
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, loaded = load_hf(path, mesh=mesh, rules="fsdp_tp")
    q = loaded["layers"]["attn"]["q"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert loaded["layers"]["mlp"]["gate_up"].sharding.spec == P(None, "fsdp", None, "tensor")
    q_reads = [r for n, r in reads if n == "model.layers.0.self_attn.q_proj.weight"]
    assert len(q_reads) == 4  # 2 x 2 distinct blocks; the data axis repeats them and shares the read
    for rows, cols in q_reads:
        assert (rows.stop - rows.start, cols.stop - cols.start) == (18, 18)
    assert_same(params, jax.device_get(loaded))


def test_bfloat16_checkpoint(hf_dir, odd_cfg):
    path, params, hf = hf_dir(odd_cfg, dtype="bfloat16")
    assert hf["torch_dtype"] == "bfloat16"
    assert SafetensorsDir(path).dtype("model.norm.weight") == "BF16"
    for param_dtype in ("float32", "bfloat16"):
        cfg, loaded = load_hf(path, mesh=one_device_mesh(), param_dtype=param_dtype)
        assert cfg.param_dtype == param_dtype
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
            want = np.asarray(x).astype(ml_dtypes.bfloat16).astype(param_dtype)
            np.testing.assert_array_equal(np.asarray(y), want)


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _error(path, **kwargs) -> str:
    with pytest.raises(InteropError) as info:
        load_hf(path, mesh=one_device_mesh(), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_tensor(hf_dir):
    path, _, _ = hf_dir()
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert _error(path) == "tensor model.layers.1.mlp.up_proj.weight is missing from the checkpoint"


def test_shape_mismatch(hf_dir):
    path, _, hf = hf_dir()
    (path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 21}))
    assert _error(path) == "tensor model.layers.0.mlp.gate_proj.weight has shape [19, 30]; the config implies [21, 30]"


def test_unexpected_tensor(hf_dir):
    path, _, _ = hf_dir()
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(30, np.float32)}))
    assert "model.layers.0.self_attn.o_proj.bias has no place in a jaxlm model" in _error(path)


def test_quantized_tensor(hf_dir):
    path, _, _ = hf_dir()
    _rewrite(path, lambda t: t.update({"model.norm.weight": np.zeros(30, np.int8)}))
    assert "model.norm.weight has dtype I8" in _error(path)


def test_index_naming_a_missing_file(hf_dir):
    path, _, _ = hf_dir(max_shard_bytes=4000)
    (path / "model-00002-of-{:05d}.safetensors".format(len(list(path.glob("*.safetensors"))))).unlink()
    assert "which is missing" in _error(path)


def test_torch_pickles_are_not_read(hf_dir):
    path, _, _ = hf_dir()
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    assert "holds neither model.safetensors nor model.safetensors.index.json (found pytorch_model.bin" in _error(path)


def test_export_checks_the_params_against_the_config(odd_cfg, rand_params, tmp_path):
    params = rand_params(odd_cfg)
    params["layers"]["mlp"]["down"] = params["layers"]["mlp"]["down"][:, :5]
    with pytest.raises(InteropError, match=r"params\[layers/mlp/down\] should have shape \[2, 19, 30\]"):
        save_hf(odd_cfg, params, tmp_path / "out")
    with pytest.raises(InteropError, match="value head"):
        save_hf(dataclasses.replace(odd_cfg, value_head=True), rand_params(odd_cfg), tmp_path / "out")
