"""RoPE scaling ntk, dynamic and yarn (linear and llama3: tests/interop): jaxlm's frequencies and attention
factor against numpy transcriptions of the papers' formulas and against transformers' ROPE_INIT_FUNCTIONS
(through jaxlm's config import), and dynamic's sequence length taken from the batch under jit."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.interop.hf_config import model_config_from_hf
from jaxlm.model.attention import RopeScaling, ntk_theta, rope_attention_factor, rope_inv_freq, rope_tables
from jaxlm.model.transformer import rope_scaling_of


def plain(H, theta):
    """RoFormer's frequencies theta^(-2d/H), d = 0 .. H/2 - 1, in float64."""
    return theta ** -(np.arange(0, H, 2) / H)


def ntk_reference(H, theta, s):
    """NTK-aware scaling (bloc97 2023; YaRN, Peng et al. 2023, section 3.1): base b' = b * s^(|D| / (|D| - 2))."""
    return plain(H, theta * s ** (H / (H - 2)))


def dynamic_reference(H, theta, s, L, original):
    """Dynamic NTK (YaRN section 3.3; transformers' _compute_dynamic_ntk_parameters): NTK-aware with the
    scale s * L / original - (s - 1) for a sequence of L > original positions; plain RoPE up to original."""
    if L <= original:
        return plain(H, theta)
    return plain(H, theta * (s * L / original - (s - 1)) ** (H / (H - 2)))


def yarn_reference(H, theta, s, original, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """YaRN's NTK-by-parts (section 3.2), pair by pair: h(theta_d) = (1 - gamma_d) theta_d / s + gamma_d theta_d,
    gamma_d = 1 where pair d turns more than beta_fast times over the original context (r = original / lambda_d,
    lambda_d = 2 pi / theta_d), 0 where it turns fewer than beta_slow times. Between, as the authors' code and
    transformers compute it, gamma is linear in d from the d where r = beta_fast to the d where r = beta_slow
    (rounded outwards when `truncate`, clipped to [0, H - 1])."""
    def d_where(r):
        return H * math.log(original / (2 * math.pi * r)) / (2 * math.log(theta))

    first, last = d_where(beta_fast), d_where(beta_slow)
    if truncate:
        first, last = math.floor(first), math.ceil(last)
    first, last = max(first, 0), min(last, H - 1)
    out = []
    for d, theta_d in enumerate(plain(H, theta)):
        gamma = 1 - min(max((d - first) / (last - first), 0.0), 1.0)
        out.append((1 - gamma) * theta_d / s + gamma * theta_d)
    return np.array(out)


def yarn_attention_reference(s):
    """YaRN section 3.4: sqrt(1/t) = 0.1 ln(s) + 1, multiplying both q and k (so the logits by 1/t)."""
    return 0.1 * math.log(s) + 1 if s > 1 else 1.0


@pytest.mark.parametrize("H, theta, s", [(128, 10_000.0, 4.0), (16, 500_000.0, 2.5), (6, 10_000.0, 8.0)])
def test_ntk_is_the_base_change(H, theta, s):
    got = np.asarray(rope_inv_freq(H, theta, RopeScaling("ntk", s)))
    np.testing.assert_allclose(got, ntk_reference(H, theta, s), rtol=2e-6)
    # the exponent: the lowest frequency is divided by s, the highest kept
    np.testing.assert_allclose([got[0], got[-1]], [1.0, plain(H, theta)[-1] / s], rtol=2e-6)
    assert rope_attention_factor(RopeScaling("ntk", s)) == 1.0


def test_dynamic_takes_the_length_it_is_given():
    H, theta, s, original = 16, 10_000.0, 2.0, 64
    scaling = RopeScaling("dynamic", s, original_max_len=original)
    for L in (1, original, original + 1, 80, 3 * original):
        got = np.asarray(rope_inv_freq(H, theta, scaling, L))
        np.testing.assert_allclose(got, dynamic_reference(H, theta, s, L, original), rtol=3e-6, err_msg=f"L={L}")
    # up to the original length it is plain RoPE, bit for bit; no length given means that too
    np.testing.assert_array_equal(np.asarray(rope_inv_freq(H, theta, scaling, original)),
                                  np.asarray(rope_inv_freq(H, theta)))
    np.testing.assert_array_equal(np.asarray(rope_inv_freq(H, theta, scaling)), np.asarray(rope_inv_freq(H, theta)))


def test_dynamic_length_is_the_batch_s_largest_position_under_jit():
    H, theta, s, original = 16, 10_000.0, 2.0, 64
    scaling = RopeScaling("dynamic", s, original_max_len=original)
    tables = jax.jit(lambda pos: rope_tables(pos, H, theta, scaling))
    positions = np.stack([np.arange(90) % 50, np.arange(90)])  # row 1 reaches position 89: L = 90 for both rows
    sin, cos = (np.asarray(t) for t in tables(jnp.asarray(positions, jnp.int32)))
    angle = positions[..., None] * dynamic_reference(H, theta, s, 90, original)
    np.testing.assert_allclose(sin, np.sin(angle), atol=2e-4)
    np.testing.assert_allclose(cos, np.cos(angle), atol=2e-4)
    short = np.asarray(tables(jnp.asarray(positions[:, :50], jnp.int32))[0])  # L = 50 <= 64: plain RoPE
    np.testing.assert_allclose(short, np.sin(positions[:, :50, None] * plain(H, theta)), atol=2e-5)


@pytest.mark.parametrize("H, theta, s, original, beta_fast, beta_slow, truncate", [
    (128, 10_000.0, 4.0, 4096, 32.0, 1.0, True),  # Qwen2.5's recommended YaRN, factor 4 over 32k
    (128, 150_000.0, 32.0, 4096, 32.0, 1.0, False),  # gpt-oss: no truncation
    (64, 10_000.0, 40.0, 4096, 32.0, 1.0, True),  # DeepSeek-V3's rope head: 64 dims, factor 40
    (16, 10_000.0, 4.0, 64, 8.0, 0.5, True),
    (6, 1_000.0, 2.0, 256, 32.0, 1.0, False),
    (6, 10_000.0, 8.0, 8192, 32.0, 1.0, False),  # the ramp ends past the last pair (2.34 > 2)
])
def test_yarn_frequencies_against_the_paper(H, theta, s, original, beta_fast, beta_slow, truncate):
    scaling = RopeScaling("yarn", s, original_max_len=original, beta_fast=beta_fast, beta_slow=beta_slow,
                          truncate=truncate)
    got = np.asarray(rope_inv_freq(H, theta, scaling))
    np.testing.assert_allclose(got, yarn_reference(H, theta, s, original, beta_fast, beta_slow, truncate),
                               rtol=2e-6)
    # the bands by the paper's definition: kept above beta_fast rotations, divided by s below beta_slow
    base = plain(H, theta)
    rotations = original * base / (2 * math.pi)
    np.testing.assert_allclose(got[rotations > beta_fast], base[rotations > beta_fast], rtol=2e-6)
    np.testing.assert_allclose(got[rotations < beta_slow], base[rotations < beta_slow] / s, rtol=2e-6)
    assert np.all((got >= base / s * (1 - 2e-6)) & (got <= base * (1 + 2e-6)))


def test_yarn_ramp_boundaries():
    """H 16, theta 1e4, 64 original positions: r = 32 lies below pair 0 (clipped to 0) and r = 1 at pair
    16 ln(64 / 2 pi) / (2 ln 1e4) = 2.016, rounded up to 3: pairs 0, 1, 2, 3 keep 1, 2/3, 1/3, 0 of their
    frequency and take the rest divided by 4. Without truncation the ramp ends at 2.016 instead."""
    base = plain(16, 10_000.0)
    got = np.asarray(rope_inv_freq(16, 10_000.0, RopeScaling("yarn", 4.0, original_max_len=64)))
    kept = np.array([1, 2 / 3, 1 / 3, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(got, base * kept + base / 4 * (1 - kept), rtol=2e-6)
    end = 16 * math.log(64 / (2 * math.pi)) / (2 * math.log(10_000.0))
    untruncated = np.asarray(rope_inv_freq(16, 10_000.0, RopeScaling("yarn", 4.0, original_max_len=64, truncate=False)))
    kept = np.clip(1 - np.arange(8) / end, 0, 1)
    np.testing.assert_allclose(untruncated, base * kept + base / 4 * (1 - kept), rtol=2e-6)


def test_yarn_attention_factor_scales_sin_and_cos():
    for s in (0.5, 1.0, 4.0, 40.0):
        assert rope_attention_factor(RopeScaling("yarn", s)) == pytest.approx(yarn_attention_reference(s), rel=1e-12)
    assert rope_attention_factor(RopeScaling("yarn", 40.0, attention_factor=1.25)) == 1.25
    for kind in ("none", "linear", "llama3", "ntk", "dynamic"):
        assert rope_attention_factor(RopeScaling(kind, 4.0)) == 1.0
    positions = jnp.arange(10, dtype=jnp.int32)[None]
    sin, cos = rope_tables(positions, 16, 10_000.0, RopeScaling("yarn", 4.0, original_max_len=64))
    np.testing.assert_allclose(np.asarray(sin) ** 2 + np.asarray(cos) ** 2, (0.1 * math.log(4.0) + 1) ** 2,
                               rtol=1e-6)


# --- against transformers, through jaxlm's import of the same config.json ------------------------------------


HF_ROPE = {  # name -> (head_dim, max_position_embeddings, rope_parameters)
    "yarn": (128, 131072, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                           "rope_theta": 1_000_000.0}),
    "yarn_gpt_oss": (64, 131072, {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 150_000.0}),
    "yarn_deepseek_mscale": (64, 163840, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.7,
                                          "rope_theta": 10_000.0}),
    "yarn_attention_factor": (16, 256, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "beta_fast": 8.0, "beta_slow": 0.5, "attention_factor": 1.3,
                                        "rope_theta": 10_000.0}),
    "yarn_implicit": (6, 2048, {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 256,
                                "rope_theta": 1_000.0}),
    "dynamic": (128, 4096, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500_000.0}),
    "dynamic_small": (6, 64, {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10_000.0}),
}


def hf_and_jaxlm(name):
    transformers = pytest.importorskip("transformers")
    H, max_len, rope = HF_ROPE[name]
    sizes = dict(hidden_size=H * 2, num_attention_heads=2, max_position_embeddings=max_len)
    hf = transformers.LlamaConfig(**sizes, rope_parameters=dict(rope))
    ours = model_config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 11, "num_hidden_layers": 1,
                                 "intermediate_size": 8, **sizes, "rope_parameters": dict(rope)})
    return transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope["rope_type"]], hf, ours


@pytest.mark.parity
@pytest.mark.parametrize("name", [n for n in HF_ROPE if n.startswith("yarn")])
def test_yarn_matches_transformers(name):
    init, hf, cfg = hf_and_jaxlm(name)
    want, want_factor = init(hf, "cpu")
    scaling = rope_scaling_of(cfg)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling)), want.numpy(),
                               rtol=1e-6)
    assert rope_attention_factor(scaling) == pytest.approx(want_factor, rel=1e-12)
    assert want_factor != 1.0


@pytest.mark.parity
@pytest.mark.parametrize("name", ["dynamic", "dynamic_small"])
def test_dynamic_matches_transformers(name):
    import torch

    init, hf, cfg = hf_and_jaxlm(name)
    assert cfg.rope_original_max_len == hf.max_position_embeddings
    scaling = rope_scaling_of(cfg)
    for L in (1, cfg.rope_original_max_len, cfg.rope_original_max_len + 1, 5 * cfg.rope_original_max_len + 3):
        want, want_factor = init(hf, "cpu", seq_len=torch.tensor(L))  # as its forward passes it
        got = rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling, jnp.int32(L))
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6, err_msg=f"L={L}")
        assert rope_attention_factor(scaling) == want_factor == 1.0


@pytest.mark.parity
def test_ntk_is_transformers_default_rope_at_its_theta():
    transformers = pytest.importorskip("transformers")
    for H, theta, s in ((128, 10_000.0, 4.0), (6, 500_000.0, 8.0)):
        hf = transformers.LlamaConfig(hidden_size=2 * H, num_attention_heads=2,
                                      rope_parameters={"rope_type": "default", "rope_theta": ntk_theta(theta, s, H)})
        want, _ = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
        np.testing.assert_allclose(np.asarray(rope_inv_freq(H, theta, RopeScaling("ntk", s))), want.numpy(), rtol=1e-6)
