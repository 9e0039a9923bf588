"""Stages of several models: a trained policy beside a frozen reference through the same loop
(sharded == unsharded, the reference untouched), a value head started from an LM run, and what
the step does with the state (donated, compiled once, restored onto another layout)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model, runs, sharding
from jaxlm.checkpoint import Checkpointer
from jaxlm.objectives.lm import lm_loss
from jaxlm.testing import random_batch, tiny_config, write_run
from jaxlm.train import loop, pretrain
from jaxlm.train.state import Role, compile_stage, role_params
from jaxlm.train.step import Objective

KL_COEF = 0.5


def kl_objective(model_cfg) -> Objective:
    """LM loss plus KL_COEF x KL(policy || reference) per target token: the shape of DPO and PPO."""

    def loss(params, frozen, batch):
        logits_BTV = model.apply(model_cfg, params["policy"], batch["tokens"])
        ref_BTV = model.apply(model_cfg, frozen["reference"], batch["tokens"])
        _, metrics = lm_loss(logits_BTV, batch["targets"], batch["loss_mask"])
        logp_BTV, logq_BTV = jax.nn.log_softmax(logits_BTV), jax.nn.log_softmax(ref_BTV)
        kl_BT = jnp.sum(jnp.exp(logp_BTV) * (logp_BTV - logq_BTV), axis=-1)
        kl_sum = jnp.sum(kl_BT * batch["loss_mask"])
        tokens = metrics["loss"][1]
        return metrics["loss"][0] + KL_COEF * kl_sum, {**metrics, "kl": (kl_sum, tokens)}

    return Objective(loss, pretrain.token_count)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """A run whose params (random, not the policy's init) the frozen reference starts from."""
    cfg = tiny_config()
    return write_run(tmp_path_factory.mktemp("ref") / "run", cfg, step=3, seed=11)


def two_role_stage(cfg, reference_run):
    roles = (Role("policy", cfg.model), Role("reference", cfg.model, trained=False, init_from=str(reference_run)))
    base = pretrain.build(cfg)
    return loop.Stage("toy", roles, kl_objective(cfg.model), base.train_data, base.eval_data, base.info)


def test_two_role_stage_through_the_loop_sharded_equals_unsharded(reference_run, tmp_path):
    summaries, finals = {}, {}
    for name, devices, mesh in (("one", jax.devices()[:1], dict(fsdp=1)), ("eight", None, dict(fsdp=4, tensor=2))):
        cfg = tiny_config(train=dict(steps=4, save_every=4, eval_every=4, run_dir=str(tmp_path / name)),
                          mesh=dict(mesh, rules="fsdp_tp"))
        summaries[name] = loop.run(cfg, two_role_stage(cfg, reference_run), devices=devices)
        finals[name] = runs.load_run(tmp_path / name, mesh=sharding.make_mesh(cfg.mesh, devices)).params
    rows = lambda name: [r for r in runs.read_metrics(tmp_path / name) if "kl" in r and "event" not in r]
    one, eight = rows("one"), rows("eight")
    assert [r["step"] for r in one] == [1, 2, 3, 4]
    assert one[0]["kl"] > 0.01  # the policy starts away from the reference: the KL term is live
    for key in ("loss", "kl", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in eight], [r[key] for r in one], rtol=2e-5)
    np.testing.assert_allclose(summaries["eight"]["eval_kl"], summaries["one"]["eval_kl"], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(finals["eight"]), jax.tree.leaves(finals["one"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
    held = runs.roles(tmp_path / "one", 4)
    assert held == ["policy"]  # a frozen role is never saved: it is reloaded from its own run


def test_the_frozen_role_gets_no_update_and_is_not_donated(reference_run):
    cfg = tiny_config()
    stage = two_role_stage(cfg, reference_run)
    c = compile_stage(cfg, stage.roles, stage.objective)
    state = c.init_state(jax.random.key(0))
    frozen = {"reference": role_params(stage.roles[1], jax.random.key(0), c.mesh, "fsdp")[0]}
    before = jax.device_get(frozen)
    batch = sharding.put_batch(c.mesh, random_batch(np.random.default_rng(0), 1, 8, 32, 369), leading=1)
    state, out = c.train_step(state, frozen, batch)
    assert float(out["update_ok"]) == 1.0 and float(out["metrics"]["kl"][0]) > 0
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), before)
    assert set(state["params"]) == {"policy"} and set(state["opt_state"]) == {"policy"}


def test_donated_state_buffers_are_deleted_after_a_step():
    cfg = tiny_config()
    c = compile_stage(cfg, pretrain.policy_role(cfg), pretrain.lm_objective(cfg.model))
    state = c.init_state(jax.random.key(0))
    leaves = jax.tree.leaves(state)
    batch = sharding.put_batch(c.mesh, random_batch(np.random.default_rng(0), 1, 8, 32, 369), leading=1)
    new, _ = c.train_step(state, {}, batch)
    assert all(x.is_deleted() for x in leaves)
    assert not any(x.is_deleted() for x in jax.tree.leaves(new))


def test_train_and_eval_steps_compile_once_over_a_run(tmp_path, monkeypatch):
    made = []

    def recording(*args, **kwargs):
        made.append(compile_stage(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(loop, "compile_stage", recording)
    cfg = tiny_config(train=dict(steps=6, save_every=3, eval_every=2, run_dir=str(tmp_path / "run")))
    summary = pretrain.main(cfg)
    assert summary["final_step"] == 6 and np.isfinite(summary["eval_loss"])
    (c,) = made
    assert c.train_step._cache_size() == 1 and c.eval_step._cache_size() == 1


def test_value_head_role_starts_from_an_lm_run(tiny_run):
    cfg = runs.run_config(tiny_run)
    critic = Role("value", dataclasses.replace(cfg.model, value_head=True), init_from=str(tiny_run))
    mesh = sharding.make_mesh(cfg.mesh)
    params, step = role_params(critic, jax.random.key(0), mesh, cfg.mesh.rules)
    lm = runs.load_run(tiny_run)
    assert step == lm.step == 20
    for key in lm.params:  # the whole trunk and LM head are the run's
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(params[key]), jax.device_get(lm.params[key]))
    head = np.asarray(params["value_head"])  # a fresh head ~ N(0, 1 / (D + 1))
    assert head.shape == (32,) and 0.5 < head.std() * np.sqrt(33) < 1.5
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 16)), jnp.int32)
    values = model.apply(critic.model, params, tokens, head="value")
    assert values.shape == (2, 16) and float(jnp.abs(values).max()) > 0
    # Trained on a value target, the head gets the gradient.
    grads = jax.grad(lambda p: jnp.mean((model.apply(critic.model, p, tokens, head="value") - 1.0) ** 2))(params)
    assert float(jnp.abs(grads["value_head"]).sum()) > 0


@pytest.mark.parametrize("saved, restored", [("fsdp_tp", "dp"), ("zero1", "fsdp"), ("fsdp", "zero1")])
def test_a_checkpoint_restores_onto_another_sharding_preset(tmp_path, saved, restored):
    stages = {}
    # zero1 on both batch axes: its Adam moments split 8 ways where fsdp's split 4 (and are whole on data)
    mesh = dict(data=2, fsdp=4) if "zero1" in (saved, restored) else dict(fsdp=4, tensor=2)
    for rules in (saved, restored):
        cfg = tiny_config(mesh=dict(mesh, rules=rules))
        stages[rules] = compile_stage(cfg, pretrain.policy_role(cfg), pretrain.lm_objective(cfg.model))
    c = stages[saved]
    state = c.init_state(jax.random.key(3))
    batch = sharding.put_batch(c.mesh, random_batch(np.random.default_rng(1), 1, 8, 32, 369), leading=1)
    state, _ = c.train_step(state, {}, batch)  # Adam moments that are not zero
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, state["params"], state["opt_state"], {"step": 1})
    want = jax.device_get((state["params"], state["opt_state"]))
    target = stages[restored].abstract_state
    params, opt_state, meta = ckpt.restore(1, target["params"], target["opt_state"])
    ckpt.close()
    assert meta["step"] == 1
    for leaf, t in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((target["params"], target["opt_state"]))):
        assert leaf.sharding == t.sharding
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((params, opt_state)), want)
    q = params["policy"]["layers"]["attn"]["q"]
    assert q.sharding.spec != c.abstract_state["params"]["policy"]["layers"]["attn"]["q"].sharding.spec
    mu = lambda opt: opt["policy"][1][0].mu["layers"]["attn"]["q"].sharding.spec  # Adam's moments move too
    assert mu(opt_state) != mu(c.abstract_state["opt_state"])


def test_bfloat16_step_matches_float32_within_its_precision():
    """Tolerance: bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4%); through two layers
    and a 369-way softmax the loss and gradient norm stay within 2% of float32's."""
    out = {}
    batch = random_batch(np.random.default_rng(2), 1, 8, 32, 369, keep=1.0)
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(model=dict(dtype=dtype))
        c = compile_stage(cfg, pretrain.policy_role(cfg), pretrain.lm_objective(cfg.model))
        state = c.init_state(jax.random.key(0))
        _, o = c.train_step(state, {}, sharding.put_batch(c.mesh, batch, leading=1))
        out[dtype] = jax.device_get(o)
    loss = {k: v["metrics"]["loss"][0] / v["metrics"]["loss"][1] for k, v in out.items()}
    assert abs(loss["bfloat16"] - loss["float32"]) < 0.02 * loss["float32"]
    assert abs(out["bfloat16"]["grad_norm"] - out["float32"]["grad_norm"]) < 0.02 * out["float32"]["grad_norm"]
    assert loss["bfloat16"] != loss["float32"]  # bfloat16 really ran
