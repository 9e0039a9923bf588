"""Rejection sampling: best-of-N's rule, keeping the best over rounds, a round's samples.jsonl the
same resumed after a kill, alone or in a batch; the kept set is what SFT trains on; the checker and
a reward model score the same samples interchangeably; two rounds end to end, skipped on restart."""
import dataclasses
import json

import numpy as np
import pytest

from jaxlm import runs
from jaxlm.config import ConfigError
from jaxlm.data import tasks
from jaxlm.data.examples import chat, preference
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.testing import random_params, tiny_config, write_run
from jaxlm.train import rejection, reward, sft

T = 64
CFG = tiny_config(model=dict(max_seq_len=T), train=dict(seq_len=T, batch_size=8, steps=4, save_every=4, eval_every=4),
                  optim=dict(lr=1e-3, warmup_steps=0), sft=dict(template="Q: {prompt}\nA: "),
                  rs=dict(tasks=["add", "recall"], task_prompts=3, samples_per_prompt=3, checker=True,
                          min_score=0.0, max_new_tokens=4, prompts_per_batch=2))


def _cfg(tmp_path, **rs):
    return dataclasses.replace(CFG, rs=dataclasses.replace(CFG.rs, **rs),
                               train=dataclasses.replace(CFG.train, run_dir=str(tmp_path / "rs"),
                                                         init_from=str(tmp_path / "sft")))


@pytest.fixture(scope="module")
def init_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("init") / "sft", CFG, random_params(CFG.model, 0, scale=0.3), step=2)


def test_best_of_takes_the_highest_score_then_the_highest_log_prob_then_the_first():
    assert rejection.best_of([0.0, 1.0, 1.0, 0.5], [-1.0, -3.0, -2.0, 0.0]) == 2
    assert rejection.best_of([1.0, 1.0], [-2.0, -2.0]) == 0
    assert rejection.worst_of([0.0, 1.0, 0.0], [-1.0, -3.0, -2.0]) == 2


def test_the_best_over_rounds_is_kept_if_it_scores_enough_and_best_against_worst_is_a_pair():
    row = lambda i, samples: {"id": i, "prompt": {"prompt": f"p{i}", "task": "add", "answer": "1"},
                              "samples": [{"text": t, "score": s, "logprob": lp} for t, s, lp in samples]}
    first = [row(0, [("a", 0.0, -1.0), ("b", 0.0, -2.0)]), row(1, [("c", 1.0, -5.0), ("d", 0.0, -1.0)])]
    second = [row(0, [("e", 1.0, -9.0), ("f", 0.0, -0.5)]), row(1, [("g", 1.0, -1.0), ("h", 1.0, -7.0)])]
    kept, pairs = rejection.keep([first], min_score=0.5)
    assert [(k["instruction"], k["output"]) for k in kept] == [("p1", "c")]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("p1", "c", "d")]
    kept, pairs = rejection.keep([first, second], min_score=0.5)
    assert [(k["instruction"], k["output"], k["task"]) for k in kept] == [("p0", "e", "add"), ("p1", "g", "add")]
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [("e", "b", 1.0), ("g", "d", 1.0)]


def test_a_round_resumed_after_a_kill_or_sampled_a_prompt_at_a_time_writes_the_same_samples(tmp_path, init_run):
    cfg = _cfg(tmp_path)
    prompts, _ = rejection.load_prompts(cfg)
    scorer = rejection.Scorer(cfg)
    out = {}
    for name, per_batch in (("whole", 2), ("alone", 1)):
        (tmp_path / name).mkdir()
        c = dataclasses.replace(cfg, rs=dataclasses.replace(cfg.rs, prompts_per_batch=per_batch))
        rejection.sample_round(c, tmp_path / name, str(init_run), prompts, scorer, 0)
        out[name] = (tmp_path / name / rejection.SAMPLES).read_text()
    lines = out["whole"].splitlines(keepends=True)
    assert len(lines) == len(prompts) == 6
    texts = lambda text: [[(s["text"], s["score"]) for s in json.loads(line)["samples"]] for line in text.splitlines()]
    logprobs = lambda text: [[s["logprob"] for s in json.loads(line)["samples"]] for line in text.splitlines()]
    assert texts(out["alone"]) == texts(out["whole"])  # the same draws; log-probs to float rounding
    np.testing.assert_allclose(logprobs(out["alone"]), logprobs(out["whole"]), rtol=1e-5)
    (tmp_path / "killed").mkdir()  # two prompts written, the third cut short by the kill
    (tmp_path / "killed" / rejection.SAMPLES).write_text("".join(lines[:2]) + lines[2][:25])
    rows = rejection.sample_round(cfg, tmp_path / "killed", str(init_run), prompts, scorer, 0)
    assert (tmp_path / "killed" / rejection.SAMPLES).read_text() == out["whole"]
    assert [r["id"] for r in rows] == [p["id"] for p in prompts]
    for row in rows:
        assert [s["score"] for s in row["samples"]] == [float(tasks.check(row["prompt"], s["text"]))
                                                        for s in row["samples"]]


def test_the_kept_set_is_what_sft_trains_on(tmp_path, init_run):
    cfg = _cfg(tmp_path)
    prompts, _ = rejection.load_prompts(cfg)
    (tmp_path / "r").mkdir()
    rows = rejection.sample_round(cfg, tmp_path / "r", str(init_run), prompts, rejection.Scorer(cfg), 0)
    kept, _ = rejection.keep([rows], min_score=0.0)
    rejection._write_jsonl(tmp_path / "r" / rejection.KEPT, kept)
    sft_cfg = rejection._round_sft_config(cfg, tmp_path / "r", str(init_run))
    train, evals, _ = sft.load_examples(sft_cfg, ByteTokenizer())
    examples = train + evals
    trained = sorted(ByteTokenizer().decode(np.asarray(e["targets"])[np.asarray(e["loss_mask"]) > 0][:-1].tolist())
                     for e in examples)  # the response tokens, less the closing eos
    best = sorted(k["output"] for k in kept)
    assert len(examples) == len(kept) == len(prompts) and trained == best, (trained, best)


def test_a_reward_model_scores_the_samples_as_the_checker_does_their_shape(tmp_path, init_run):
    """Each sample gets its reward under the reward run, the same as scoring the group directly."""
    reward_cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, value_head=True))
    reward_run = write_run(tmp_path / "rm", reward_cfg, random_params(reward_cfg.model, 3), step=1, role="reward")
    cfg = _cfg(tmp_path, checker=False, reward_run=str(reward_run))
    prompts, _ = rejection.load_prompts(cfg)
    texts = [["12", "12", "7"], ["a", "b", "c"]]
    scores = rejection.Scorer(cfg)(prompts[:2], texts)
    check = rejection.Scorer(_cfg(tmp_path))(prompts[:2], texts)
    assert [len(s) for s in scores] == [len(s) for s in check] == [3, 3]
    assert scores[0][0] == pytest.approx(scores[0][1]) and np.isfinite(scores).all()
    loaded = runs.load_run(reward_run)
    r = chat.Renderer.from_tokenizer(loaded.tokenizer, loaded.cfg.sft.template)
    group = preference.to_group(r, {"prompt": prompts[1]["prompt"], "responses": texts[1]}, T, "trim_context", {},
                                max_responses=3, min_responses=1)
    direct = reward.score_groups(loaded.cfg, loaded.params, [group], mesh=loaded.mesh)[0]
    np.testing.assert_allclose(scores[1], direct, rtol=1e-5)


@pytest.mark.slow
def test_two_rounds_end_to_end_and_a_finished_round_is_skipped(tmp_path, init_run, monkeypatch):
    cfg = dataclasses.replace(_cfg(tmp_path, rounds=2),
                              train=dataclasses.replace(_cfg(tmp_path).train, init_from=str(init_run)))
    summary = rejection.main(cfg, log=lambda line: None)
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["rounds"][1]["sampled_from"] == str(tmp_path / "rs" / "round_0" / "sft")
    for i in range(2):
        kept = [json.loads(line) for line in (tmp_path / "rs" / f"round_{i}" / rejection.KEPT).open()]
        assert len(kept) == 6 and set(summary["rounds"][i]["accuracy"]) == {"add", "recall"}
    monkeypatch.setattr(rejection, "sample_round", lambda *a, **k: pytest.fail("a finished round sampled again"))
    assert rejection.main(cfg, log=lambda line: None) == summary


def test_unusable_prompt_records_are_counted_and_skipped(tmp_path):
    lines = ['{"prompt": "Say hi."}', '{"prompt": "  "}', "not json", '{"text": "no prompt"}',
             json.dumps({"prompt": [{"role": "user", "content": "Hi?"}], "source": "chat"}),
             json.dumps({"prompt": [{"role": "wizard", "content": "?"}]})]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, tasks=(), prompt_files=(str(tmp_path / "prompts.jsonl"),), checker=False, reward_run="rm")
    prompts, counts = rejection.load_prompts(cfg)
    assert [p["prompt"] for p in prompts] == ["Say hi.", [{"role": "user", "content": "Hi?"}]]
    assert prompts[1]["source"] == "chat" and len({p["id"] for p in prompts}) == 2
    assert counts == {"records": 6, "used": 2, "empty_prompt": 1, "malformed_json": 1, "missing_field": 1,
                      "bad_chat_prompt": 1}, counts
    checked = dataclasses.replace(cfg, rs=dataclasses.replace(cfg.rs, checker=True, reward_run=""))
    with pytest.raises(ConfigError, match="rs needs prompts.*not_checkable"):
        rejection.load_prompts(checked)
    with pytest.raises(ConfigError, match="rs needs a scorer"):
        rejection.Scorer(dataclasses.replace(cfg, rs=dataclasses.replace(cfg.rs, reward_run="")))
