"""config.json <-> ModelConfig: both transformers spellings, every unsupported input's one-line error,
the RoPE scaling fields' validation, and the scaled frequencies against a hand-written reference."""
import dataclasses
import math

import numpy as np
import pytest

from jaxlm.config import ConfigError, ModelConfig, from_dict
from jaxlm.interop.hf_config import InteropError, hf_config_from_model, model_config_from_hf
from jaxlm.model.attention import RopeScaling, rope_inv_freq

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 37, "hidden_size": 30,
         "intermediate_size": 19, "num_hidden_layers": 2, "num_attention_heads": 5, "num_key_value_heads": 1,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def error(hf: dict, **kwargs) -> str:
    with pytest.raises(InteropError) as info:
        model_config_from_hf(hf, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_both_transformers_spellings_of_rope():
    v4 = model_config_from_hf({**LLAMA, "rope_theta": 500_000.0, "rope_scaling": LLAMA31_ROPE})
    v5 = model_config_from_hf({**LLAMA, "rope_parameters": {**LLAMA31_ROPE, "rope_theta": 500_000.0}})
    assert v4 == v5
    assert (v4.rope_theta, v4.rope_scaling, v4.rope_scaling_factor, v4.rope_original_max_len) == (
        500_000.0, "llama3", 8.0, 8192)
    old_linear = model_config_from_hf({**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (old_linear.rope_scaling, old_linear.rope_scaling_factor, old_linear.rope_theta) == ("linear", 2.0, 1e4)
    assert model_config_from_hf({**LLAMA, "rope_scaling": None}).rope_scaling == "none"


def test_families():
    qwen = model_config_from_hf({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True,
                                 "rope_theta": 1e6, "use_sliding_window": False, "sliding_window": 8})
    assert qwen.qkv_bias and qwen.tie_embeddings and qwen.rope_theta == 1e6 and qwen.max_seq_len == 2048
    llama = model_config_from_hf(LLAMA)
    assert not llama.qkv_bias and not llama.tie_embeddings and llama.norm_eps == 1e-5
    assert (llama.d_model, llama.n_heads, llama.n_kv_heads, llama.d_ff, llama.vocab_size) == (30, 5, 1, 19, 37)


@pytest.mark.parametrize("change, fragments", [
    ({"architectures": ["GPT2LMHeadModel"]}, ["'GPT2LMHeadModel' is not supported",
                                              "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"]),
    ({"architectures": None, "model_type": "gemma"}, ["model_type='gemma'", "supported: LlamaForCausalLM"]),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, ["rope scaling type 'longrope' is not supported",
                                                                  "linear, llama3, dynamic, yarn"]),
    ({"rope_scaling": {"type": "dynamic"}}, ["rope scaling 'dynamic' lacks 'factor'"]),
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "attention_factor": 2.0}},
     ["attention_factor=2.0 is not supported"]),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "attention_factor": 0.0}}, ["attention_factor=0.0"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["rope scaling 'llama3' lacks 'low_freq_factor'"]),
    ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor=0.5 is not supported"]),
    ({"attention_bias": True}, ["attention_bias=true is not supported for LlamaForCausalLM"]),
    ({"mlp_bias": True}, ["mlp_bias=true"]),
    ({"head_dim": 8}, ["head_dim=8 differs from hidden_size/num_attention_heads=6"]),
    ({"hidden_act": "gelu"}, ["hidden_act='gelu' is not supported"]),
    ({"quantization_config": {"quant_method": "gptq"}}, ["quantized checkpoints"]),
    ({"hidden_size": None}, ["config.json lacks 'hidden_size'"]),
])
def test_unsupported_configs_name_what(change, fragments):
    message = error({**LLAMA, **change})
    for fragment in fragments:
        assert fragment in message, message


def test_jaxlm_limits_apply_too():
    with pytest.raises(ConfigError, match="model.d_model/n_heads=7 must be even for RoPE"):
        model_config_from_hf({**LLAMA, "hidden_size": 35})


def test_sliding_window_on_every_layer_is_kept_on_some_layers_caps_the_sequence():
    mistral = {**LLAMA, "architectures": ["MistralForCausalLM"], "max_position_embeddings": 32768,
               "sliding_window": 4096}
    cfg = model_config_from_hf(mistral)
    assert (cfg.sliding_window, cfg.max_seq_len) == (4096, 32768)  # the whole context, windowed
    assert model_config_from_hf(mistral, max_seq_len=8192).max_seq_len == 8192
    assert model_config_from_hf({**mistral, "sliding_window": None}).sliding_window == 0
    assert model_config_from_hf({**LLAMA, "sliding_window": 64}).sliding_window == 0  # Llama ignores the key
    qwen = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64, "num_hidden_layers": 4}
    every = model_config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 0})
    assert (every.sliding_window, every.max_seq_len) == (64, 2048)
    assert model_config_from_hf({**qwen, "max_window_layers": 0}).sliding_window == 0  # not use_sliding_window
    # some layers only: jaxlm's window is on every layer or none, so sequences stay inside it
    some = model_config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 2})
    assert (some.sliding_window, some.max_seq_len) == (0, 64)
    assert model_config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 4}).max_seq_len == 2048
    mixed = {**qwen, "use_sliding_window": True, "layer_types": ["full_attention"] * 3 + ["sliding_attention"]}
    assert model_config_from_hf(mixed).max_seq_len == 64
    assert "max_seq_len=128 exceeds the sliding window 64 that some layers" in error(mixed, max_seq_len=128)


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=37, d_model=30, n_layers=2, n_heads=5, n_kv_heads=1, d_ff=19, max_seq_len=48),
    ModelConfig(qkv_bias=True, tie_embeddings=True, rope_theta=1e6, rope_scaling="linear", rope_scaling_factor=2.0),
    ModelConfig(rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=2.0,
                rope_high_freq_factor=5.0, rope_original_max_len=100, norm_eps=1e-6, max_seq_len=1000),
    ModelConfig(rope_scaling="dynamic", rope_scaling_factor=2.0, rope_original_max_len=256, max_seq_len=256),
    ModelConfig(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=64, max_seq_len=256),
    ModelConfig(rope_scaling="yarn", rope_scaling_factor=3.0, rope_original_max_len=100, rope_beta_fast=8.0,
                rope_beta_slow=0.5, rope_attention_factor=1.25, rope_truncate=False, rope_theta=5e5),
])
def test_config_round_trip(cfg):
    assert model_config_from_hf(hf_config_from_model(cfg)) == cfg


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}


@pytest.mark.parametrize("rope, fields", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},  # the original length is max_position_embeddings
     dict(rope_scaling="dynamic", rope_scaling_factor=2.0, rope_original_max_len=2048)),
    ({"rope_parameters": {**YARN, "rope_theta": 1e6}},
     dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=512, rope_beta_fast=32.0,
          rope_beta_slow=1.0, rope_attention_factor=0.0, rope_truncate=True, rope_theta=1e6)),
    ({"rope_scaling": {**YARN, "beta_fast": 8, "beta_slow": 2, "truncate": False, "attention_factor": 1.5}},
     dict(rope_beta_fast=8.0, rope_beta_slow=2.0, rope_truncate=False, rope_attention_factor=1.5)),
    ({"rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}},  # transformers' DeepSeek ratio, as a number
     dict(rope_attention_factor=(0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))),
    ({"rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 256}},
     dict(rope_scaling_factor=8.0)),  # transformers: max_position_embeddings / original
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, dict(rope_original_max_len=2048)),
])
def test_hf_rope_import_export_import(rope, fields):
    cfg = model_config_from_hf({**LLAMA, **rope})
    for key, value in fields.items():
        assert getattr(cfg, key) == (value if isinstance(value, str) else pytest.approx(value, rel=1e-12)), key
    exported = hf_config_from_model(cfg)
    assert exported["rope_scaling"]["rope_type"] == cfg.rope_scaling
    assert model_config_from_hf(exported) == cfg
    assert hf_config_from_model(model_config_from_hf(exported)) == exported


def test_ntk_exports_as_plain_rope_at_its_theta():
    """Hugging Face has no static NTK type; the same frequencies are plain RoPE with theta * s^(H/(H-2))."""
    cfg = ModelConfig(rope_scaling="ntk", rope_scaling_factor=4.0, rope_theta=10_000.0)  # head_dim 32
    exported = hf_config_from_model(cfg)
    assert exported["rope_scaling"] is None
    assert exported["rope_theta"] == pytest.approx(10_000.0 * 4.0 ** (32 / 30), rel=1e-12)
    back = model_config_from_hf(exported)
    assert (back.rope_scaling, back.rope_theta) == ("none", exported["rope_theta"])
    np.testing.assert_array_equal(np.asarray(rope_inv_freq(32, back.rope_theta)),
                                  np.asarray(rope_inv_freq(32, 10_000.0, RopeScaling("ntk", 4.0))))
    assert hf_config_from_model(back) == exported


def test_dynamic_exports_its_original_length_as_max_position_embeddings():
    """transformers' dynamic NTK scales past max_position_embeddings: that key must hold the original length,
    so a longer model.max_seq_len is not carried (it reads back as the original length)."""
    cfg = ModelConfig(rope_scaling="dynamic", rope_scaling_factor=4.0, rope_original_max_len=128, max_seq_len=512)
    exported = hf_config_from_model(cfg, base={**LLAMA, "max_position_embeddings": 4096})
    assert (exported["max_position_embeddings"], exported["rope_scaling"]) == (128, {"rope_type": "dynamic",
                                                                                     "factor": 4.0})
    assert model_config_from_hf(exported) == dataclasses.replace(cfg, max_seq_len=128)
    assert model_config_from_hf(exported, max_seq_len=512) == cfg


def test_export_keeps_the_base_config_and_refuses_what_hf_cannot_hold():
    base = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None,
            "max_position_embeddings": 32768, "bos_token_id": 1, "eos_token_id": 2, "attention_dropout": 0.0}
    cfg = model_config_from_hf(base)
    out = hf_config_from_model(cfg, base=base)
    assert out["architectures"] == ["MistralForCausalLM"]
    assert (out["sliding_window"], out["max_position_embeddings"], out["eos_token_id"]) == (None, 32768, 2)
    as_llama = hf_config_from_model(cfg, family="llama", base=base)  # keeps token ids, not Mistral's keys
    assert "attention_dropout" not in as_llama and as_llama["max_position_embeddings"] == cfg.max_seq_len == 32768
    assert as_llama["bos_token_id"] == 1
    windowed = dataclasses.replace(cfg, sliding_window=16)
    assert hf_config_from_model(windowed)["architectures"] == ["MistralForCausalLM"]  # no base: Mistral
    assert hf_config_from_model(windowed, base=base)["sliding_window"] == 16
    qwen = hf_config_from_model(dataclasses.replace(windowed, qkv_bias=True))
    assert (qwen["use_sliding_window"], qwen["max_window_layers"], qwen["sliding_window"]) == (True, 0, 16)
    assert model_config_from_hf(qwen).sliding_window == 16
    with pytest.raises(InteropError, match="Llama has no sliding window"):
        hf_config_from_model(windowed, family="llama")
    with pytest.raises(InteropError, match="no attention sinks"):
        hf_config_from_model(dataclasses.replace(windowed, attention_sinks=4))
    with pytest.raises(InteropError, match="only Qwen2 has q/k/v biases"):
        hf_config_from_model(dataclasses.replace(cfg, qkv_bias=True), base=base)
    with pytest.raises(InteropError, match="no value head"):
        hf_config_from_model(dataclasses.replace(cfg, value_head=True))


@pytest.mark.parametrize("model, fragment", [
    ({"rope_scaling": "longrope"},
     "model.rope_scaling='longrope' is not allowed; choose one of: none, linear, llama3, ntk, dynamic, yarn"),
    ({"rope_scaling": "yarn", "rope_beta_fast": 1.0, "rope_beta_slow": 2.0}, "0 < beta_slow <= beta_fast"),
    ({"rope_scaling": "yarn", "rope_beta_slow": 0}, "model.rope_beta_slow=0.0 and model.rope_beta_fast=32.0"),
    ({"rope_scaling": "yarn", "rope_attention_factor": -1}, "model.rope_attention_factor=-1.0 must be >= 0"),
    ({"rope_scaling": "yarn", "rope_theta": 1}, "model.rope_theta=1.0 must exceed 1 for model.rope_scaling=yarn"),
    ({"rope_scaling": "dynamic", "rope_original_max_len": 0}, "model.rope_original_max_len=0 must be positive"),
    ({"rope_scaling": "ntk", "d_model": 8, "n_heads": 4, "n_kv_heads": 4}, "needs model.d_model/n_heads > 2"),
    ({"rope_scaling": "linear", "rope_scaling_factor": 0}, "model.rope_scaling_factor=0.0 must be positive"),
    ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 4.0}, "0 < low < high"),
    ({"rope_scaling": "llama3", "rope_original_max_len": 0}, "model.rope_original_max_len=0 must be positive"),
])
def test_rope_scaling_fields_are_validated(model, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        from_dict({"model": model})


def llama31_reference(head_dim, theta, factor, low, high, original):
    """The Llama 3.1 reference code's apply_scaling, written per frequency with its three branches."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(freq)
        elif wavelen > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_rope_frequencies_against_the_reference():
    for head_dim, theta, original in ((128, 500_000.0, 8192), (6, 10_000.0, 256), (64, 10_000.0, 2048)):
        want = llama31_reference(head_dim, theta, 8.0, 1.0, 4.0, original)
        got = rope_inv_freq(head_dim, theta, RopeScaling("llama3", 8.0, 1.0, 4.0, original))
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)
    plain = np.asarray(rope_inv_freq(16, 10_000.0))
    np.testing.assert_allclose(np.asarray(rope_inv_freq(16, 10_000.0, RopeScaling("linear", 4.0))), plain / 4)
    np.testing.assert_allclose(plain, 10_000.0 ** -(np.arange(0, 16, 2) / 16), rtol=2e-6)
