"""Evaluation: scoring windows by hand, perplexity against a direct sum and a uniform model,
sharded == unsharded, exact match against an argmax loop; `jaxlm eval` and `jaxlm generate` on a
run directory (config.yaml + an Orbax checkpoint)."""
import dataclasses
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import cli, evaluate, model, runs, sharding
from jaxlm.config import ConfigError, MeshConfig, ModelConfig, load_config
from jaxlm.data.examples import chat
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.runs import read_metrics
from jaxlm.testing import BYTE, ODD, random_params, write_run

CFG = ODD
EOS = 2


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, 0, norm_scale=0.25)


def _docs(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CFG.vocab_size, n).astype(np.int32) for n in lengths]


def test_document_windows_by_hand():
    w = evaluate.document_windows([np.array([10, 11, 12]), np.array([13, EOS]), np.array([], np.int32)],
                                  seq_len=2, eos_id=EOS)
    np.testing.assert_array_equal(w["tokens"], [[2, 10], [11, 12], [2, 13], [2, 0]])
    np.testing.assert_array_equal(w["targets"], [[10, 11], [12, 2], [13, 2], [2, 0]])
    np.testing.assert_array_equal(w["loss_mask"], [[1, 1], [1, 1], [1, 1], [1, 0]])


_forward = jax.jit(lambda p, tokens: jax.nn.log_softmax(model.apply(CFG, p, tokens)))


def _log_probs(params, seq):
    """Log-probs [len(seq), V] by one causal forward over a fixed-width row (one compile)."""
    buf = np.zeros((1, 24), np.int32)
    buf[0, :len(seq)] = seq
    return np.asarray(_forward(params, buf))[0, :len(seq)]


def _direct_nll(params, doc):
    """-log p(doc + eos | eos) by one forward over the whole document."""
    seq = np.concatenate([[EOS], doc, [EOS]]).astype(np.int32)
    return -float(np.take_along_axis(_log_probs(params, seq[:-1]), seq[1:, None], -1).sum())


def test_perplexity_equals_a_direct_sum_for_any_batch_size(params):
    docs = _docs([5, 13, 1, 9, 15])  # each fits one 16-token window
    nll = sum(_direct_nll(params, d) for d in docs)
    tokens = sum(len(d) + 1 for d in docs)
    for batch_size in (1, 4):
        r = evaluate.perplexity(CFG, params, docs, n_bytes=100, seq_len=16, eos_id=EOS, batch_size=batch_size)
        assert r["tokens"] == tokens and r["documents"] == 5 and r["bytes"] == 100
        np.testing.assert_allclose(r["nats_per_token"], nll / tokens, rtol=1e-5)
        np.testing.assert_allclose(r["perplexity"], math.exp(nll / tokens), rtol=1e-5)
        np.testing.assert_allclose(r["bits_per_byte"], nll / math.log(2) / 100, rtol=1e-5)


def test_a_uniform_model_scores_log_vocab(params):
    flat = dict(params, lm_head=jnp.zeros_like(params["lm_head"]))  # every logit 0
    docs = _docs([7, 30])
    r = evaluate.perplexity(CFG, flat, docs, n_bytes=37, seq_len=16, eos_id=EOS, batch_size=2)
    assert r["tokens"] == 39
    np.testing.assert_allclose(r["nats_per_token"], math.log(37), rtol=1e-6)
    np.testing.assert_allclose(r["perplexity"], 37, rtol=1e-5)
    np.testing.assert_allclose(r["bits_per_byte"], 39 * math.log2(37) / 37, rtol=1e-6)


def test_sharded_perplexity_equals_unsharded(params):
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    docs = _docs([20, 3, 40, 11, 8])
    plain = evaluate.perplexity(CFG, params, docs, 50, seq_len=16, eos_id=EOS, batch_size=8)
    sharded = evaluate.perplexity(CFG, params, docs, 50, seq_len=16, eos_id=EOS, batch_size=8, mesh=mesh)
    assert sharded["tokens"] == plain["tokens"] == 87
    np.testing.assert_allclose(sharded["nats_per_token"], plain["nats_per_token"], rtol=1e-5)


class _LetterTokenizer:
    """ids 3..36 <-> letters; 0, 1, 2 are pad, bos, eos (dropped when decoding)."""

    name = "letters"
    eos_id = EOS
    special_ids = types.SimpleNamespace(roles={})

    def encode(self, text):
        return np.array([ord(c) - ord("A") + 3 for c in text], np.int32)

    def decode(self, ids):
        return "".join(chr(int(i) - 3 + ord("A")) for i in ids if 3 <= int(i) < 37)


def _greedy_reference(params, prompt, n_new):
    """Argmax loop without a cache, to eos or n_new tokens; the text before eos."""
    seq = list(prompt)
    for _ in range(n_new):
        nxt = int(np.argmax(_log_probs(params, seq)[-1]))
        if nxt == EOS:
            break
        seq.append(nxt)
    return _LetterTokenizer().decode(seq[len(prompt):])


def test_exact_match_with_string_and_callable_checkers(params):
    tok = _LetterTokenizer()
    prompts = ["ABC", "HELLO", "Q"]
    expected = [_greedy_reference(params, tok.encode(p), 6) for p in prompts]
    pairs = [(prompts[0], f"  {expected[0]}\n"), (prompts[1], expected[1] + "X"),
             (tok.encode(prompts[2]), lambda c: c == expected[2])]
    r = evaluate.exact_match(CFG, params, tok, pairs, max_new_tokens=6, batch_size=2)
    assert r["completions"] == expected
    assert (r["correct"], r["total"]) == (2, 3)
    assert r["exact_match"] == pytest.approx(2 / 3)


# --- the commands on a run directory ------------------------------------------------------------

RUN_MODEL = ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=48, max_seq_len=96, dtype="float32")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as training leaves it: config.yaml and a checkpoint (random params)."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["data.source=stdlib", "data.tokenizer=byte", "data.max_documents=40",
                             "data.heldout_fraction=0.1", "train.seq_len=32", f"train.run_dir={run}",
                             "optim.warmup_steps=0"])
    cfg = dataclasses.replace(cfg, model=RUN_MODEL)
    return write_run(run, cfg, random_params(RUN_MODEL, 3, scale=0.1, norm_scale=0.1), step=7)


def test_eval_command_scores_files_and_heldout_and_logs_metrics(run_dir, tmp_path, capsys):
    text = tmp_path / "docs.jsonl"
    texts = ["def f(x):\n    return x + 1\n", "héllo wörld"]
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert cli.main(["eval", str(run_dir), "--text", str(text), "--heldout", "--max-documents", "3",
                     "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 7" in out and "bits_per_byte" in out and "docs.jsonl" in out and "heldout" in out
    row = [r for r in read_metrics(run_dir) if "event" not in r][-1]
    assert row["step"] == 7
    # the file's numbers equal `perplexity` on the same documents (8 fake devices, fsdp)
    params = runs.load_run(run_dir).params
    tok = ByteTokenizer()
    ref = evaluate.perplexity(RUN_MODEL, params, [tok.encode(t) for t in texts],
                              sum(len(t.encode()) for t in texts), seq_len=32, eos_id=tok.eos_id)
    assert row["eval/docs.jsonl/tokens"] == ref["tokens"] == sum(len(t.encode()) + 1 for t in texts)
    np.testing.assert_allclose(row["eval/docs.jsonl/bits_per_byte"], ref["bits_per_byte"], rtol=1e-5)
    assert row["eval/heldout/documents"] == 3 and row["eval/heldout/bits_per_byte"] > 0


def test_generate_command_streams_one_prompt_and_writes_jsonl_for_many(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "import ", "id": 1}) + "\n"
                       + json.dumps({"prefix": "def f(", "suffix": "):\n"}) + "\n")
    out_path = tmp_path / "out.jsonl"
    common = ["--max-new-tokens", "12", "--batch-size", "2"]
    assert cli.main(["generate", str(run_dir), "--prompts", str(prompts), "--out", str(out_path)] + common) == 0
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [1, None] and rows[1]["prefix"] == "def f("
    for r in rows:
        assert 1 <= r["new_tokens"] <= 12 and r["logprob"] < 0 and isinstance(r["completion"], str)
    said = capsys.readouterr()
    assert said.out == "" and f"[2 prompts, {sum(r['new_tokens'] for r in rows)} new tokens in " in said.err
    assert f"written to {out_path}]" in said.err
    assert cli.main(["generate", str(run_dir), "--prompt", "import "] + common) == 0
    # greedy: the streamed text is the prompt, then the same completion as in the batch
    assert capsys.readouterr().out == "import " + rows[0]["completion"] + "\n"


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "{missing}", "--prompt", "x"], "has no config.yaml"),
    (["eval", "{run}", "--text", "{missing}/nope.txt"], "nope.txt"),
    (["generate", "{run}", "--prompt", "x", "--max-new-tokens", "500"], "max_seq_len"),
    (["generate", "{run}", "--prompts", "{bad}"], "needs a string"),
])
def test_command_mistakes_are_one_line_errors(run_dir, tmp_path, capsys, argv, fragment):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    argv = [a.format(run=run_dir, missing=tmp_path / "missing", bad=bad) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"jaxlm {argv[0]}: error: ") and fragment in err[0], err


# --- question/answer files: prompted as the run was fine-tuned -----------------------------------

TEMPLATE = "Q: {prompt}\nA: "
CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"}, {"role": "user", "content": "2+2?"}]
GOOD = [{"prompt": "Add: 12 + 30", "answer": "42"}, {"messages": CHAT, "answer": "4"}]
BAD = ["{oops", json.dumps({"prompt": "x"}), json.dumps({"prompt": "x", "messages": CHAT, "answer": "4"}),
       json.dumps({"messages": CHAT[:3], "answer": "4"}), json.dumps([1, 2]),
       json.dumps({"messages": [{"role": "robot", "content": "q"}], "answer": "4"}),
       json.dumps({"prompt": " ", "answer": "4"})]


@pytest.fixture(scope="module")
def sft_run_dir(tmp_path_factory, run_dir):
    """`run_dir`'s model as a `jaxlm sft` run leaves it: its config names sft data and a template."""
    cfg = runs.run_config(run_dir)
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, tasks=("add",), template=TEMPLATE))
    return write_run(tmp_path_factory.mktemp("sft") / "run", cfg, runs.load_run(run_dir).params, step=9)


def _qa_file(path, records, bad=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in bad))
    return path


@pytest.fixture
def fed(monkeypatch):
    """What `jaxlm eval --qa` hands the sampler: each call's prompt ids, answers and stop tokens
    (the sampler answers every pair right but the first)."""
    calls = []

    def fake_exact_match(cfg, params, tokenizer, pairs, **kwargs):
        calls.append({"prompts": [np.asarray(p).tolist() for p, _ in pairs], "answers": [a for _, a in pairs],
                      "stops": kwargs["stop_tokens"]})
        hits = [i > 0 for i in range(len(pairs))]
        return {"exact_match": sum(hits) / len(pairs), "correct": sum(hits), "total": len(pairs),
                "completions": [a for _, a in pairs], "hits": hits}

    monkeypatch.setattr("jaxlm.evaluate.exact_match", fake_exact_match)
    return calls


def test_qa_prompts_are_what_sft_trains_on_and_raw_text_with_raw(sft_run_dir, tmp_path, fed, capsys):
    qa = _qa_file(tmp_path / "qa.jsonl", GOOD)
    assert cli.main(["eval", str(sft_run_dir), "--qa", str(qa)]) == 0
    tok = ByteTokenizer()
    # sft's own rendering of the same records with their answers: eval's prompt is the training
    # sequence up to where the last response starts, and the rest is the answer and its closing id
    r = chat.Renderer.from_tokenizer(tok, TEMPLATE)
    trained, _ = chat.render_all(r, [{"instruction": GOOD[0]["prompt"], "output": "42"},
                                     {"messages": CHAT + [{"role": "assistant", "content": "4"}]}], 96)
    closing = [tok.eos_id, tok.special_ids.roles["end_turn"]]
    for prompt, ex, answer, stop in zip(fed[0]["prompts"], trained, ["42", "4"], closing):
        seq = np.append(ex["tokens"], ex["targets"][-1])
        assert seq[:len(prompt)].tolist() == prompt
        assert seq[len(prompt):].tolist() == [*tok.encode(answer).tolist(), stop]
        assert ex["loss_mask"][len(prompt) - 1:].all() and not ex["loss_mask"][len(prompt) - 2]
    assert tok.decode(fed[0]["prompts"][0]) == "Q: Add: 12 + 30\nA: "
    assert fed[0]["answers"] == ["42", "4"] and fed[0]["stops"] == sorted(closing)
    out = capsys.readouterr().out
    assert f"qa rendering of qa.jsonl: instruction template {TEMPLATE!r} and chat template (role markers)" in out
    event = [e for e in read_metrics(sft_run_dir) if e.get("event") == "eval"][-1]
    assert event["qa"]["qa.jsonl"]["rendering"].startswith("instruction template")
    # --raw: the prompt as written, the default stops; a chat record is then refused, naming its line
    _qa_file(qa, GOOD[:1])
    assert cli.main(["eval", str(sft_run_dir), "--qa", str(qa), "--raw"]) == 0
    assert fed[1]["prompts"] == [tok.encode(GOOD[0]["prompt"]).tolist()] and fed[1]["stops"] is None
    assert "qa rendering of qa.jsonl: raw text (--raw)" in capsys.readouterr().out


def test_a_pretraining_run_gets_raw_text_and_refuses_chat_records(run_dir, tmp_path, fed, capsys):
    qa = _qa_file(tmp_path / "qa.jsonl", GOOD[:1])
    assert cli.main(["eval", str(run_dir), "--qa", str(qa)]) == 0
    tok = ByteTokenizer()
    assert fed[0]["prompts"] == [[tok.eos_id, *tok.encode(GOOD[0]["prompt"]).tolist()]]  # a document's start
    assert "qa rendering of qa.jsonl: raw text after eos (not fine-tuned" in capsys.readouterr().out
    _qa_file(qa, GOOD)
    assert cli.main(["eval", str(run_dir), "--qa", str(qa)]) == 2 and len(fed) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{qa}:2: a chat record needs the run's chat template" in err[0], err
    assert '"prompt": str, "answer": str' in err[0]


def test_unusable_qa_records_are_counted_and_skipped(sft_run_dir, tmp_path, fed, capsys):
    qa = _qa_file(tmp_path / "qa.jsonl", GOOD, BAD)
    assert cli.main(["eval", str(sft_run_dir), "--qa", str(qa)]) == 0
    assert fed[0]["answers"] == ["42", "4"]
    unusable = {"malformed_json": 1, "missing_field": 1, "unknown_format": 2, "not_ending_with_user": 1,
                "unknown_role": 1, "empty_prompt": 1}
    assert f"records skipped: 7 {dict(sorted(unusable.items()))}" in capsys.readouterr().out
    row = [r for r in read_metrics(sft_run_dir) if "event" not in r][-1]
    assert (row["eval/qa.jsonl/total"], row["eval/qa.jsonl/correct"], row["eval/qa.jsonl/skipped"]) == (2, 1, 7)
    assert [e for e in read_metrics(sft_run_dir) if e.get("event") == "eval"][-1]["qa"]["qa.jsonl"]["unusable"] \
        == unusable
    _qa_file(qa, [], BAD)
    assert cli.main(["eval", str(sft_run_dir), "--qa", str(qa)]) == 2 and len(fed) == 1
    assert "holds no usable record" in capsys.readouterr().err


# --- long context: loss by position, passkey retrieval ------------------------------------------

def _reference_nll(params, w):
    """NLL [W, T] of every scored target of windows `w`, by one forward over all of them."""
    logp_WTV = jax.nn.log_softmax(model.apply(ODD, params, w["tokens"]))
    logp_WT = np.take_along_axis(np.asarray(logp_WTV), w["targets"][..., None], -1)[..., 0]
    return -logp_WT * w["loss_mask"]


def test_loss_by_position_is_the_per_position_mean_and_adds_up_to_perplexity(params):
    docs = _docs([5, 40, 13, 33, 16])  # full and part-filled windows of 16
    w = evaluate.document_windows(docs, 16, EOS)
    nll_WT = _reference_nll(params, w)
    edges = (0, 1, 5, 16)
    r = evaluate.loss_by_position(ODD, params, docs, seq_len=16, eos_id=EOS, edges=edges, full_windows=False,
                                  batch_size=3)
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        assert r["tokens"][i] == w["loss_mask"][:, a:b].sum()
        np.testing.assert_allclose(r["nats_per_token"][i], nll_WT[:, a:b].sum() / w["loss_mask"][:, a:b].sum(),
                                   rtol=1e-5)
    # the buckets weighted by their tokens are the overall mean of the same windows
    ppl = evaluate.perplexity(ODD, params, docs, n_bytes=1, seq_len=16, eos_id=EOS)
    assert sum(r["tokens"]) == ppl["tokens"] == sum(len(d) + 1 for d in docs) and r["windows"] == len(w["tokens"])
    weighted = np.dot(r["nats_per_token"], r["tokens"]) / sum(r["tokens"])
    np.testing.assert_allclose([weighted, r["overall"]], ppl["nats_per_token"], rtol=1e-5)


def test_full_windows_give_every_bucket_the_same_windows(params):
    docs = _docs([5, 40, 13, 33, 16])
    w = evaluate.document_windows(docs, 16, EOS)
    full = w["loss_mask"].all(1)
    assert 0 < full.sum() < len(full)
    nll_WT = _reference_nll(params, w)[full]
    r = evaluate.loss_by_position(ODD, params, docs, seq_len=16, eos_id=EOS, buckets=4)
    assert r["edges"] == [0, 4, 8, 12, 16] and r["windows"] == full.sum()
    assert r["tokens"] == [4 * full.sum()] * 4
    np.testing.assert_allclose(r["nats_per_token"], nll_WT.reshape(-1, 4, 4).sum((0, 2)) / (4 * full.sum()),
                               rtol=1e-5)


@pytest.mark.parametrize("edges", [(0, 8), (1, 16), (0, 8, 8, 16), (0, 17)])
def test_bad_bucket_edges_are_refused(params, edges):
    with pytest.raises(ValueError, match=r"edges=.* must rise strictly from 0 to seq_len=16"):
        evaluate.loss_by_position(ODD, params, _docs([20]), seq_len=16, eos_id=EOS, edges=edges)


# --- passkey ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, depth", [(300, 0.0), (300, 0.3), (333, 1.0), (1000, 0.5)])
def test_a_passkey_prompt_has_the_length_and_the_key_at_the_depth(length, depth):
    tok = ByteTokenizer()  # one token per character: the layout can be measured on the text
    ids = evaluate.passkey_prompt(tok, "12345", length, depth)
    assert ids.dtype == np.int32 and len(ids) == length and ids[0] == tok.eos_id
    text = tok.decode(ids)
    head, line = evaluate.PASSKEY_TASK + "\n", "\n" + evaluate.passkey_line("12345") + "\n"
    tail = "\n" + evaluate.PASSKEY_QUESTION
    assert text.startswith(head) and text.endswith(tail) and text.count("12345") == 2
    filler = length - 1 - len(head) - len(line) - len(tail)
    assert text.index(line) == len(head) + round(depth * filler)
    rest = text[len(head):-len(tail)].replace(line, "")  # the filler, repeated and cut at the end
    assert len(rest) == filler and (evaluate.PASSKEY_FILLER * 20).startswith(rest)


def test_passkey_prompt_mistakes():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="length=100 is too short"):
        evaluate.passkey_prompt(tok, "12345", 100, 0.5)
    with pytest.raises(ValueError, match=r"depth=1.5 must be in \[0, 1\]"):
        evaluate.passkey_prompt(tok, "12345", 400, 1.5)


def test_passkey_keys_are_seeded_and_shared_across_cells():
    cases = evaluate.passkey_cases([100, 200], [0.0, 1.0], trials=3, seed=5)
    keys = [c["key"] for c in cases]
    assert keys == keys[:3] * 4 and all(len(k) == 5 and k.isdigit() for k in keys)
    assert cases == evaluate.passkey_cases([100, 200], [0.0, 1.0], trials=3, seed=5)
    assert keys[:3] != [c["key"] for c in evaluate.passkey_cases([100], [0.0], trials=3, seed=6)]


def test_passkey_accuracy_of_fixed_completions():
    cases = evaluate.passkey_cases([100, 200], [0.0, 0.5, 1.0], trials=4, seed=0)

    def complete(i, case):  # right at length 100; at 200 right only at depth 0, except trial 0
        key = case["key"]
        if case["length"] == 100:
            return [f" {key}.", key, f" is {key} is", f"{key}\nx"][i % 4]
        if case["depth"] == 0.0:
            return "" if i % 4 == 0 else f" {key}"
        return [f" {key}0", f" {key[:4]}", f" 1{key}", f" {key[:2]} {key}"][i % 4]

    cells = evaluate.passkey_accuracy(cases, [complete(i, c) for i, c in enumerate(cases)])
    got = [(c["length"], c["depth"], c["correct"], c["total"], c["accuracy"]) for c in cells]
    assert got == [(100, 0.0, 4, 4, 1.0), (100, 0.5, 4, 4, 1.0), (100, 1.0, 4, 4, 1.0),
                   (200, 0.0, 3, 4, 0.75), (200, 0.5, 0, 4, 0.0), (200, 1.0, 0, 4, 0.0)]


def test_passkey_scores_the_models_greedy_digits():
    # a context-extended configuration: YaRN over 128 original positions, prompts past them
    cfg = dataclasses.replace(BYTE, max_seq_len=320, rope_scaling="yarn", rope_scaling_factor=2.5,
                              rope_original_max_len=128)
    p = random_params(cfg, 2, scale=0.1, norm_scale=0.1)
    tok = ByteTokenizer()
    res = evaluate.passkey(cfg, p, tok, [270], depths=(0.0, 1.0), trials=2, seed=1, batch_size=4)
    assert len(res["completions"]) == 4
    forward = jax.jit(lambda x: model.apply(cfg, p, x))
    for case, completion in zip(res["cases"], res["completions"]):
        seq = list(evaluate.passkey_prompt(tok, case["key"], 270, case["depth"]))
        for _ in range(len(tok.encode(" " + case["key"])) + 1):  # argmax, no cache, to eos
            buf = np.zeros((1, 280), np.int32)
            buf[0, :len(seq)] = seq
            nxt = int(np.argmax(forward(buf)[0, len(seq) - 1]))
            if nxt == tok.eos_id:
                break
            seq.append(nxt)
        assert completion == tok.decode(seq[270:])
    assert res["cells"] == evaluate.passkey_accuracy(res["cases"], res["completions"])


def test_eval_command_passkey_and_by_position(run_dir, capsys):
    # past the run's model.max_seq_len by override, as for a model trained shorter
    assert cli.main(["eval", str(run_dir), "model.max_seq_len=300", "--passkey", "--passkey-lengths", "270",
                     "--passkey-depths", "0", "1", "--passkey-trials", "2", "--by-position", "64",
                     "--buckets", "4", "--max-documents", "3"]) == 0
    out = capsys.readouterr().out
    assert "passkey@270" in out and "heldout@64" in out and "0-16" in out and "48-64" in out
    row = [r for r in read_metrics(run_dir) if "event" not in r][-1]
    assert row["step"] == 7 and row["eval/passkey@270/total"] == 4
    assert row["eval/passkey@270/by_depth/0/total"] == row["eval/passkey@270/by_depth/1/total"] == 2
    spans = ["0-16", "16-32", "32-48", "48-64"]
    tokens = [row[f"eval/heldout@64/by_position/{s}/tokens"] for s in spans]
    nats = [row[f"eval/heldout@64/by_position/{s}/nats_per_token"] for s in spans]
    assert len(set(tokens)) == 1 and row["eval/heldout@64/tokens"] == sum(tokens) > 0
    np.testing.assert_allclose(np.dot(nats, tokens) / sum(tokens), row["eval/heldout@64/nats_per_token"], rtol=1e-6)
    assert "eval/heldout/nats_per_token" not in row  # asked for other things: no plain held-out score


@pytest.mark.parametrize("argv, fragment", [
    (["--passkey", "--passkey-lengths", "50"], "--passkey-lengths 50 must be in ["),
    (["--passkey", "--passkey-lengths", "270"], "model.max_seq_len=96"),
    (["--passkey"], "--passkey-lengths (none fit)"),
    (["--by-position", "64", "--buckets", "65"], "--buckets 65"),
])
def test_eval_option_mistakes_are_one_line_errors(run_dir, capsys, argv, fragment):
    assert cli.main(["eval", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxlm eval: error: ") and fragment in err[0], err


def test_check_passkey_accepts_the_default_lengths():
    tok = ByteTokenizer()
    m = dataclasses.replace(RUN_MODEL, max_seq_len=1024)
    lengths = evaluate.default_passkey_lengths(m, tok)
    assert lengths == [254, 508, 1017]
    evaluate._check_passkey(m, tok, lengths, (0.0, 1.0), 1)
    with pytest.raises(ConfigError, match="--passkey-trials 0"):
        evaluate._check_passkey(m, tok, lengths, (0.0,), 0)
