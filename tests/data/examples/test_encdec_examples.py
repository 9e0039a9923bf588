"""Encoder-decoder examples: the decoder-only layout cut in two (inputs to the encoder, the target
to the decoder), first-fit packing on both sides, and a pretraining run of an encoder-decoder on
span corruption that learns."""
import numpy as np
import pytest

from jaxlm.data.examples import encdec, make_example
from jaxlm.data.tokenizers.specials import SpecialIds
from jaxlm.runs import read_metrics
from jaxlm.testing import tiny_config

SP = SpecialIds(pad=0, bos=None, eos=1, fim_prefix=2, fim_middle=3, fim_suffix=4, ul2={"r": 5, "s": 6, "x": 7},
                sentinels=tuple(range(8, 28)))


def _trimmed(name, doc, T, seed):
    """The loader's example: make_example cut after its last scored position."""
    ex = make_example(name, doc, T, SP, np.random.default_rng(seed))
    n = int(np.flatnonzero(ex["loss_mask"])[-1]) + 1
    return {**{k: ex[k][:n] for k in ("tokens", "targets", "loss_mask")}, "prefix_len": int(ex["prefix_len"])}


@pytest.mark.parametrize("name", ["span_corruption", "ul2", "prefix_lm"])
def test_the_two_sides_are_the_decoder_only_sequence_cut_at_the_prefix(name):
    for seed in range(20):
        doc = np.random.default_rng(seed).integers(30, 90, 50).astype(np.int32)
        ex = _trimmed(name, doc, 64, seed)
        pair = encdec.to_encoder_decoder(ex, start_id=SP.pad)
        seq = np.append(ex["tokens"], ex["targets"][-1])  # the whole decoder-only sequence
        p = ex["prefix_len"]
        assert pair["encoder_tokens"].tolist() == seq[:p].tolist()
        assert pair["targets"].tolist() == seq[p:].tolist()  # the same targets as the decoder-only model's
        assert pair["tokens"].tolist() == [SP.pad, *seq[p:-1].tolist()]  # start, then teacher forcing
        assert pair["loss_mask"].tolist() == ex["loss_mask"][p - 1:].tolist() and pair["loss_mask"].all()


def test_an_example_without_inputs_has_no_encoder_decoder_form():
    with pytest.raises(ValueError, match="prefix_len >= 1"):
        encdec.to_encoder_decoder(_trimmed("clm", np.arange(30, 40, dtype=np.int32), 16, 0), SP.pad)


def test_packing_places_every_example_once_within_both_widths():
    rng = np.random.default_rng(0)
    examples = [_trimmed("span_corruption", rng.integers(30, 90, int(n)).astype(np.int32), 32, i)
                for i, n in enumerate(rng.integers(3, 40, 30))]
    pairs = [encdec.to_encoder_decoder(x, SP.pad) for x in examples]
    rows, truncated = encdec.pack_encoder_decoder(examples, 32, SP.pad)
    assert truncated == 0 and len(rows["tokens"]) < len(examples)  # several examples share a row
    seen = []
    for r in range(len(rows["tokens"])):
        for s in range(1, rows["segment_ids"][r].max() + 1):
            enc, dec = rows["encoder_segment_ids"][r] == s, rows["segment_ids"][r] == s
            assert (rows["encoder_positions"][r][enc] == np.arange(enc.sum())).all()
            assert (rows["positions"][r][dec] == np.arange(dec.sum())).all()
            seen.append((tuple(rows["encoder_tokens"][r][enc]), tuple(rows["tokens"][r][dec]),
                         tuple(rows["targets"][r][dec])))
        assert (rows["loss_mask"][r][rows["segment_ids"][r] == 0] == 0).all()  # no loss on padding
    want = [(tuple(p["encoder_tokens"]), tuple(p["tokens"]), tuple(p["targets"])) for p in pairs]
    assert sorted(seen) == sorted(want)


def test_an_encoder_decoder_pretrains_on_span_corruption(tmp_path):
    from jaxlm.train import pretrain

    cfg = tiny_config(model=dict(arch="encoder_decoder"), data=dict(objective={"span_corruption": 1.0}),
                      train=dict(steps=30, run_dir=str(tmp_path / "run"), eval_every=30))
    summary = pretrain.main(cfg)
    assert summary["final_step"] == 30 and summary["skipped"] == 0
    first = next(r for r in read_metrics(tmp_path / "run") if r.get("step") == 1)
    assert first["loss"] > 5.5 and summary["eval_loss"] < first["loss"] - 1.5, (first, summary)  # ln 369 = 5.9
    # the run serves jaxlm generate; jaxlm eval's perplexity, a decoder's measure, says what to read instead
    from jaxlm import cli

    assert cli.main(["generate", str(tmp_path / "run"), "--prompt", "def f(", "--max-new-tokens", "4"]) == 0
    assert cli.main(["eval", str(tmp_path / "run")]) == 2
    with pytest.raises(Exception, match="span_corruption, ul2, prefix_lm"):
        pretrain.build(tiny_config(model=dict(arch="encoder_decoder"), train=dict(run_dir=str(tmp_path / "r2"))))
