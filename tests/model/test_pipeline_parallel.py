"""Pipeline parallelism: the layers as GPipe or circular stages over the mesh's "stage" axis give the
unpipelined loss and gradients, alone and with data, FSDP and tensor axes, on packed rows and on the
encoder-decoder; each device computes its own stage; a run trains alike and resumes on another layout."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import model, sharding
from jaxlm.config import ConfigError, MeshConfig, ModelConfig
from jaxlm.model.pipeline import Schedule
from jaxlm.testing import random_params, tiny_config

CFG = ModelConfig(vocab_size=37, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=16,
                  dtype="float32")
B, T = 8, 16


def _batch(seed=0):
    """Rows packing two documents each (lengths 10 + 6): segment ids and restarting positions."""
    tokens = np.random.default_rng(seed).integers(1, CFG.vocab_size, (B, T + 1))
    seg = np.repeat([[1] * 10 + [2] * 6], B, 0)
    pos = np.repeat([list(range(10)) + list(range(6))], B, 0)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(seg, jnp.int32), jnp.asarray(pos, jnp.int32)


def _loss_and_grads(cfg, params, mesh_cfg, schedule, encdec=False):
    tokens, seg, pos = _batch()
    mesh = sharding.make_mesh(mesh_cfg)
    placed = model.place(cfg, params, mesh, mesh_cfg.rules)

    def loss(p):
        with sharding.activate(mesh, mesh_cfg.rules, schedule):
            if encdec:
                logits = model.apply(cfg, p, tokens[:, :T], seg, pos, decoder_tokens=tokens[:, 1:],
                                     decoder_segment_ids=seg, decoder_positions=pos)
            else:
                logits = model.apply(cfg, p, tokens[:, :T], seg, pos)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss))(placed)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, 0)


@pytest.fixture(scope="module")
def reference(params):
    return _loss_and_grads(CFG, params, MeshConfig(data=8, fsdp=1), None)


@pytest.mark.parametrize("mesh, schedule", [
    (MeshConfig(stage=2, data=4, fsdp=1, rules="dp"), Schedule(2, 4)),  # GPipe, 2 stages
    (MeshConfig(stage=4, data=1, fsdp=2, rules="fsdp"), Schedule(4, 4)),  # GPipe, 4 stages, FSDP
    (MeshConfig(stage=2, data=2, fsdp=1, tensor=2, rules="fsdp_tp"), Schedule(2, 2, repeats=2)),  # circular, TP
], ids=["gpipe2-dp", "gpipe4-fsdp", "circular2-tp"])
def test_pipelined_equals_unpipelined(params, reference, mesh, schedule):
    loss, grads = _loss_and_grads(CFG, params, mesh, schedule)
    want_loss, want_grads = reference
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        want = want_grads
        for k in path:
            want = want[k.key]
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_each_device_computes_its_own_stage(params):
    """4 stages of 2 layers: the compiled step's matmuls are one stage's (the layer stack's leading axis
    is 2 per device, not 8), and the stages pass activations by collective permutes."""
    mesh = sharding.make_mesh(MeshConfig(stage=4, data=2, fsdp=1, rules="fsdp"))
    placed = model.place(CFG, params, mesh, "fsdp")
    assert placed["layers"]["attn"]["q"].addressable_shards[0].data.shape[0] == 2

    def logits(p, tokens):
        with sharding.activate(mesh, "fsdp", Schedule(4, 4)):
            return model.apply(CFG, p, tokens)

    hlo = jax.jit(logits).lower(placed, _batch()[0][:, :T]).compile().as_text()
    assert "collective-permute" in hlo


def test_the_encoder_decoder_pipelines_both_stacks():
    cfg = dataclasses.replace(CFG, arch="encoder_decoder", n_layers=2, n_encoder_layers=4)
    params = random_params(cfg, 1)
    want_loss, want_grads = _loss_and_grads(cfg, params, MeshConfig(data=8, fsdp=1), None, encdec=True)
    loss, grads = _loss_and_grads(cfg, params, MeshConfig(stage=2, data=4, fsdp=1), Schedule(2, 4), encdec=True)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mesh, train, fragment", [
    (dict(stage=3, fsdp=-1), {}, "model.n_layers=2 must be a multiple of mesh.stage x mesh.repeats = 3"),
    (dict(stage=2, fsdp=-1), dict(microbatches=3), "rows must split into train.microbatches=3"),
    (dict(stage=2, repeats=1, fsdp=-1, sequence=2), {}, "context and pipeline parallelism do not combine"),
])
def test_pipeline_settings_that_cannot_run_are_one_line_errors(mesh, train, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(mesh=mesh, train=train)


def test_a_pipelined_run_trains_as_the_unpipelined_one_and_resumes_on_another_layout(tmp_path):
    """Through the real loop: 2 GPipe stages (4 microbatches, fsdp 4) give the unpipelined run's losses
    and gradient norms (fsdp 8); its step-4 checkpoint restores without the pipeline, and steps 5-6
    again equal the straight run's."""
    import shutil

    from jaxlm.runs import read_metrics
    from jaxlm.train import pretrain

    def run(name, **mesh):
        cfg = tiny_config(train=dict(steps=6, save_every=4, eval_every=6, run_dir=str(tmp_path / name)), mesh=mesh)
        pretrain.main(cfg)
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name)
                if "loss" in r and "event" not in r}

    whole = run("whole", fsdp=8)
    staged = run("staged", stage=2, fsdp=4)
    np.testing.assert_allclose([staged[s] for s in range(1, 7)], [whole[s] for s in range(1, 7)], rtol=2e-5)
    shutil.rmtree(tmp_path / "staged" / "checkpoints" / "6")
    resumed = run("staged", fsdp=8)  # restores step 4, saved by 2 stages, onto one stage
    rows = read_metrics(tmp_path / "staged")
    starts = [r["mesh"]["stage"] for r in rows if r.get("event") == "start"]
    assert starts == [2, 1] and sum(r.get("step") == 5 and "grad_norm" in r for r in rows) == 2  # 5 ran again
    np.testing.assert_allclose([resumed[s] for s in (5, 6)], [whole[s] for s in (5, 6)], rtol=2e-5)
