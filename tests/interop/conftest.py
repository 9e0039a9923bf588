"""Tiny jaxlm models written as Hugging Face checkpoints (no transformers needed)."""
import json

import jax
import numpy as np
import pytest

from jaxlm import testing
from jaxlm.config import ModelConfig
from jaxlm.interop import save_hf

# Odd sizes, so that no transposed or swapped axis has the shape of the right one.
ODD = ModelConfig(vocab_size=401, d_model=30, n_layers=2, n_heads=5, n_kv_heads=1, d_ff=19, max_seq_len=64)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Every entry ~N(0, 0.3^2), norm scales and biases too, so any misplacement shows."""
    return testing.random_params(cfg, seed, scale=0.3, norm_scale=0.3, norm_base=0.0)


@pytest.fixture
def hf_dir(tmp_path):
    """make(cfg, family=None, **save_hf kwargs) -> (directory, params, config.json dict)."""
    count = [0]

    def make(cfg: ModelConfig = ODD, family=None, seed: int = 0, **kwargs):
        count[0] += 1
        path = tmp_path / f"hf{count[0]}"
        params = random_params(cfg, seed)
        save_hf(cfg, params, path, family=family, **kwargs)
        return path, params, json.loads((path / "config.json").read_text())

    return make


def _assert_same(a: dict, b: dict):
    """Same tree, bitwise equal leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def assert_same():
    return _assert_same


@pytest.fixture
def odd_cfg():
    return ODD


@pytest.fixture
def rand_params():
    return random_params
