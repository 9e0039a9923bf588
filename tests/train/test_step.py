"""The train step: sharded == unsharded, accumulated == one big batch, it learns, it skips NaNs."""
import jax
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.config import from_dict
from jaxlm.plan import plan
from jaxlm.testing import merge
from jaxlm.testing import random_batch as _random_batch
from jaxlm.train.pretrain import lm_objective, policy_role
from jaxlm.train.state import compile_stage

MODEL = dict(vocab_size=37, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=40, max_seq_len=16)


def config(**sections):
    return from_dict(merge({"model": MODEL, "train": dict(steps=50, batch_size=8, seq_len=16),
                            "optim": dict(lr=1e-2, warmup_steps=0, decay="constant")}, **sections))


def random_batch(rng, A, b, T=16, V=37):
    return _random_batch(rng, A, b, T, V)


def compiled(cfg, devices=None):
    return compile_stage(cfg, policy_role(cfg), lm_objective(cfg.model), devices=devices)


def run_steps(cfg, batches, devices=None, steps=2):
    c = compiled(cfg, devices)
    state = c.init_state(jax.random.key(0))
    losses = []
    for i in range(steps):
        batch = sharding.put_batch(c.mesh, batches[i % len(batches)], leading=1)
        state, out = c.train_step(state, {}, batch)
        loss_sum, tokens = out["metrics"]["loss"]
        losses.append(float(loss_sum / tokens))
    return state, losses, jax.device_get(out)


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=atol)


def assert_trees_close_at_scale(a, b, tol):
    """Each leaf to `tol` of its own largest entry: second moments (~1e-6) pass any fixed atol."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * np.abs(x).max(initial=0))


@pytest.mark.parametrize("rules, optimizer", [("fsdp_tp", "adamw"), ("fsdp", "adamw"), ("dp", "adamw"),
                                               ("fsdp", "adafactor"), ("zero1", "adamw"), ("zero2", "adamw")])
def test_sharded_step_equals_single_device(rules, optimizer):
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, 1, 8) for _ in range(2)]
    optim = dict(name=optimizer)
    # Adafactor factors a second moment only where two dims are >= 128 (optax's default): at width 132
    # the MLP's moments are row and column means, reduced over the fsdp-sharded D.
    wide = dict(d_model=132, d_ff=132) if optimizer == "adafactor" else {}
    one, losses_one, m_one = run_steps(config(mesh=dict(data=1, fsdp=1, tensor=1), optim=optim, model=wide),
                                       batches, devices=jax.devices()[:1])
    # The ZeRO presets on both batch axes: their optimizer state is split 8 ways.
    mesh = dict(data=2, fsdp=4, tensor=1) if rules in sharding.ZERO else dict(data=1, fsdp=4, tensor=2)
    cfg8 = config(mesh=dict(mesh, rules=rules), optim=optim, model=wide)
    eight, losses_eight, m_eight = run_steps(cfg8, batches)
    # dp, zero1 and zero2 keep every param whole on every device; fsdp and fsdp_tp split them.
    replicated = [all(axis is None for axis in x.sharding.spec) for x in jax.tree.leaves(eight["params"])]
    if rules in ("dp", "zero1", "zero2"):
        assert all(replicated)
    else:
        assert not all(replicated) and "fsdp" in eight["params"]["policy"]["layers"]["attn"]["q"].sharding.spec
    if rules in sharding.ZERO:  # Adam's moments of q [L, D, N, H] split along D = 24 over data x fsdp
        mu = eight["opt_state"]["policy"][1][0].mu["layers"]["attn"]["q"]
        assert tuple(mu.sharding.spec) == (None, ("data", "fsdp"), None, None)
        assert mu.addressable_shards[0].data.shape == (2, 3, 6, 4)
    np.testing.assert_allclose(losses_one, losses_eight, rtol=1e-5)
    np.testing.assert_allclose(m_one["grad_norm"], m_eight["grad_norm"], rtol=1e-5)
    assert_trees_close(one["params"], eight["params"], atol=1e-5)
    assert_trees_close_at_scale(one["opt_state"], eight["opt_state"], 1e-4)
    if optimizer == "adafactor":
        v_row = eight["opt_state"]["policy"][1][0].v_row["layers"]["mlp"]["down"]  # [L, F]
        assert v_row.shape == (2, 132)


def test_params_are_sharded_on_the_mesh():
    cfg = config(mesh=dict(data=1, fsdp=4, tensor=2, rules="fsdp_tp"))
    c = compiled(cfg)
    state = c.init_state(jax.random.key(0))
    q = state["params"]["policy"]["layers"]["attn"]["q"]  # [L, D, N, H]: D on fsdp, N on tensor
    assert q.sharding.spec[1:3] == ("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 24 // 4, 6 // 2, 4)
    mu = state["opt_state"]["policy"][1][0].mu["layers"]["attn"]["q"]  # Adam moments follow their params
    assert mu.sharding.spec == q.sharding.spec


@pytest.mark.parametrize("rules", ["dp", "zero1", "zero2", "zero3"])
def test_zero_presets_store_the_bytes_of_the_zero_formula_and_of_the_plan(rules):
    """Per device, as the state is held between steps (each array's own shard), on data 2 x fsdp 4,
    for Ψ float32 params: params 4Ψ / P, gradients 4Ψ / G, Adam's two moments 8Ψ / S, where P, G, S
    are 1 or N = data x fsdp = 8 or F = fsdp = 4 by the ZeRO stage (the table in jaxlm.sharding).
    Every param has a D = 24 axis, which 8 divides; the slack: zero3 = fsdp leaves the norms' scales
    whole (none of their logical axes maps to fsdp): final [D], attention and MLP [L, D]."""
    P_, G, S = {"dp": (1, 1, 1), "zero1": (1, 1, 8), "zero2": (1, 8, 8), "zero3": (4, 4, 4)}[rules]
    cfg = config(mesh=dict(data=2, fsdp=4, rules=rules))
    state = compiled(cfg).init_state(jax.random.key(0))
    params, opt = state["params"]["policy"], state["opt_state"]["policy"]
    stored = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if x.ndim)
    psi = sum(x.size for x in jax.tree.leaves(params))
    whole = 24 + 2 * 2 * 24 if rules == "zero3" else 0
    if rules == "zero3":
        kept = {jax.tree_util.keystr(k): x.size for k, x in jax.tree_util.tree_leaves_with_path(params)
                if x.sharding.is_fully_replicated}
        assert all(k.endswith("['scale']") for k in kept) and sum(kept.values()) == whole
    formula = lambda bytes_per_param, ways: bytes_per_param * ((psi - whole) // ways + whole)
    assert stored(params) == formula(4, P_)
    assert stored(opt) == formula(8, S)  # the int32 step counters (0-d) left out
    # jaxlm plan's arithmetic gives the same bytes without devices, and the gradients by the formula.
    p = plan(cfg, devices=8)
    assert (p["bytes_params"], p["bytes_grads"], p["bytes_optimizer"]) == (stored(params), formula(4, G), stored(opt))


def test_zero2_holds_its_gradients_split_where_zero1_holds_them_whole():
    """Gradients live only inside the step, so their bytes are measured as the compiled step's
    temporaries (XLA's buffer assignment): zero1 reduces them whole onto every device, zero2 keeps
    1/N of them (XLA:CPU has no reduce-scatter: it all-reduces and slices; GPU and TPU scatter), so
    zero1 needs ~(1 - 1/N) 4Ψ more (measured here: 0.91 of it)."""
    temp = {}
    for rules in ("zero1", "zero2"):
        c = compiled(config(mesh=dict(data=2, fsdp=4, rules=rules)))
        rows = sharding.batch_sharding(c.mesh, 3, leading=1)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows)
                 for k, v in random_batch(np.random.default_rng(0), 1, 8).items()}
        compiled_step = c.train_step.lower(c.abstract_state, {}, batch).compile()
        temp[rules] = compiled_step.memory_analysis().temp_size_in_bytes
    psi = sum(x.size for x in jax.tree.leaves(c.abstract_state["params"]))
    assert temp["zero1"] - temp["zero2"] >= 0.75 * (1 - 1 / 8) * 4 * psi, (temp, psi)


@pytest.mark.slow
@pytest.mark.parametrize("rules", ["fsdp_tp", "zero2"])
def test_accumulated_steps_equal_one_big_batch(rules):
    rng = np.random.default_rng(1)
    big = random_batch(rng, 1, 8)
    micro = {k: v.reshape(4, 2, *v.shape[2:]) for k, v in big.items()}
    one, losses_one, m_one = run_steps(config(mesh=dict(fsdp=1)), [big], devices=jax.devices()[:1])
    # Micro-batches of 2 rows, sharded 2 ways; fsdp_tp: tensor-parallel 4 ways; zero2: the gradients
    # summed over the micro-batches in halves (the tensor axis idle).
    cfg = config(train=dict(grad_accum_steps=4), mesh=dict(fsdp=2, tensor=4, rules=rules))
    acc, losses_acc, m_acc = run_steps(cfg, [micro])
    np.testing.assert_allclose(losses_one, losses_acc, rtol=1e-5)
    np.testing.assert_allclose(m_one["grad_norm"], m_acc["grad_norm"], rtol=1e-5)
    assert_trees_close(one["params"], acc["params"], atol=1e-5)


def test_one_batch_overfits():
    rng = np.random.default_rng(2)
    batch = random_batch(rng, 1, 8)
    batch["loss_mask"][:] = 1.0
    # Cosine decay to the end: at a constant 1e-2, Adam settles at ~0.023 by step 60, then spikes
    # near step 140 as its second moments decay (seen with jax 0.10.2 on CPU).
    cfg = config(optim=dict(lr=1e-2, warmup_steps=0, decay="cosine"), train=dict(steps=150, batch_size=8, seq_len=16))
    _, losses, _ = run_steps(cfg, [batch], steps=150)
    assert losses[0] > 3.0  # about log(37) at init
    assert losses[-1] < 0.05, losses[-10:]


def test_nonfinite_loss_skips_the_update():
    rng = np.random.default_rng(3)
    good = random_batch(rng, 1, 8)
    bad = {k: v.copy() for k, v in good.items()}
    bad["loss_mask"][0, 0, 0] = np.nan
    cfg = config()
    c = compiled(cfg)
    state = c.init_state(jax.random.key(0))
    before = jax.device_get(state)
    state, m = c.train_step(state, {}, sharding.put_batch(c.mesh, bad, leading=1))
    assert float(m["update_ok"]) == 0.0
    after = jax.device_get(state)
    assert int(after["skipped"]) == 1 and int(after["step"]) == 0
    assert_trees_close(before["params"], after["params"], atol=0)
    assert_trees_close(before["opt_state"], after["opt_state"], atol=0)
    state, m = c.train_step(state, {}, sharding.put_batch(c.mesh, good, leading=1))
    assert float(m["update_ok"]) == 1.0 and int(state["step"]) == 1
