"""`jaxlm plan`: per-device bytes against the real shardings, and the compute arithmetic."""
import math

import jax
import pytest

from jaxlm import cli, model, sharding
from jaxlm.config import ConfigError, from_dict
from jaxlm.plan import format_plan, plan

TREE = {"model": dict(vocab_size=96, d_model=48, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=80,
                      max_seq_len=64),
        "train": dict(batch_size=16, seq_len=64, grad_accum_steps=2)}


@pytest.mark.parametrize("mesh", [dict(fsdp=8, rules="fsdp"), dict(fsdp=2, tensor=4, rules="fsdp_tp"),
                                  dict(data=8, fsdp=1, rules="dp"), dict(data=2, fsdp=4, rules="zero1"),
                                  dict(data=2, fsdp=4, rules="zero2"), dict(data=2, fsdp=4, rules="zero3"),
                                  dict(stage=2, fsdp=4, rules="fsdp")])
def test_param_and_optimizer_bytes_match_the_sharded_layout(mesh):
    cfg = from_dict({**TREE, "mesh": mesh})
    p = plan(cfg, devices=8)
    shapes = model.abstract_params(cfg.model)
    mesh_, rules = sharding.make_mesh(cfg.mesh), cfg.mesh.rules
    shards = sharding.param_shardings(mesh_, rules, shapes, model.logical_axes(cfg.model))
    opt_shards = sharding.optimizer_shardings(mesh_, rules, shapes, shards)
    per_device = lambda tree: sum(math.prod(s.shard_shape(a.shape)) * 4
                                  for a, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(tree)))
    want, want_opt = per_device(shards), per_device(opt_shards)
    assert p["bytes_params"] == want
    assert p["bytes_grads"] == (want_opt if rules == "zero2" else want)
    assert p["bytes_optimizer"] == 2 * want_opt  # AdamW: two float32 moments
    assert (want_opt < want) == (rules in ("zero1", "zero2"))
    assert p["local_batch"] == max(16 // 2 // (p["mesh"]["data"] * p["mesh"]["fsdp"]), 1)


def test_compute_and_time_follow_the_formulas():
    cfg = from_dict(TREE)
    p = plan(cfg, devices=4, mfu=0.5, peak_tflops=100.0, tokens=1e9)
    n = p["params_matmul"]
    assert p["compute_flops"] == 6 * n * 1e9 and p["chinchilla_tokens"] == 20 * n
    fpt = 6 * n + 6 * 4 * 64 * 48
    assert p["flops_per_token"] == fpt
    assert p["seconds"] == pytest.approx(fpt * 1e9 / (0.5 * 100e12 * 4))
    chunked = plan(from_dict({**TREE, "train": {**TREE["train"], "loss_chunk": 16}}), devices=4)
    assert chunked["bytes_logits"] == p["bytes_logits"] / 4
    with pytest.raises(ConfigError, match="--devices 6"):
        plan(from_dict({**TREE, "mesh": dict(fsdp=4)}), devices=6)


def test_plan_command_prints_the_table(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: 1b}\ntrain: {seq_len: 2048, batch_size: 512}\n")
    assert cli.main(["plan", str(path), "--devices", "16"]) == 0
    out = capsys.readouterr().out
    assert "optimizer" in out and "Chinchilla" in out and "fsdp': 16" in out and "rules fsdp" in out


def test_sequence_shards_divide_activations_and_logits_and_add_the_gathered_keys_and_values():
    one = plan(from_dict({**TREE, "mesh": dict(data=2, fsdp=1)}), devices=2)
    four = plan(from_dict({**TREE, "mesh": dict(data=2, fsdp=1, sequence=4)}), devices=8)
    assert four["mesh"]["sequence"] == 4 and four["local_batch"] == one["local_batch"] == 4
    assert four["bytes_activations"] == one["bytes_activations"] / 4
    assert four["bytes_logits"] == one["bytes_logits"] / 4
    assert one["bytes_kv_gathered"] == 0
    # k and v of all T = 64 positions, K * H = 2 * 12, bfloat16, in each of the 3 layers (remat none)
    assert four["bytes_kv_gathered"] == 2 * 4 * 64 * 24 * 2 * 4
    assert "gathered K/V" in format_plan(four) and "gathered K/V" not in format_plan(one)


def test_a_pipeline_divides_the_layers_and_states_its_bubble():
    """2 stages x 4 microbatches (GPipe): bubble 1/5; each device keeps half the layers' activations for
    5 iterations of 4 useful ones; the layers' FLOPs take 5/4 as long and the head's run on both stages."""
    flat, staged = (plan(from_dict({**TREE, "mesh": mesh, "train": {**TREE["train"], "microbatches": 4}}),
                         devices=8, mfu=0.5, peak_tflops=100.0, tokens=1e9)
                    for mesh in (dict(fsdp=8), dict(stage=2, fsdp=4)))
    assert staged["pipeline"] == {"stages": 2, "microbatches": 4, "repeats": 1, "bubble": 0.2}
    assert staged["local_batch"] == 2 * flat["local_batch"]  # the batch splits 4 ways, not 8
    assert staged["bytes_activations"] == pytest.approx(flat["bytes_activations"] * 2 / 2 * 5 / 4)
    head = 6 * 48 * 96
    fpt = (flat["flops_per_token"] - head) * 5 / 4 + 2 * head
    assert staged["seconds"] == pytest.approx(fpt * 1e9 / (0.5 * 100e12 * 8))
    assert "bubble 20.0%" in format_plan(staged)
