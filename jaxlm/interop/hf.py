"""`load_hf` and `save_hf`: Hugging Face Llama, Qwen2, Mistral and T5 checkpoints <-> jaxlm params.

Import streams: each parameter is built with `jax.make_array_from_callback` on its target
sharding (`jaxlm.model.shardings`), and each device's block is read from the
memory-mapped safetensors files by rows and columns. A host holds its own shards and, for a
moment, one parameter's blocks: never a second full copy of the model. Export writes one
safetensors file at a time (5 GiB by default), gathering one layer's tensor at a time.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from jaxlm import model, sharding
from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.interop import weights
from jaxlm.interop.hf_config import InteropError, hf_config_from_model, model_config_from_hf, t5_output_scaled
from jaxlm.interop.safetensors_io import SafetensorsDir, write_dir

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
MAX_SHARD_BYTES = 5 * 2**30


def read_config(path: str | Path) -> dict:
    """The config.json of a Hugging Face checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise InteropError(f"{str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise InteropError(f"{str(path)!r} has no config.json")
    try:
        return json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise InteropError(f"{path / 'config.json'} is not valid JSON: {e}") from None


def load_hf(path: str | Path, *, mesh=None, rules: str = "fsdp", param_dtype: str = "float32",
            max_seq_len: Optional[int] = None) -> tuple[ModelConfig, dict]:
    """(model_config, params) of a Hugging Face checkpoint directory (config.json + safetensors).

    `mesh` and `rules` place the params (default: every device, FSDP, as training does);
    `param_dtype` float32 | bfloat16; `max_seq_len` defaults to max_position_embeddings (see
    `hf_config.model_config_from_hf` for sliding-window models). Raises `InteropError`.
    """
    if rules not in sharding.RULES:
        raise InteropError(f"rules={rules!r} is not allowed; choose one of: {', '.join(sharding.RULES)}")
    hf = read_config(path)
    cfg = model_config_from_hf(hf, param_dtype=param_dtype, max_seq_len=max_seq_len)
    reader = SafetensorsDir(path)
    scaled_output = None
    if cfg.arch == "encoder_decoder":  # transformers 5 writes tie_word_embeddings=true for every T5
        cfg = dataclasses.replace(cfg, tie_embeddings="lm_head.weight" not in reader.names())
        scaled_output = t5_output_scaled(hf)
    table = weights.specs(cfg, scaled_output=scaled_output)
    weights.check(reader, cfg, table)
    mesh = sharding.make_mesh(MeshConfig()) if mesh is None else mesh
    abstract = model.abstract_params(cfg)
    shardings = model.shardings(cfg, mesh, rules)

    def build(key_path, a, s):
        spec = table[tuple(k.key for k in key_path)]
        blocks = {}  # devices holding the same block share one read

        def block(index):
            key = tuple((sl.start, sl.stop) for sl in index)
            if key not in blocks:
                blocks[key] = weights.read_block(reader, spec, a.shape, index, a.dtype)
            return blocks[key]

        return jax.make_array_from_callback(a.shape, s, block, dtype=a.dtype)

    return cfg, jax.tree_util.tree_map_with_path(build, abstract, shardings)


def save_hf(model_config: ModelConfig, params: dict, path: str | Path, *, family: Optional[str] = None,
            base_config: Optional[dict] = None, dtype: Optional[str] = None,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `params` as a Hugging Face checkpoint: config.json and safetensors; returns the file names.

    `family` llama | qwen2 | mistral | t5 (default: that of `base_config`, the config.json the
    model came from, whose other keys are kept; else t5 for an encoder-decoder, qwen2 for a model
    with q/k/v biases, mistral for one with a sliding window, llama otherwise). `dtype` float32 |
    bfloat16 | float16 (default: the params'). Every process must call it (multi-host params are
    gathered); process 0 writes.
    """
    cfg = model_config
    hf_config_from_model(cfg, family, base_config)  # a model HF cannot hold fails before anything else
    table = weights.specs(cfg)
    flat = {tuple(k.key for k in kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    abstract = {tuple(k.key for k in kp): a
                for kp, a in jax.tree_util.tree_flatten_with_path(model.abstract_params(cfg))[0]}
    for key, a in abstract.items():
        if key not in flat or tuple(flat[key].shape) != a.shape:
            found = list(flat[key].shape) if key in flat else "nothing"
            raise InteropError(f"params[{'/'.join(key)}] should have shape {list(a.shape)} for this model "
                               f"config, found {found}")
    dtype = dtype or np.dtype(flat[("embed", "embedding")].dtype).name
    if dtype not in EXPORT_DTYPES:
        raise InteropError(f"dtype={dtype!r} is not allowed; choose one of: {', '.join(EXPORT_DTYPES)}")
    hf = hf_config_from_model(cfg, family, base_config, dtype)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))

    def get(key, layer):
        x = flat[key] if layer is None else flat[key][layer]
        return sharding.to_host(x).astype(np_dtype)

    plan = weights.export_plan(cfg, table, get, np_dtype.itemsize)
    if jax.process_index() != 0:
        for _, _, make in plan:  # take part in the gathers
            make()
        return []
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = write_dir(path, plan, max_shard_bytes)
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return files
