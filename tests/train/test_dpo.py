"""The DPO stage: sequence log-probs == a per-token loop, a pair packed with others == alone, a
reference computed on the fly == precomputed, only the policy learns, sharded == unsharded, the
start at log 2, a tiny policy learning a planted preference, and the built-in tasks' pairs against
the init run's own sampled answers."""
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model, runs, sharding
from jaxlm.data import preferences, tasks
from jaxlm.data.examples import chat, preference
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.testing import random_params, tiny_config, write_run
from jaxlm.train import dpo
from jaxlm.train.state import compile_stage, role_params

TOK = ByteTokenizer()
T = 64
CFG = tiny_config(model=dict(max_seq_len=T), train=dict(seq_len=T, batch_size=8),
                  optim=dict(lr=1e-2, warmup_steps=0, decay="constant", eps=1e-4), dpo=dict(beta=0.5, sft_coef=0.3))
R = chat.Renderer.from_tokenizer(TOK, "Q: {prompt}\nA: ")


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join("".join(rng.choice(list("abcdefgh"), 3)) for _ in range(k))
    records = [{"prompt": words(int(rng.integers(1, 3))), "chosen": words(2), "rejected": words(1)} for _ in range(n)]
    groups, counts = preference.to_groups(R, preferences.pairs_of(records), T, "trim_context", {}, 2)
    assert counts["used"] == n
    return groups


@pytest.fixture(scope="module")
def groups():
    return _pairs(8)


@pytest.fixture(scope="module")
def policy():
    return random_params(CFG.model, 0, scale=0.2, norm_scale=0.2)


@pytest.fixture(scope="module")
def reference():
    return random_params(CFG.model, 1, scale=0.2, norm_scale=0.2)


def _batch(groups, per_row, rows=None):
    packed, _ = preference.pack_groups(groups, T, 0, groups_per_row=per_row, max_responses=2)
    if rows is not None:
        pad = rows - len(packed["tokens"])
        packed = {k: np.concatenate([v, np.full((pad, *v.shape[1:]), -1 if k in ("ends", "index") else 0, v.dtype)])
                  for k, v in packed.items()}
    return {k: jnp.asarray(v) for k, v in packed.items() if k != "index"}


def test_sequence_log_probs_equal_a_per_token_loop(policy, groups):
    batch = _batch(groups, per_row=4)
    lp_BGK, n_BGK = dpo.pair_log_probs(CFG.model, policy, batch)
    packed, _ = preference.pack_groups(groups, T, 0, groups_per_row=4, max_responses=2)
    for b, g in zip(*np.nonzero(packed["index"] >= 0)):
        group = groups[packed["index"][b, g]]
        for k, (seq, mask) in enumerate(zip(group["sequences"], group["masks"])):
            logits = np.asarray(model.apply(CFG.model, policy, jnp.asarray(seq)[None]), np.float64)[0]
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            want = sum(logits[t, seq[t + 1]] - logz[t] for t in range(len(seq) - 1) if mask[t + 1])
            np.testing.assert_allclose(float(lp_BGK[b, g, k]), want, rtol=1e-4, atol=1e-4)
            assert int(n_BGK[b, g, k]) == mask[1:].sum() > 0


def _mean_loss(d, policy, frozen, batch):
    objective = dpo.dpo_objective(CFG.model, d)

    def f(p):
        loss_sum, metrics = objective.loss({"policy": p}, frozen, batch)
        return loss_sum / objective.count(batch), metrics

    return jax.value_and_grad(f, has_aux=True)(policy)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_equals_alone_and_a_precomputed_reference_equals_the_frozen_one(policy, reference, groups, loss_type):
    d = dataclasses.replace(CFG.dpo, loss_type=loss_type, average_log_prob=loss_type == "ipo")
    fn = jax.jit(lambda b: dpo.pair_log_probs(CFG.model, reference, b)[0])
    ref_values = [np.asarray(fn(_batch([g], 1)))[0, 0] for g in groups]  # each pair alone
    with_ref = [dict(g, ref_logp=list(map(float, v))) for g, v in zip(groups, ref_values)]
    (l1, m1), g1 = _mean_loss(d, policy, {"reference": reference}, _batch(groups, per_row=1))
    (l2, m2), g2 = _mean_loss(d, policy, {"reference": reference}, _batch(groups, per_row=4))
    (l3, m3), g3 = _mean_loss(d, policy, {}, _batch(with_ref, per_row=4))
    for loss, grads in ((l2, g2), (l3, g3)):
        np.testing.assert_allclose(float(loss), float(l1), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(m1["loss"][1]) == float(m3["loss"][1]) == len(groups)


def test_at_the_start_the_loss_is_log_2(policy, groups):
    (loss, metrics), _ = _mean_loss(dataclasses.replace(CFG.dpo, sft_coef=0.0), policy, {"reference": policy},
                                    _batch(groups, 4))
    np.testing.assert_allclose(float(loss), np.log(2), rtol=1e-6)
    assert float(metrics["rewards/accuracy"][0]) == 0.0


def test_only_the_policy_learns_and_sharded_equals_one_device(tmp_path, groups, reference):
    ref_run = write_run(tmp_path / "ref", CFG, reference, step=2)
    batch = {k: np.asarray(v)[None] for k, v in _batch(groups, per_row=2, rows=8).items()}
    out = {}
    for name, devices, mesh in (("one", jax.devices()[:1], dict(fsdp=1)), ("eight", None, dict(fsdp=4, tensor=2))):
        cfg = dataclasses.replace(CFG, mesh=dataclasses.replace(CFG.mesh, rules="fsdp_tp", **mesh),
                                  dpo=dataclasses.replace(CFG.dpo, reference_from=str(ref_run)))
        roles = dpo.dpo_roles(cfg)
        assert [r.name for r in roles] == ["policy", "reference"] and not roles[1].trained
        c = compile_stage(cfg, roles, dpo.dpo_objective(cfg.model, cfg.dpo), devices=devices)
        state = c.init_state(jax.random.key(0))
        frozen = {"reference": role_params(roles[1], jax.random.key(0), c.mesh, cfg.mesh.rules)[0]}
        before = jax.device_get(frozen)
        state, o = c.train_step(state, frozen, sharding.put_batch(c.mesh, batch, leading=1))
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), before)  # the reference is untouched
        out[name] = jax.device_get((state["params"], o))
    (p1, o1), (p8, o8) = out["one"], out["eight"]
    assert set(p1) == {"policy"}
    np.testing.assert_allclose(o8["metrics"]["loss"][0], o1["metrics"]["loss"][0], rtol=1e-5)
    np.testing.assert_allclose(o8["grad_norm"], o1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_a_tiny_policy_learns_a_planted_preference(tmp_path, precompute):
    """Chosen responses carry a marker word; after a few steps the policy prefers them."""
    rng = np.random.default_rng(5)
    words = lambda k: " ".join("".join(rng.choice(list("abcdefgh"), 3)) for _ in range(k))
    lines = []
    for _ in range(600):
        good = words(2).split()
        good.insert(int(rng.integers(0, 3)), "zebra")
        lines.append(json.dumps({"prompt": words(2), "chosen": " ".join(good), "rejected": words(3)}))
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(model=dict(max_seq_len=T), data=dict(heldout_fraction=0.1), sft=dict(template="Q: {prompt}\nA: "),
                      train=dict(seq_len=T, batch_size=16, steps=40, run_dir=str(tmp_path / "dpo"), eval_every=40,
                                 save_every=20, log_every=1),
                      optim=dict(lr=3e-3, warmup_steps=5),
                      dpo=dict(train_files=[str(tmp_path / "prefs.jsonl")], beta=0.5, precompute_reference=precompute))
    summary = dpo.main(cfg)
    rows = [r for r in runs.read_metrics(tmp_path / "dpo") if "rewards/accuracy" in r and "event" not in r]
    assert rows[0]["rewards/accuracy"] < 0.5 < 0.9 < summary["eval_rewards/accuracy"], summary
    assert (tmp_path / "dpo" / dpo.REFERENCE_FILE).is_file() == precompute


def test_sampled_rejections_pair_the_right_answer_with_each_distinct_wrong_one():
    problems = tasks.mixed(["add", "sort"], "train", 2, seed=3)
    right = [p["answer"] for p in problems]
    samples = [[right[0], " 7", "7", "8"], [right[1]] * 3, ["", right[2] + " "], ["x", "x"]]
    records = tasks.sampled_preference_records(problems, samples)
    miss = records[2]["rejected"]  # an always-right problem: its right answer against a near miss
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [
        (chat.instruction_prompt(problems[0]), right[0], "7"), (chat.instruction_prompt(problems[0]), right[0], "8"),
        (chat.instruction_prompt(problems[1]), right[1], miss), (chat.instruction_prompt(problems[2]), right[2], ""),
        (chat.instruction_prompt(problems[3]), right[3], "x")]  # " 7" is "7", "x" once
    assert miss != right[1] and not tasks.check(problems[1], miss)


def test_sampled_rejections_come_from_the_init_run_and_are_kept_with_the_run(tmp_path, policy, monkeypatch):
    """A tiny random model answers wrong: its samples become the rejected answers; a rerun reads
    them back instead of sampling, and another sampling setting samples afresh."""
    init = write_run(tmp_path / "sft", CFG, policy, step=2)
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, init_from=str(init),
                                                             run_dir=str(tmp_path / "dpo")),
                              sft=dataclasses.replace(CFG.sft, template="Q: {prompt}\nA: ", max_new_tokens=4),
                              dpo=dataclasses.replace(CFG.dpo, tasks=("add", "recall"), task_rejected="sampled",
                                                      task_pairs=3, task_eval_pairs=2, task_samples=2))
    train, test = dpo.sampled_task_records(cfg)
    assert len(train) >= 6 and len(test) >= 4  # 3 (2) problems a task, a distinct wrong answer or two each
    assert all(not tasks.check({"task": r["task"], "answer": r["chosen"]}, r["rejected"]) for r in train + test)
    monkeypatch.setattr(dpo, "generate_texts", lambda model, params, tok, prompts, **kw: [{"completion": "zz"}]
                        * len(prompts))  # a stand-in sampler: what is sampled afresh answers "zz"
    assert dpo.sampled_task_records(cfg) == (train, test)  # read back, not sampled again
    (tmp_path / "hot").mkdir()  # a run of another temperature, handed the first run's samples
    shutil.copy(tmp_path / "dpo" / dpo.SAMPLES_FILE, tmp_path / "hot")
    hotter = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, task_temperature=2.0),
                                 train=dataclasses.replace(cfg.train, run_dir=str(tmp_path / "hot")))
    train, test = dpo.sampled_task_records(hotter)
    assert {r["rejected"] for r in train + test} == {"zz"} and (len(train), len(test)) == (6, 4)
