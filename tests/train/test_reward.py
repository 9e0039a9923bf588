"""The reward stage: the reward is read at each response's last token (padding and neighbours change
nothing), packed == one group per row, sharded == unsharded, bad records counted, the built-in
near misses are wrong answers, and a tiny reward model learns a planted preference."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import cli, runs, sharding
from jaxlm.config import ConfigError
from jaxlm.data import readers, tasks
from jaxlm.data.examples import chat, preference
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.testing import random_params, tiny_config
from jaxlm.train import reward
from jaxlm.train.state import compile_stage

TOK = ByteTokenizer()
T = 64
CFG = tiny_config(model=dict(max_seq_len=T, value_head=True), train=dict(seq_len=T, batch_size=8),
                  optim=dict(lr=1e-2, warmup_steps=0, decay="constant"))
R = chat.Renderer.from_tokenizer(TOK, "Q: {prompt}\nA: ")
MARGINS = CFG.reward.margins


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join("".join(rng.choice(list("abcdefgh"), 3)) for _ in range(k))
    out = []
    for i in range(n):
        k = int(rng.integers(2, 4))
        if i % 3 == 0:
            out.append({"prompt": words(2), "responses": [words(2) for _ in range(k)]})
        else:
            out.append({"prompt": words(int(rng.integers(1, 4))), "chosen": words(2), "rejected": words(1),
                        "margin": float(rng.uniform(0, 1))})
    return out


@pytest.fixture(scope="module")
def groups():
    out, counts = preference.to_groups(R, _records(10), T, "trim_context", MARGINS, 4)
    assert counts["used"] == 10
    return out


@pytest.fixture(scope="module")
def params():
    return random_params(CFG.model, 0, scale=0.2, norm_scale=0.2)


def _batch(groups, per_row, rows=None):
    packed, _ = preference.pack_groups(groups, T, 0, groups_per_row=per_row, max_responses=4)
    if rows is not None:  # fixed row count: padding rows
        pad = rows - len(packed["tokens"])
        packed = {k: np.concatenate([v, np.full((pad, *v.shape[1:]), -1 if k in ("ends", "index") else 0, v.dtype)])
                  for k, v in packed.items()}
    return {k: jnp.asarray(v) for k, v in packed.items() if k != "index"}, packed["index"]


def _rewards_by_group(params, groups, per_row, rows=None):
    batch, index = _batch(groups, per_row, rows)
    r, valid = reward.group_rewards(CFG.model, params, batch)
    out = {}
    for b, g in zip(*np.nonzero(index >= 0)):
        out[int(index[b, g])] = np.asarray(r[b, g])[np.asarray(valid[b, g])]
    return out


def test_the_reward_is_read_at_each_response_last_token(params, groups):
    alone = _rewards_by_group(params, groups, per_row=1)  # each group alone, padding after it
    packed = _rewards_by_group(params, groups, per_row=8)  # several groups to a row
    more_rows = _rewards_by_group(params, groups, per_row=1, rows=16)  # and whole rows of padding
    for i, g in enumerate(groups):
        assert len(alone[i]) == len(g["sequences"])
        np.testing.assert_allclose(packed[i], alone[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(more_rows[i], alone[i], rtol=1e-6, atol=1e-6)
    # the reward of a sequence is the value at its last token, computed on the sequence alone
    from jaxlm import model

    seq = groups[0]["sequences"][0]
    values = model.apply(CFG.model, params, jnp.asarray(seq)[None], head="value")
    np.testing.assert_allclose(alone[0][0], float(values[0, -1]), rtol=1e-5, atol=1e-5)


def test_packed_loss_and_gradients_equal_one_group_per_row(params, groups):
    objective = reward.reward_objective(CFG.model, center_coef=0.01)

    def mean_loss(p, batch):
        loss_sum, metrics = objective.loss({"reward": p}, {}, batch)
        return loss_sum / objective.count(batch), metrics

    results = []
    for per_row in (1, 8):
        batch, _ = _batch(groups, per_row)
        (loss, metrics), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, batch)
        results.append((float(loss), float(metrics["accuracy"][0]), grads))
        assert float(objective.count(batch)) == len(groups)
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    assert results[0][1] == results[1][1]
    for a, b in zip(jax.tree.leaves(results[0][2]), jax.tree.leaves(results[1][2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_sharded_step_equals_one_device(groups):
    batch, _ = _batch(groups, per_row=2, rows=16)
    batch = {k: np.asarray(v)[None] for k, v in batch.items()}  # one micro-batch
    out = {}
    for name, devices, mesh in (("one", jax.devices()[:1], dict(fsdp=1)), ("eight", None, dict(fsdp=4, tensor=2))):
        cfg = tiny_config(model=dict(max_seq_len=T), train=dict(seq_len=T, batch_size=16),
                          mesh=dict(mesh, rules="fsdp_tp"),
                          # Adam's eps well above float noise: its first step is then smooth in the gradient,
                          # not sign(g), which would turn round-off in near-zero entries into 1e-2 moves
                          optim=dict(lr=1e-2, warmup_steps=0, decay="constant", eps=1e-4))
        c = compile_stage(cfg, reward.reward_role(cfg), reward.reward_objective(cfg.model), devices=devices)
        state = c.init_state(jax.random.key(0))
        state, o = c.train_step(state, {}, sharding.put_batch(c.mesh, batch, leading=1))
        out[name] = jax.device_get((state["params"], o))
    (p1, o1), (p8, o8) = out["one"], out["eight"]
    np.testing.assert_allclose(o8["metrics"]["loss"][0], o1["metrics"]["loss"][0], rtol=1e-5)
    np.testing.assert_allclose(o8["grad_norm"], o1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_bad_preference_records_are_counted_and_skipped():
    records = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "grade": "better"},
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        {"prompt": "q", "responses": ["only one"]},
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "grade": "much_better"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"},
        {"prompt": "x" * 500, "chosen": "a" * 20, "rejected": "b" * 20},  # the prompt is cut from the left
        {"prompt": "q", "chosen": "a" * 70, "rejected": "b"},  # the response alone does not fit
        {"prompt": [{"role": "user", "content": "hi"}], "responses": ["a", "b", "c"]},
        {"prompt": "q", "responses": ["a", "b", "c", "d", "e"]},
        {"text": "not a preference"},
        readers.Unreadable("malformed_json"),
        "malformed_json",  # a line holding a JSON string: a record of unknown format
    ]
    groups, counts = preference.to_groups(R, records, T, "trim_context", MARGINS, 4)
    assert counts == {"records": 13, "used": 3, "identical_responses": 1, "too_few_responses": 1, "missing_field": 1,
                      "unknown_grade": 1, "bad_margin": 1, "too_long": 1, "too_many_responses": 1,
                      "unknown_format": 2, "malformed_json": 1}
    assert groups[0]["margin"] == pytest.approx(2 / 3)
    assert sum(len(s) for s in groups[1]["sequences"]) <= T  # cut to fit, both responses whole
    assert TOK.decode(groups[1]["sequences"][0]).endswith("a" * 20)
    roles = TOK.special_ids.roles
    assert [int(t) for t in groups[2]["sequences"][0] if t in roles.values()][-1] == roles["end_turn"]


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_near_misses_are_wrong_and_a_worse_miss_is_further(name):
    rng = np.random.default_rng(0)
    for ex in tasks.examples(name, "train", 200, seed=3):
        one, two = tasks.near_miss(ex, 1, rng), tasks.near_miss(ex, 2, rng)
        for miss in (one, two):
            assert miss is None or (miss != ex["answer"] and not tasks.check(ex, miss))
        if name in ("add", "reverse", "sort") and one is not None:
            items = str.split if name == "sort" else list
            a, b = items(ex["answer"]), items(one)
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 2
    records = tasks.preference_records([name], "train", 100, seed=1)
    assert len(records) >= 90 and all(r["task"] == name for r in records)


@pytest.mark.slow
def test_a_tiny_reward_model_learns_a_planted_preference_and_scores_a_file(tmp_path, capsys):
    """Chosen responses carry a marker word; rejected ones do not."""
    rng = np.random.default_rng(5)
    words = lambda k: " ".join("".join(rng.choice(list("abcdefgh"), 3)) for _ in range(k))
    lines = []
    for i in range(1200):
        good, bad = words(3).split(), words(3)
        good.insert(int(rng.integers(0, 4)), "zebra")
        lines.append(json.dumps({"prompt": words(2), "chosen": " ".join(good), "rejected": bad}))
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(model=dict(max_seq_len=T), data=dict(heldout_fraction=0.1), sft=dict(template="Q: {prompt}\nA: "),
                      train=dict(seq_len=T, batch_size=16, steps=120, run_dir=str(tmp_path / "rm"), eval_every=120,
                                 save_every=60, log_every=20),
                      optim=dict(lr=3e-3, warmup_steps=10), reward=dict(train_files=[str(tmp_path / "prefs.jsonl")]))
    summary = reward.main(cfg)
    assert summary["heldout_accuracy"]["all"] > 0.95, summary["heldout_accuracy"]
    heldout = json.loads((tmp_path / "rm" / reward.HELDOUT_FILE).read_text())
    assert heldout["accuracy"] == summary["heldout_accuracy"]
    assert np.mean([g["rewards"][0] > g["rewards"][1] for g in heldout["groups"]]) == heldout["accuracy"]["all"]
    stats = json.loads((tmp_path / "rm" / reward.STATS_FILE).read_text())
    assert stats["responses"] > 0 and stats["std"] > 0
    # `jaxlm score`: the run's rewards for records it never saw, normalised by its statistics
    (tmp_path / "new.jsonl").write_text(json.dumps({"prompt": "abc def", "responses": ["zebra abc", "abc ghd"]})
                                        + "\n" + json.dumps({"prompt": "abc", "response": "hah zebra"}) + "\n")
    assert cli.main(["score", str(tmp_path / "rm"), str(tmp_path / "new.jsonl"), "--normalize",
                     "--out", str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert scored[0]["rewards"][0] > scored[0]["rewards"][1] and len(scored[1]["rewards"]) == 1
    assert "scored 2 of 2 records; normalised 3 rewards" in capsys.readouterr().err
    assert runs.load_run(tmp_path / "rm").role == "reward"


def test_no_data_is_one_line():
    with pytest.raises(ConfigError, match="reward needs data"):
        reward.load_groups(CFG, TOK)
