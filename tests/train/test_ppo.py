"""The PPO stage: rollout rows whose mask marks exactly the response tokens; GRPO/RLOO on equal
scores learn nothing; the update step sharded == on one device, both trained roles updated; an
iteration starts at KL 0 (policy == reference) and leaves the init run untouched; a run stopped by
SIGTERM after its first iteration (saved there) and resumed ends where the straight run does; PPO
and GRPO with a reward model as the scorer (and PPO's critic started from it) run."""
import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from jaxlm import runs, sharding
from jaxlm.checkpoint import steps
from jaxlm.config import ConfigError
from jaxlm.data import tasks
from jaxlm.data.examples import chat
from jaxlm.testing import random_params, tiny_config, write_run
from jaxlm.train import ppo, rollout
from jaxlm.train.loop import Interrupted
from jaxlm.train.state import compile_stage, trained

T = 64
CFG = tiny_config(model=dict(max_seq_len=T), train=dict(seq_len=T, steps=3, save_every=1), mesh=dict(fsdp=4, tensor=2),
                  optim=dict(lr=3e-3, warmup_steps=0), sft=dict(template="Q: {prompt}\nA: ", task_eval_examples=4),
                  ppo=dict(tasks=["add", "recall"], task_prompts=6, checker=True, prompts_per_iteration=8,
                           max_new_tokens=6, epochs=2, minibatches=2))


def _cfg(tmp_path, init, name="ppo", **p):
    return dataclasses.replace(CFG, ppo=dataclasses.replace(CFG.ppo, **p),
                               train=dataclasses.replace(CFG.train, run_dir=str(tmp_path / name), init_from=str(init)))


@pytest.fixture(scope="module")
def init_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("init") / "sft", CFG, random_params(CFG.model, 0, scale=0.3), step=2)


def test_layout_masks_the_positions_that_predict_the_response():
    rows = rollout.layout([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], T=7, pad_id=0)
    np.testing.assert_array_equal(rows["tokens"], [[5, 6, 7, 1, 2, 0, 0], [8, 3, 4, 9, 0, 0, 0]])
    targets, mask = rows["targets"], rows["mask"] > 0
    assert targets[0][mask[0]].tolist() == [1, 2] and targets[1][mask[1]].tolist() == [3, 4, 9]
    np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 4, 0, 0])
    with pytest.raises(ValueError, match="row 0: prompt and response are 5 tokens, more than the rollout width 4"):
        rollout.layout([[5, 6, 7]], [[1, 2]], T=4)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_equal_scores_in_a_group_give_zero_advantages(algorithm):
    p = dataclasses.replace(CFG.ppo, algorithm=algorithm, group_size=4, kl_in_loss=True)
    rng = np.random.default_rng(0)
    mask = np.zeros((8, 10), np.float32)
    mask[:, 3:7] = 1
    logp, ref = rng.normal(-2, 1, (8, 10)) * mask, rng.normal(-2, 1, (8, 10)) * mask
    out = ppo.advantages(p, np.repeat([1.0, 0.0], 4), logp, ref, np.zeros_like(mask), mask, 0.1)
    assert not np.asarray(out["advantages"]).any()
    out = ppo.advantages(p, np.array([1.0, 0, 0, 0, 1, 1, 1, 0]), logp, ref, np.zeros_like(mask), mask, 0.1)
    a = np.asarray(out["advantages"])
    assert (a[0, 3:7] > 0).all() and (a[1, 3:7] < 0).all() and not a[:, :3].any()


def _rollout_batch(rng, rows):
    prompts = [list(rng.integers(3, 200, rng.integers(2, 8))) for _ in range(rows)]
    responses = [list(rng.integers(3, 200, rng.integers(1, 6))) for _ in range(rows)]
    b = rollout.layout(prompts, responses, 16)
    for k in ("old_logp", "old_values", "returns", "advantages"):
        b[k] = (rng.normal(-1 if k == "old_logp" else 0, 0.5, b["mask"].shape) * b["mask"]).astype(np.float32)
    return b


def test_the_update_step_sharded_equals_one_device_and_trains_both_roles():
    rng = np.random.default_rng(1)
    batch = {k: v[None] for k, v in _rollout_batch(rng, 8).items()}
    out = {}
    for name, devices, mesh in (("one", jax.devices()[:1], dict(fsdp=1, tensor=1)),
                                ("eight", None, dict(fsdp=4, tensor=2)),
                                ("sequence", None, dict(fsdp=2, sequence=2, tensor=2))):  # context parallel
        cfg = dataclasses.replace(CFG, mesh=dataclasses.replace(CFG.mesh, rules="fsdp_tp", **mesh))
        roles = trained(ppo.ppo_roles(cfg))
        assert [r.name for r in roles] == ["policy", "value"]
        c = compile_stage(cfg, roles, ppo.ppo_objective(cfg), devices=devices)
        state = c.init_state(jax.random.key(0))
        before = jax.device_get(state["params"])
        state, o = c.train_step(state, {}, sharding.put_batch(c.mesh, batch, leading=1))
        out[name] = jax.device_get((state["params"], o))
        for role in ("policy", "value"):  # both trained roles moved
            assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[role]),
                                                                jax.tree.leaves(out[name][0][role])))
    p1, o1 = out["one"]
    for p8, o8 in (out["eight"], out["sequence"]):
        for k in ("loss", "policy_loss", "value_loss", "entropy"):
            np.testing.assert_allclose(o8["metrics"][k][0], o1["metrics"][k][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def _rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "score" in r and "event" not in r]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    """Checkable prompts as a file (no built-in task accuracy to evaluate: a faster run), and a bad line."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    records = [{"prompt": chat.instruction_prompt(ex), "task": ex["task"], "answer": ex["answer"]}
               for ex in tasks.mixed(["add", "recall"], "train", 6, 0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"no_prompt": 1}\n')
    return path


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_resumes_where_the_straight_run_ends(tmp_path, init_run, prompt_file):
    before = runs.load_run(init_run).params
    files = dict(tasks=[], prompt_files=[str(prompt_file)])
    straight = ppo.main(_cfg(tmp_path, init_run, "straight", **files), log=lambda line: None)
    rows = _rows(tmp_path / "straight")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["kl"] == 0.0  # the first rollout: the policy is the reference
    assert rows[1]["kl"] != 0.0 and straight["final_step"] == 3
    for k in ("entropy", "clip_frac", "value_loss", "explained_var", "time_rollout", "time_score", "time_update"):
        assert np.isfinite(rows[-1][k])
    jax.tree.map(np.testing.assert_array_equal, runs.load_run(init_run).params, before)  # the init run untouched

    def sigterm_after_first(line):
        if line.startswith("iteration 1"):
            os.kill(os.getpid(), signal.SIGTERM)  # the run stops after the iteration in flight, saved there

    start = next(r for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())
                 if r.get("event") == "start")
    assert start["prompt_files"] == {"records": 13, "used": 12, "missing_field": 1}  # the bad line counted
    cfg = _cfg(tmp_path, init_run, "resumed", **files)
    stopped = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, save_every=10))
    with pytest.raises(Interrupted) as e:
        ppo.main(stopped, log=sigterm_after_first)
    assert (e.value.code, e.value.saved, e.value.latest) == (143, 1, 1)
    assert steps(tmp_path / "resumed") == [1]
    ppo.main(cfg, log=lambda line: None)
    resumed = _rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for k in ("score", "kl", "policy_loss", "value_loss"):
        assert resumed[-1][k] == rows[-1][k], k
    a, b = runs.load_run(tmp_path / "straight").params, runs.load_run(tmp_path / "resumed").params
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, value_head=True))
    return write_run(tmp_path_factory.mktemp("reward") / "reward", cfg, random_params(cfg.model, 1), role="reward")


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_reward_model_as_the_scorer_and_the_critics_start(tmp_path, init_run, reward_run, algorithm):
    critic = (dict(value_from=str(reward_run)) if algorithm == "ppo"
              else dict(group_size=2, prompts_per_iteration=4, eval_every=1))  # and exact match each iteration
    cfg = _cfg(tmp_path, init_run, checker=False, reward_run=str(reward_run), algorithm=algorithm, tasks=["add"],
               frozen_dtype="bfloat16", **critic)
    iterations = 1 if algorithm == "ppo" else 2
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=iterations))
    before = runs.load_run(reward_run).params
    summary = ppo.main(cfg, log=lambda line: None)
    assert summary["final_step"] == iterations and np.isfinite(summary["score"]) and "correct" not in summary
    evaluated = [r["step"] for r in runs.read_metrics(tmp_path / "ppo") if "exact_match/add" in r]
    assert evaluated == ([1] if algorithm == "ppo" else [1, 2])  # eval_every, then the end
    jax.tree.map(np.testing.assert_array_equal, runs.load_run(reward_run).params, before)  # the reward run untouched
    assert runs.roles(tmp_path / "ppo", 1) == (["policy", "value"] if algorithm == "ppo" else ["policy"])
    if algorithm == "ppo":  # the critic started from the reward model, its trained head included
        events = [r for r in runs.read_metrics(tmp_path / "ppo") if r.get("event") == "init_from"]
        assert {"role": "value", "run_dir": str(reward_run)} in [{k: e[k] for k in ("role", "run_dir")} for e in events]
        assert np.isfinite(summary["value_loss"])


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="ppo.group_size=1 must be >= 2 for ppo.algorithm=grpo"):
        tiny_config(ppo=dict(algorithm="grpo"))
    with pytest.raises(ConfigError, match="ppo.minibatches=3 must divide the rollout's 32 responses"):
        tiny_config(ppo=dict(minibatches=3))
    with pytest.raises(ConfigError, match="ppo.algorithm='a2c' is not allowed; choose one of: ppo, grpo, rloo"):
        tiny_config(ppo=dict(algorithm="a2c"))
