"""T5 (v1.1's gated GELU and untied head; a tied head with its output scaling and gated SiLU) against
transformers' T5ForConditionalGeneration on CPU torch in float32: imported logits, greedy
generation, and export back.

Tolerance as tests/interop/test_hf_parity.py: 1e-4 absolute on float32 logits. The inputs are
right-padded (transformers gets the attention mask, jaxlm segment id 0 on the padding); the decoder
rows are whole. Rows of 13 tokens with 8 buckets up to distance 12 reach every kind of bucket: exact,
log-spaced and the last, both ways in the encoder and one way in the decoder.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.parity
transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from jaxlm import model, sharding  # noqa: E402
from jaxlm.config import MeshConfig  # noqa: E402
from jaxlm.generate import generate  # noqa: E402
from jaxlm.interop import load_hf, save_hf  # noqa: E402
from jaxlm.interop.hf import read_config  # noqa: E402

# head dim 16: T5's unscaled logits are jaxlm's queries times 4, exact in binary, so export is bitwise
BASE = dict(vocab_size=37, d_model=32, d_kv=16, num_heads=2, d_ff=19, num_layers=2, num_decoder_layers=3,
            relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
            decoder_start_token_id=0)
CASES = {
    "v1_1": dict(BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "tied_silu": dict(BASE, feed_forward_proj="gated-silu", tie_word_embeddings=True),
}
LENGTHS = (13, 9, 4)  # the inputs' real tokens, right-padded to 13
DECODER_LEN = 11
apply = jax.jit(model.apply, static_argnums=0)


def one_device():
    return sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


def hf_logits(m, inputs, decoder):
    mask = (np.arange(inputs.shape[1])[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    with torch.no_grad():
        return m(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(decoder)).logits.numpy()


def our_logits(cfg, params, inputs, decoder):
    segments = (np.arange(inputs.shape[1])[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    return np.asarray(apply(cfg, params, jnp.asarray(inputs, jnp.int32), jnp.asarray(segments),
                            decoder_tokens=jnp.asarray(decoder, jnp.int32),
                            decoder_segment_ids=jnp.ones(decoder.shape, jnp.int32)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (directory, HF model, inputs, decoder tokens, HF logits), saved by transformers."""
    cache = {}

    def get(case):
        if case not in cache:
            torch.manual_seed(0)
            m = transformers.T5ForConditionalGeneration(transformers.T5Config(**CASES[case])).eval()
            with torch.no_grad():
                if not CASES[case]["tie_word_embeddings"]:  # transformers 5 ties every T5 head at first
                    m.lm_head.weight = torch.nn.Parameter(torch.empty_like(m.lm_head.weight))
                for p in m.parameters():  # norms and position biases too, so a misplaced one shows
                    p.normal_(0.0, 0.3)
            path = tmp_path_factory.mktemp(case)
            m.save_pretrained(path)
            rng = np.random.default_rng(1)
            inputs = rng.integers(2, BASE["vocab_size"], (len(LENGTHS), max(LENGTHS)))
            inputs[np.arange(max(LENGTHS))[None] >= np.array(LENGTHS)[:, None]] = 0
            decoder = np.concatenate([np.zeros((len(LENGTHS), 1), np.int64),
                                      rng.integers(2, BASE["vocab_size"], (len(LENGTHS), DECODER_LEN - 1))], 1)
            cache[case] = path, m, inputs, decoder, hf_logits(m, inputs, decoder)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_imported_logits_match_transformers(case, built):
    path, m, inputs, decoder, want = built(case)
    cfg, params = load_hf(path, mesh=one_device())
    assert (cfg.arch, cfg.position, cfg.n_encoder_layers, cfg.n_layers) == ("encoder_decoder", "t5_relative", 2, 3)
    assert cfg.tie_embeddings == CASES[case]["tie_word_embeddings"]
    assert cfg.activation == {"gated-gelu": "gelu_tanh", "gated-silu": "silu"}[CASES[case]["feed_forward_proj"]]
    np.testing.assert_allclose(our_logits(cfg, params, inputs, decoder), want, atol=1e-4, rtol=0)
    # the relative position bias matters here: RoPE in its place moves the logits
    rope = dataclasses.replace(cfg, position="rope")
    moved = our_logits(rope, {k: v for k, v in params.items() if not k.endswith("_relative")}, inputs, decoder)
    assert np.abs(moved - want).max() > 1e-2


def test_greedy_generation_matches_transformers(built):
    path, m, inputs, _, _ = built("v1_1")
    cfg, params = load_hf(path, mesh=one_device())
    decoder = np.zeros((len(LENGTHS), 1), np.int64)  # the start id; greedy by full forwards (transformers'
    for _ in range(8):                                  # generate() breaks on unequal stack depths)
        decoder = np.concatenate([decoder, hf_logits(m, inputs, decoder)[:, -1:].argmax(-1)], 1)
    out = generate(cfg, params, inputs, np.array(LENGTHS), max_new_tokens=8)
    assert np.asarray(out.tokens).tolist() == decoder[:, 1:].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_and_reimports(case, built, tmp_path):
    path, m, inputs, decoder, want = built(case)
    cfg, params = load_hf(path, mesh=one_device())
    save_hf(cfg, params, tmp_path / "out", base_config=read_config(path))
    exported = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(exported, inputs, decoder), want, atol=1e-5, rtol=0)
    cfg2, params2 = load_hf(tmp_path / "out", mesh=one_device())
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):  # the final norm's scale moves by an ulp
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)


def test_a_jaxlm_encoder_decoder_on_rope_does_not_export_as_t5(tmp_path):
    from jaxlm.config import ModelConfig
    from jaxlm.interop.hf_config import InteropError

    cfg = ModelConfig(arch="encoder_decoder", vocab_size=37, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=8)
    with pytest.raises(InteropError, match="model.position=rope"):
        save_hf(cfg, model.init(cfg, jax.random.key(0)), tmp_path / "out")


def test_convert_round_trip_through_a_run_directory(built, tmp_path):
    """`jaxlm convert` both ways: the run directory holds the encoder-decoder, and its export loads in
    transformers with the same logits."""
    from jaxlm.interop.run import export_run, import_run

    path, m, inputs, decoder, want = built("v1_1")
    cfg, _ = import_run(path, tmp_path / "run", mesh=one_device())
    assert (cfg.model.arch, cfg.model.position) == ("encoder_decoder", "t5_relative")
    export_run(tmp_path / "run", tmp_path / "out")
    exported = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(exported, inputs, decoder), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, fragment", [
    (dict(feed_forward_proj="relu"), "feed_forward_proj='relu' is not supported"),
    (dict(feed_forward_proj="gated-gelu", d_kv=8), "d_kv=8 x num_heads=2 = 16 differs from d_model=32"),
    (dict(feed_forward_proj="gated-gelu", decoder_start_token_id=3), "decoder_start_token_id=3 differs"),
])
def test_what_jaxlm_cannot_hold_is_one_line(change, fragment):
    from jaxlm.interop.hf_config import InteropError, model_config_from_hf

    hf = dict(BASE, architectures=["T5ForConditionalGeneration"], model_type="t5", pad_token_id=0, **change)
    with pytest.raises(InteropError, match=fragment):
        model_config_from_hf(hf)
