"""Mesh, the logical-axis table, and that params and batches really are split across 8 devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm import model, sharding
from jaxlm.config import MeshConfig, ModelConfig

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _mesh(data, fsdp, tensor, rules="fsdp", sequence=1):
    return sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor, rules=rules))


def _full(spec, ndim):
    """A PartitionSpec as a tuple of length ndim (trailing Nones are implicit)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def test_make_mesh_fills_in_minus_one():
    assert jax.device_count() == 8
    cases = {(1, -1, 1): (1, 8, 1), (2, -1, 2): (2, 2, 2), (-1, 2, 1): (4, 2, 1), (1, 4, -1): (1, 4, 2),
             (2, 4, 1): (2, 4, 1)}
    for sizes, expected in cases.items():
        mesh = _mesh(*sizes)
        assert mesh.axis_names == ("stage", "data", "fsdp", "sequence", "tensor")
        assert tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor")) == expected, sizes
        assert mesh.shape["sequence"] == mesh.shape["stage"] == 1
        assert list(mesh.devices.flat) == jax.devices()
    assert dict(sharding.make_mesh(MeshConfig()).shape) == {"stage": 1, "data": 1, "fsdp": 8, "sequence": 1,
                                                            "tensor": 1}
    mesh = _mesh(1, -1, 2, sequence=2)
    assert tuple(mesh.shape[a] for a in sharding.AXES) == (1, 1, 2, 2, 2)
    mesh = sharding.make_mesh(MeshConfig(stage=2, fsdp=-1, tensor=2))
    assert tuple(mesh.shape[a] for a in sharding.AXES) == (2, 1, 2, 1, 2)


def test_spec_maps_logical_names_and_drops_what_does_not_divide():
    mesh = _mesh(1, 4, 2)
    spec = lambda shape, names, rules="fsdp_tp": _full(sharding.spec(mesh, rules, shape, names), len(shape))
    assert spec((36, 24), ("vocab", "embed")) == ("tensor", "fsdp")
    assert spec((37, 24), ("vocab", "embed")) == (None, "fsdp")  # 37 % 2: vocab stays whole
    assert spec((36, 30), ("vocab", "embed")) == ("tensor", None)  # 30 % 4
    assert spec((3, 24, 6, 4), ("layers", "embed", "q_heads", "head_dim")) == (None, "fsdp", "tensor", None)
    staged = sharding.make_mesh(MeshConfig(stage=2, fsdp=2, tensor=2))  # the layer stack splits over "stage"
    assert _full(sharding.spec(staged, "fsdp_tp", (4, 24, 6), ("layers", "embed", "q_heads")), 3) == (
        "stage", "fsdp", "tensor")
    assert spec((36, 24), ("vocab", "embed"), "fsdp") == (None, "fsdp")  # no tensor rules in fsdp
    assert spec((36, 24), ("vocab", "embed"), "dp") == (None, None)
    # The batch goes over data and fsdp together; size-1 axes are left out; no axis is used twice.
    assert spec((8, 24), ("act_batch", "embed"), "fsdp") == ("fsdp", None)
    mesh = _mesh(2, 4, 1)
    assert _full(sharding.spec(mesh, "fsdp", (8, 24), ("act_batch", "embed")), 2) == (("data", "fsdp"), None)
    assert _full(sharding.spec(mesh, "fsdp", (12, 24), ("act_batch", "embed")), 2) == (None, "fsdp")
    assert _full(sharding.spec(_mesh(8, 1, 1), "dp", (16, 5), ("act_batch", None)), 2) == ("data", None)
    # Every preset splits the activations' sequence over "sequence" (context parallelism), when it divides.
    act = ("act_batch", "act_seq", "act_embed")
    for rules in sharding.RULES:
        mesh = _mesh(2, 1, 1, rules, sequence=4)
        assert _full(sharding.spec(mesh, rules, (4, 32, 24), act), 3) == ("data", "sequence", None)
        assert _full(sharding.spec(mesh, rules, (4, 30, 24), act), 3) == ("data", None, None)
    assert _full(sharding.spec(_mesh(2, 4, 1), "fsdp", (8, 32, 24), act), 3) == (("data", "fsdp"), None, None)


def test_zero_presets_split_the_optimizer_state_over_the_batch_axes():
    assert sharding.RULES["zero3"] == sharding.RULES["fsdp"]
    assert sharding.RULES["zero1"] == sharding.RULES["zero2"] == sharding.RULES["dp"]
    mesh = _mesh(2, 4, 1)
    ospec = lambda rules, shape, pspec=P(): _full(sharding.optimizer_spec(mesh, rules, shape, pspec),
                                                            len(shape))
    # The first whole dimension that data x fsdp = 8 divides: [L=3, D=24, N=6, H=4] along D.
    assert ospec("zero1", (3, 24, 6, 4)) == (None, ("data", "fsdp"), None, None)
    assert ospec("zero2", (40, 24)) == (("data", "fsdp"), None)
    assert ospec("zero1", (37, 5)) == (None, None)  # nothing divides: whole, as the parameter
    for rules in ("dp", "fsdp", "zero3"):  # the other presets: the parameter's own layout
        assert ospec(rules, (40, 24), P(None, "fsdp")) == (None, "fsdp")
    # A mesh axis the parameter already uses is not used again; size-1 axes are left out.
    assert ospec("zero1", (40, 24), P(None, "fsdp")) == ("data", "fsdp")
    assert _full(sharding.optimizer_spec(_mesh(1, 4, 2), "zero1", (3, 24), P()), 2) == (None, "fsdp")
    # The same from the mesh's sizes alone (jaxlm plan has no devices), and the shard's shape.
    sizes = {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
    assert sharding.optimizer_spec(sizes, "zero1", (3, 24), P()) == sharding.optimizer_spec(
        mesh, "zero1", (3, 24), P())
    assert sharding.shard_shape(sizes, P(None, ("data", "fsdp")), (3, 24)) == (3, 3)
    assert sharding.shard_shape(mesh, P("fsdp"), (40, 24)) == (10, 24)


def test_fsdp_tp_params_are_really_sharded():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
    mesh = _mesh(1, 4, 2, "fsdp_tp")
    shardings = sharding.param_shardings(mesh, "fsdp_tp", model.abstract_params(cfg), model.logical_axes(cfg))
    init = jax.jit(model.init, static_argnums=0, out_shardings=shardings, compiler_options=FAST_COMPILE)
    params = init(cfg, jax.random.key(0))
    F, T = "fsdp", "tensor"
    expected = {
        "embed": {"embedding": (T, F)},
        "final_norm": {"scale": (None,)},
        "layers": {
            "attn_norm": {"scale": (None, None)},
            "attn": {"q": (None, F, T, None), "kv": (None, F, None, T, None), "o": (None, T, None, F)},
            "mlp_norm": {"scale": (None, None)},
            "mlp": {"gate_up": (None, F, None, T), "down": (None, T, F)},
        },
        "lm_head": (F, T),
    }
    actual = jax.tree.map(lambda x: _full(x.sharding.spec, x.ndim), params)
    assert actual == expected
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        split = [1 if s is None else mesh.shape[s] for s in _full(x.sharding.spec, x.ndim)]
        shard = x.addressable_shards[0].data
        assert shard.shape == tuple(d // s for d, s in zip(x.shape, split)), path
        assert len(x.addressable_shards) == 8
    assert params["layers"]["mlp"]["down"].addressable_shards[0].data.size * 8 == 2 * 48 * 32
    # Sharding changes where values live, not what they are.
    plain = jax.jit(model.init, static_argnums=0, compiler_options=FAST_COMPILE)(cfg, jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, plain)


@pytest.mark.parametrize("leading", [0, 1])
def test_put_batch_splits_rows_disjointly(leading):
    mesh = _mesh(2, 2, 2)
    assert sharding.batch_shards(mesh) == 4
    tokens = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    if leading:
        tokens = np.stack([tokens, tokens + 1000])  # [accum, B, T]
    batch = sharding.put_batch(mesh, {"tokens": tokens}, leading=leading)
    x = batch["tokens"]
    assert x.shape == tokens.shape
    assert _full(x.sharding.spec, x.ndim) == (None,) * leading + (("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(x), tokens)
    row_sets = {}
    for shard in x.addressable_shards:
        np.testing.assert_array_equal(shard.data, tokens[shard.index])
        rows = range(*shard.index[leading].indices(8))
        assert len(rows) == 2  # 8 rows over data*fsdp = 4 ways
        row_sets.setdefault(tuple(rows), []).append(shard.device)
    assert len(row_sets) == 4
    assert sorted(r for rows in row_sets for r in rows) == list(range(8))  # disjoint, covering
    assert all(len(devices) == 2 for devices in row_sets.values())  # replicated over tensor only
