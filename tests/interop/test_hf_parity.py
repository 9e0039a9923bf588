"""Logits parity with Hugging Face transformers (CPU torch, float32) for imported and exported models.

Tolerance policy: 1e-4 absolute on float32 logits of magnitude ~1-10 (the two frameworks
order their float32 sums differently; a misplaced weight or a wrong RoPE frequency moves
logits by > 1e-2, checked below for the scaled RoPE variants). Batches are right-padded:
transformers gets the attention mask, jaxlm none (it is causal, so real tokens never see the
padding after them), and only real positions are compared.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.parity
transformers = pytest.importorskip("transformers")
import torch  # noqa: E402  (transformers brings it; skipped above without it)

from jaxlm import model, sharding  # noqa: E402
from jaxlm.config import MeshConfig  # noqa: E402
from jaxlm.interop import load_hf, save_hf  # noqa: E402
from jaxlm.interop.hf import read_config  # noqa: E402
from jaxlm.model.attention import RopeScaling, rope_inv_freq  # noqa: E402

LLAMA = dict(vocab_size=37, hidden_size=30, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
             intermediate_size=19)
# head_dim 6: frequencies 1, 0.046, 0.0022 with wavelengths 6.3, 135 and 2920 positions. With
# original_max_position_embeddings 256 they fall in llama3's high (kept), middle (blended)
# and low (divided by factor) bands: all three branches are exercised.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
CASES = {
    "llama": ("llama", dict(LLAMA)),
    "llama3_rope": ("llama", dict(LLAMA, max_position_embeddings=2048,
                                  rope_parameters={**LLAMA3_ROPE, "rope_theta": 10_000.0})),
    "llama2_linear_rope": ("llama", dict(LLAMA, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                 "rope_theta": 20_000.0})),
    "qwen2": ("qwen2", dict(vocab_size=41, hidden_size=36, num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, intermediate_size=22, tie_word_embeddings=True,
                            rope_theta=1_000_000.0)),
    "mistral": ("mistral", dict(vocab_size=43, hidden_size=28, num_hidden_layers=2, num_attention_heads=7,
                                num_key_value_heads=7, intermediate_size=17, sliding_window=None)),
    # windows of 4 and 5 over 11 tokens: more than twice the window, so the window binds
    "mistral_window": ("mistral", dict(vocab_size=43, hidden_size=28, num_hidden_layers=2, num_attention_heads=7,
                                       num_key_value_heads=1, intermediate_size=17, sliding_window=4)),
    "qwen2_window": ("qwen2", dict(vocab_size=41, hidden_size=36, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, intermediate_size=22, use_sliding_window=True,
                                   sliding_window=5, max_window_layers=0)),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM")}
LENGTHS = (11, 7, 4)  # right padding
apply = jax.jit(model.apply, static_argnums=0)


def hf_logits(m, tokens: np.ndarray) -> np.ndarray:
    mask = np.arange(tokens.shape[1])[None] < np.array(LENGTHS)[:, None]
    with torch.no_grad():
        return m(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


def assert_real_positions_close(ours, theirs, atol):
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(np.asarray(ours)[b, :n], theirs[b, :n], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (directory, HF model, tokens, HF logits); each saved by transformers (qwen2 in shards)."""
    cache = {}

    def get(case):
        if case not in cache:
            family, kwargs = CASES[case]
            config_cls, model_cls = (getattr(transformers, name) for name in CLASSES[family])
            torch.manual_seed(0)
            m = model_cls(config_cls(**kwargs)).eval()
            with torch.no_grad():  # random norms and biases too, so a misplaced one shows
                for p in m.parameters():
                    p.normal_(0.0, 0.3)
            path = tmp_path_factory.mktemp(case)
            m.save_pretrained(path, **({"max_shard_size": "4KB"} if case == "qwen2" else {}))
            tokens = np.random.default_rng(1).integers(1, kwargs["vocab_size"], (len(LENGTHS), max(LENGTHS)))
            tokens[np.arange(max(LENGTHS))[None] >= np.array(LENGTHS)[:, None]] = 0
            cache[case] = path, m, tokens, hf_logits(m, tokens)
        return cache[case]

    return get


def one_device():
    return sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


@pytest.mark.parametrize("case", list(CASES))
def test_imported_logits_match_transformers(case, built):
    path, m, tokens, want = built(case)
    if case == "qwen2":
        assert len(list(path.glob("model-*.safetensors"))) > 1  # read through model.safetensors.index.json
    cfg, params = load_hf(path, mesh=one_device())
    assert cfg.rope_theta == m.config.rope_parameters["rope_theta"]
    assert_real_positions_close(apply(cfg, params, jnp.asarray(tokens, jnp.int32)), want, atol=1e-4)
    if cfg.rope_scaling != "none":  # the test can see a wrong frequency
        plain = dataclasses.replace(cfg, rope_scaling="none")
        assert np.abs(np.asarray(apply(plain, params, jnp.asarray(tokens, jnp.int32)))[0] - want[0]).max() > 1e-2
    if case.endswith("_window"):  # the window binds, and the whole context is kept
        assert (cfg.sliding_window, cfg.max_seq_len) == (m.config.sliding_window, m.config.max_position_embeddings)
        unwindowed = dataclasses.replace(cfg, sliding_window=0)
        assert np.abs(np.asarray(apply(unwindowed, params, jnp.asarray(tokens, jnp.int32)))[0] - want[0]).max() > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_and_reimports_bitwise(case, built, tmp_path, assert_same):
    path, m, tokens, want = built(case)
    cfg, params = load_hf(path, mesh=one_device())
    base = None if case == "llama" else read_config(path)  # llama: the family is inferred
    save_hf(cfg, params, tmp_path / "out", base_config=base, max_shard_bytes=3000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(exported) is type(m)
    assert exported.config.tie_word_embeddings == m.config.tie_word_embeddings
    assert_real_positions_close(hf_logits(exported, tokens), want, atol=1e-6)
    cfg2, params2 = load_hf(tmp_path / "out", mesh=one_device())
    assert cfg2 == cfg
    assert_same(params, params2)


def test_llama3_frequencies_at_llama31_size():
    """Head dim 128, theta 500k, factor 8 over 8192 positions (Llama 3.1 8B), all three bands."""
    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                      rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 8192,
                                                       "rope_theta": 500_000.0})
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
    want = init(config, "cpu")[0].numpy()
    ours = rope_inv_freq(128, 500_000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-6)
    plain = np.asarray(rope_inv_freq(128, 500_000.0))
    kept, divided = np.isclose(want, plain, rtol=1e-6), np.isclose(want, plain / 8, rtol=1e-6)
    assert kept.sum() > 0 and divided.sum() > 0 and (~kept & ~divided).sum() > 0


@pytest.mark.parametrize("case, new", [
    ("llama3_rope", 16),  # the decode path applies the llama3 RoPE scaling too
    ("mistral_window", 24),  # a window of 4: the rolling cache wraps six times
])
def test_greedy_generation_matches_transformers(built, case, new):
    """6-token prompts through jaxlm's KV-cache sampler and through transformers' generate."""
    from jaxlm.generate import generate

    path, m, _, _ = built(case)
    prompts = np.random.default_rng(3).integers(0, m.config.vocab_size, (2, 6))
    with torch.no_grad():
        want = m.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 6, dtype=torch.long), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0).numpy()[:, 6:]
    cfg, params = load_hf(path, mesh=one_device())
    np.testing.assert_array_equal(np.asarray(generate(cfg, params, prompts, max_new_tokens=new).tokens), want)


# --- long context: yarn and dynamic past original_max_position_embeddings -------------------------------------

# head_dim 16: wavelengths 6.3 to 2e4 positions. With 64 original positions yarn's ramp spans pairs 0-3 (or
# 0-2 with beta_slow 0.5, untruncated), and dynamic rescales at the 80 positions compared (L = 80 > 64).
LONG = dict(vocab_size=37, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=19)
LONG_CASES = {
    "yarn": dict(LONG, max_position_embeddings=256, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10_000.0}),
    "yarn_mscale_untruncated": dict(LONG, max_position_embeddings=256, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 8.0,
        "beta_slow": 0.5, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5, "rope_theta": 10_000.0}),
    "dynamic": dict(LONG, max_position_embeddings=64, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10_000.0}),
}
LONG_T = 80


def full_logits(m, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(input_ids=torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def long_built(tmp_path_factory):
    """case -> (directory, tokens [2, LONG_T], HF logits), the model saved by transformers."""
    cache = {}

    def get(case):
        if case not in cache:
            torch.manual_seed(0)
            m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LONG_CASES[case])).eval()
            with torch.no_grad():
                for p in m.parameters():
                    p.normal_(0.0, 0.3)
            path = tmp_path_factory.mktemp(case)
            m.save_pretrained(path)
            tokens = np.random.default_rng(2).integers(0, LONG["vocab_size"], (2, LONG_T))
            cache[case] = path, tokens, full_logits(m, tokens)  # a fresh model: dynamic's state is unused
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(LONG_CASES))
def test_long_context_rope_scaling_matches_transformers(case, long_built, tmp_path):
    path, tokens, want = long_built(case)
    cfg, params = load_hf(path, mesh=one_device())
    assert cfg.rope_scaling == LONG_CASES[case]["rope_parameters"]["rope_type"]
    tokens_j = jnp.asarray(tokens, jnp.int32)
    np.testing.assert_allclose(np.asarray(apply(cfg, params, tokens_j)), want, atol=1e-4, rtol=0)
    # the test sees wrong frequencies, a missing attention factor, and dynamic's base at the original length
    wrong = [dataclasses.replace(cfg, rope_scaling="none")]
    if cfg.rope_scaling == "yarn":
        wrong.append(dataclasses.replace(cfg, rope_attention_factor=1.0))
    else:
        wrong.append(dataclasses.replace(cfg, rope_original_max_len=LONG_T))
    for other in wrong:
        assert np.abs(np.asarray(apply(other, params, tokens_j)) - want).max() > 1e-2, other
    # exported, transformers reads it as the same model, and jaxlm reads back the same config
    save_hf(cfg, params, tmp_path / "out", base_config=read_config(path))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    np.testing.assert_allclose(full_logits(exported, tokens), want, atol=1e-6, rtol=0)
    assert load_hf(tmp_path / "out", mesh=one_device())[0] == cfg


def test_dynamic_rope_generation_matches_transformers(long_built):
    """60 prompt tokens and 12 new ones cross the 64 original positions. transformers recomputes the dynamic
    base at every step from then on and keeps the keys cached under the bases they were written with;
    jaxlm's KV-cache sampler does the same (each call's L = its longest row's last position + 1)."""
    from jaxlm.generate import generate
    from jaxlm.objectives.lm import token_log_probs

    path, _, _ = long_built("dynamic")
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # fresh dynamic state
    prompts = np.random.default_rng(4).integers(1, LONG["vocab_size"], (2, 60))
    with torch.no_grad():
        out = m.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 60, dtype=torch.long), do_sample=False,
                         max_new_tokens=12, min_new_tokens=12, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    want_tokens = out.sequences.numpy()[:, 60:]
    want_logp = torch.log_softmax(torch.stack(out.logits, 1), -1).gather(-1, out.sequences[:, 60:, None])[..., 0]
    cfg, params = load_hf(path, mesh=one_device(), max_seq_len=128)  # past max_position_embeddings, as dynamic is
    assert cfg.rope_original_max_len == 64
    got = generate(cfg, params, prompts, max_new_tokens=12)
    np.testing.assert_array_equal(np.asarray(got.tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(got.model_logprobs), want_logp.numpy(), atol=1e-4, rtol=0)
    # one forward over the whole sequence (every position at the final base) scores the same tokens otherwise
    full = apply(cfg, params, jnp.asarray(out.sequences.numpy()[:, :-1], jnp.int32))
    full_logp = np.asarray(token_log_probs(full[:, 59:], jnp.asarray(want_tokens, jnp.int32)))
    assert np.abs(full_logp - want_logp.numpy()).max() > 1e-3
