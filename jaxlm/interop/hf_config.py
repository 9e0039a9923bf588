"""Hugging Face `config.json` <-> jaxlm `ModelConfig` for the Llama, Qwen2 and Mistral families, and
T5 (v1.1 and UL2's gated feed-forward) as `model.arch: encoder_decoder`.

Pure functions of dicts. Both spellings of RoPE settings are read: `rope_theta` and
`rope_scaling` (transformers 4) and `rope_parameters` (transformers 5); the legacy spelling
is written, which both read. Anything jaxlm cannot reproduce exactly raises `InteropError`
naming the key and what is supported.
"""
from __future__ import annotations

from typing import Optional

from jaxlm.config import Config, ConfigError, ModelConfig, TrainConfig, validate
from jaxlm.model.attention import ntk_theta, yarn_mscale

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
                 "T5ForConditionalGeneration": "t5"}
FAMILIES = {family: arch for arch, family in ARCHITECTURES.items()}
# transformers' defaults for keys a config.json may leave out
_DEFAULT_MAX_LEN = {"llama": 2048, "qwen2": 32768, "mistral": 131072}
_ROPE_KINDS = {"default": "none", "linear": "linear", "llama3": "llama3", "dynamic": "dynamic", "yarn": "yarn"}
_SILU = ("silu", "swish")


class InteropError(ConfigError):
    """A checkpoint or model jaxlm cannot convert exactly; the message names what and why."""


def family_of(hf: dict) -> str:
    """llama | qwen2 | mistral, from `architectures` (or `model_type` when that is absent)."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    supported = ", ".join(ARCHITECTURES)
    if archs:
        raise InteropError(f"architecture {archs[0]!r} is not supported; supported: {supported}")
    if hf.get("model_type") in FAMILIES:
        return hf["model_type"]
    raise InteropError(f"config.json names no supported architecture (model_type={hf.get('model_type')!r}); "
                       f"supported: {supported}")


def _value(hf: dict, key: str, default=None):
    value = hf.get(key)
    return default if value is None else value


def _required(hf: dict, key: str):
    if hf.get(key) is None:
        raise InteropError(f"config.json lacks {key!r}")
    return hf[key]


def rope_fields(hf: dict, max_position_embeddings: int) -> dict:
    """The ModelConfig rope_* fields of an HF config (either transformers spelling).

    As transformers reads them: llama3's and yarn's original length defaults to
    max_position_embeddings, which is dynamic's; yarn's factor to max_position_embeddings over
    the original length, its betas to 32 and 1, and its attention factor (cos and sin times it)
    to 0.1 ln(factor) + 1, or mscale / mscale_all_dim's ratio (DeepSeek), kept as the number.
    """
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise InteropError(f"rope_parameters per layer type ({', '.join(params)}) are not supported")
    if isinstance(params, dict):
        theta, scaling = params.get("rope_theta", hf.get("rope_theta")), params
    else:
        theta, scaling = hf.get("rope_theta"), hf.get("rope_scaling") or {}
    out = {"rope_theta": float(10_000.0 if theta is None else theta)}
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    if kind not in _ROPE_KINDS:
        raise InteropError(f"rope scaling type {kind!r} is not supported; supported: "
                           f"{', '.join(k for k in _ROPE_KINDS if k != 'default')} (or none)")
    for key in ("partial_rotary_factor",) + (() if kind == "yarn" else ("attention_factor",)):
        value = scaling.get(key, hf.get(key))
        if value not in (None, 1, 1.0):
            raise InteropError(f"{key}={value} is not supported (RoPE on every dimension, unscaled attention)")
    out["rope_scaling"] = _ROPE_KINDS[kind]

    def need(key):
        if scaling.get(key) is None:
            raise InteropError(f"rope scaling {kind!r} lacks {key!r}")
        return scaling[key]

    original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    if kind in ("linear", "llama3", "dynamic"):
        out["rope_scaling_factor"] = float(need("factor"))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(need("low_freq_factor")),
                   rope_high_freq_factor=float(need("high_freq_factor")), rope_original_max_len=original)
    if kind == "dynamic":  # transformers' dynamic NTK scales beyond max_position_embeddings
        out["rope_original_max_len"] = int(max_position_embeddings)
    if kind == "yarn":
        factor = scaling.get("factor")
        factor = float(max_position_embeddings / original if factor is None else factor)
        out.update(rope_scaling_factor=factor, rope_original_max_len=original,
                   rope_beta_fast=float(scaling.get("beta_fast") or 32),
                   rope_beta_slow=float(scaling.get("beta_slow") or 1),
                   rope_truncate=bool(scaling.get("truncate", True)),
                   rope_attention_factor=_yarn_attention_factor(scaling, factor))
    return out


def _yarn_attention_factor(scaling: dict, factor: float) -> float:
    """yarn's `attention_factor` as given, or mscale / mscale_all_dim's (DeepSeek) as transformers
    computes it; 0.0 (jaxlm's default formula, 0.1 ln(factor) + 1) when neither is there."""
    value = scaling.get("attention_factor")
    if value is not None:
        if value <= 0:
            raise InteropError(f"rope scaling 'yarn' attention_factor={value} is not supported; it must be positive")
        return float(value)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        return 0.0
    return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))


def sliding_window(hf: dict, family: str) -> Optional[int]:
    """The attention window some layers use, or None when every layer attends to all positions
    (Llama has none: transformers ignores the key there)."""
    window = hf.get("sliding_window")
    if not window or family == "llama" or (family == "qwen2" and not hf.get("use_sliding_window")):
        return None
    if hf.get("layer_types") is not None:
        return window if "sliding_attention" in hf["layer_types"] else None
    if family == "qwen2":  # layers from max_window_layers on
        return window if _value(hf, "max_window_layers", 28) < _required(hf, "num_hidden_layers") else None
    return window


def every_layer_slides(hf: dict, family: str) -> bool:
    """Whether the sliding window applies to every layer (jaxlm's `model.sliding_window` does):
    Mistral's does; Qwen2's from layer max_window_layers on; `layer_types` says per layer."""
    if sliding_window(hf, family) is None:
        return False
    if hf.get("layer_types") is not None:
        return all(kind == "sliding_attention" for kind in hf["layer_types"])
    return family != "qwen2" or _value(hf, "max_window_layers", 28) <= 0


def model_config_from_hf(hf: dict, *, param_dtype: str = "float32",
                         max_seq_len: Optional[int] = None) -> ModelConfig:
    """The jaxlm ModelConfig of an HF config.

    `max_seq_len` defaults to `max_position_embeddings`. A sliding window on every layer becomes
    `model.sliding_window`. jaxlm's window is the same for every layer: a model whose window is on
    some layers only is imported with max_seq_len = the window (where the window never binds, so
    results are exact); asking for more is an error.
    """
    family = family_of(hf)
    if hf.get("quantization_config"):
        raise InteropError("quantized checkpoints (quantization_config) are not supported")
    if family == "t5":
        return t5_model_config(hf, param_dtype=param_dtype, max_seq_len=max_seq_len)
    D, N = _required(hf, "hidden_size"), _required(hf, "num_attention_heads")
    if D % N:
        raise InteropError(f"hidden_size={D} is not a multiple of num_attention_heads={N}")
    if hf.get("head_dim") not in (None, D // N):
        raise InteropError(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads={D // N}; "
                           "jaxlm derives head_dim = d_model / n_heads")
    act = _value(hf, "hidden_act", "silu")
    if act not in _SILU:
        raise InteropError(f"hidden_act={act!r} is not supported; supported: silu (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise InteropError(f"{key}=true is not supported for {FAMILIES[family]} "
                               "(jaxlm has biases on q, k, v only, as in Qwen2)")
    max_len = int(_value(hf, "max_position_embeddings", _DEFAULT_MAX_LEN[family]))
    rope = rope_fields(hf, max_len)
    window = sliding_window(hf, family)
    every_layer = every_layer_slides(hf, family)
    if max_seq_len is not None:
        if window is not None and not every_layer and max_seq_len > window:
            raise InteropError(f"max_seq_len={max_seq_len} exceeds the sliding window {window} that some "
                               f"layers of this {FAMILIES[family]} use; jaxlm's window applies to every "
                               f"layer or none, so sequences must stay within {window}")
        max_len = max_seq_len
    elif window is not None and not every_layer:
        max_len = min(max_len, window)
    cfg = ModelConfig(
        vocab_size=_required(hf, "vocab_size"), d_model=D, n_layers=_required(hf, "num_hidden_layers"),
        n_heads=N, n_kv_heads=_value(hf, "num_key_value_heads", N),
        d_ff=_required(hf, "intermediate_size"), max_seq_len=max_len,
        norm_eps=float(_value(hf, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_value(hf, "tie_word_embeddings", False)),
        qkv_bias=family == "qwen2", param_dtype=param_dtype, sliding_window=window if every_layer else 0, **rope)
    return _validated(cfg)


# T5's gated feed-forward activations (transformers' names, "gated-gelu" meaning gelu_new) -> jaxlm's
_T5_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


def t5_output_scaled(hf: dict) -> bool:
    """Whether a T5 checkpoint scales the decoder's output by d_model^-0.5 before the head:
    transformers 5's `scale_decoder_outputs`, else (transformers 4) whether the head is tied."""
    if hf.get("scale_decoder_outputs") is not None:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings") is not False


def _validated(cfg: ModelConfig) -> ModelConfig:
    """`cfg`, having passed jaxlm's own limits (e.g. an odd head_dim, which rotate-half RoPE cannot pair)."""
    validate(Config(model=cfg, train=TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len))))
    return cfg


def t5_model_config(hf: dict, *, param_dtype: str = "float32", max_seq_len: Optional[int] = None) -> ModelConfig:
    """The jaxlm encoder-decoder of a T5 config.json (`model_config_from_hf` calls it).

    T5 has no positions limit: `max_seq_len` defaults to 512, the length it was pretrained at. The
    head is tied as `tie_word_embeddings` says; transformers 5 writes true for every T5, so
    `load_hf` decides by whether the checkpoint holds an `lm_head.weight`.
    """
    D, N = _required(hf, "d_model"), _required(hf, "num_heads")
    d_kv = int(_value(hf, "d_kv", 64))
    if d_kv * N != D:
        raise InteropError(f"d_kv={d_kv} x num_heads={N} = {d_kv * N} differs from d_model={D}; jaxlm derives "
                           "head_dim = d_model / n_heads")
    proj = _value(hf, "feed_forward_proj", "relu")
    gated, act = proj.startswith("gated-"), proj.split("-")[-1]
    act = "gelu_new" if proj == "gated-gelu" else act
    if not gated or act not in _T5_ACTIVATIONS:
        raise InteropError(f"feed_forward_proj={proj!r} is not supported; supported: gated-gelu (T5 v1.1, UL2), "
                           "gated-silu (jaxlm's feed-forward is gated)")
    pad, start = _value(hf, "pad_token_id", 0), _value(hf, "decoder_start_token_id", 0)
    if start != pad:
        raise InteropError(f"decoder_start_token_id={start} differs from pad_token_id={pad}; jaxlm's "
                           "encoder-decoder starts decoding from the pad id")
    n_encoder = int(_required(hf, "num_layers"))
    tied = hf.get("tie_word_embeddings") is not False
    cfg = ModelConfig(
        arch="encoder_decoder", position="t5_relative", vocab_size=_required(hf, "vocab_size"), d_model=D,
        n_layers=int(_value(hf, "num_decoder_layers", n_encoder)), n_encoder_layers=n_encoder, n_heads=N,
        n_kv_heads=N, d_ff=_required(hf, "d_ff"), max_seq_len=max_seq_len or 512,
        norm_eps=float(_value(hf, "layer_norm_epsilon", 1e-6)), tie_embeddings=tied,
        activation=_T5_ACTIVATIONS[act], relative_buckets=int(_value(hf, "relative_attention_num_buckets", 32)),
        relative_max_distance=int(_value(hf, "relative_attention_max_distance", 128)), param_dtype=param_dtype)
    return _validated(cfg)


def t5_hf_config(cfg: ModelConfig, base: Optional[dict] = None, dtype: str = "float32") -> dict:
    """The T5 config.json of a jaxlm encoder-decoder (`hf_config_from_model` calls it); `base`, a T5
    config.json it came from, supplies the keys jaxlm does not model."""
    if cfg.position != "t5_relative":
        raise InteropError(f"model.position={cfg.position}: Hugging Face's T5 has relative position buckets; "
                           "export needs model.position=t5_relative")
    if cfg.n_kv_heads != cfg.n_heads:
        raise InteropError(f"model.n_kv_heads={cfg.n_kv_heads}: T5 has as many key/value heads as query heads "
                           f"(model.n_heads={cfg.n_heads})")
    if cfg.qkv_bias:
        raise InteropError("model.qkv_bias=true: T5 has no biases")
    out = {k: v for k, v in (base or {}).items() if k not in _REPLACED + ("dense_act_fn", "is_gated_act")}
    if out.get("model_type") != "t5":
        out = {k: v for k, v in out.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    out.update(
        architectures=["T5ForConditionalGeneration"], model_type="t5", is_encoder_decoder=True,
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_heads=cfg.n_heads,
        num_layers=cfg.n_encoder_layers or cfg.n_layers, num_decoder_layers=cfg.n_layers,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj={"gelu_tanh": "gated-gelu", "silu": "gated-silu"}[cfg.activation],
        tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.tie_embeddings, torch_dtype=dtype)
    out["decoder_start_token_id"] = out.setdefault("pad_token_id", 0)
    return out


_REPLACED = ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype", "transformers_version",
             "_name_or_path", "head_dim")


def hf_config_from_model(cfg: ModelConfig, family: Optional[str] = None, base: Optional[dict] = None,
                         dtype: str = "float32") -> dict:
    """The HF config.json of a jaxlm model.

    `base` (the config.json it was imported from, if any) supplies the family and every key
    jaxlm does not model (token ids, sliding window, ...); `family` overrides it; without
    either, a model with q/k/v biases is Qwen2 and any other Llama.
    """
    if cfg.value_head:
        raise InteropError("model.value_head=true: Hugging Face causal-LM checkpoints have no value head")
    family = family or (family_of(base) if base else None)
    if cfg.arch == "encoder_decoder" or family == "t5":
        if cfg.arch != "encoder_decoder" or family not in (None, "t5"):
            raise InteropError(f"family {family!r} does not fit model.arch={cfg.arch}; the encoder-decoder "
                               "exports as t5, the decoder as llama, qwen2 or mistral")
        return t5_hf_config(cfg, base, dtype)
    if cfg.activation != "silu":
        raise InteropError(f"model.activation={cfg.activation}: Hugging Face's Llama, Qwen2 and Mistral have "
                           "SwiGLU (silu) feed-forwards")
    family = family or ("qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama")
    if family not in FAMILIES:
        raise InteropError(f"family {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    if cfg.attention_sinks:
        raise InteropError(f"model.attention_sinks={cfg.attention_sinks}: Hugging Face's Llama, Qwen2 and "
                           "Mistral have no attention sinks")
    if cfg.sliding_window and family == "llama":
        raise InteropError(f"model.sliding_window={cfg.sliding_window}: Hugging Face's Llama has no sliding "
                           "window; export as mistral (or qwen2 for a model with q/k/v biases)")
    if cfg.qkv_bias != (family == "qwen2"):
        raise InteropError(f"model.qkv_bias={str(cfg.qkv_bias).lower()} does not fit {FAMILIES[family]} "
                           "(only Qwen2 has q/k/v biases)")
    out = {k: v for k, v in (base or {}).items() if k not in _REPLACED}
    if out.get("model_type") != family:  # another family's extra keys do not carry over
        out = {k: v for k, v in out.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    theta, scaling = hf_rope(cfg)
    max_len = max(int(out.get("max_position_embeddings") or 0), cfg.max_seq_len)
    if cfg.rope_scaling == "dynamic":  # the length transformers' dynamic NTK scales beyond
        max_len = cfg.rope_original_max_len
    out.update(
        architectures=[FAMILIES[family]], model_type=family, vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=max_len, rope_theta=theta, rope_scaling=scaling, torch_dtype=dtype)
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.sliding_window and family == "qwen2":
        out.update(use_sliding_window=True, max_window_layers=0, layer_types=["sliding_attention"] * cfg.n_layers)
    if cfg.sliding_window:
        out["sliding_window"] = cfg.sliding_window
    else:  # a window on some layers only (imported with max_seq_len inside it) stays as it was
        if family in ("qwen2", "mistral"):
            out.setdefault("sliding_window", None)
        if family == "qwen2":
            out.setdefault("use_sliding_window", False)
    return out


def hf_rope(cfg: ModelConfig) -> tuple[float, Optional[dict]]:
    """`rope_theta` and `rope_scaling` of the HF config of a jaxlm model.

    ntk has no Hugging Face type: it is written as the plain RoPE it is, rope_theta = theta *
    factor^(H/(H-2)) (the same frequencies; it reads back as rope_scaling none with that theta).
    dynamic's original length is written as max_position_embeddings, where transformers reads it.
    """
    kind, factor = cfg.rope_scaling, cfg.rope_scaling_factor
    if kind == "none":
        return cfg.rope_theta, None
    if kind == "ntk":
        return float(ntk_theta(cfg.rope_theta, factor, cfg.head_dim)), None
    scaling = {"rope_type": kind, "factor": factor}
    if kind == "llama3":
        scaling.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                       original_max_position_embeddings=cfg.rope_original_max_len)
    if kind == "yarn":
        scaling.update(original_max_position_embeddings=cfg.rope_original_max_len, beta_fast=cfg.rope_beta_fast,
                       beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
        if cfg.rope_attention_factor:
            scaling["attention_factor"] = float(cfg.rope_attention_factor)
    return cfg.rope_theta, scaling


def describe(cfg: ModelConfig) -> str:
    """One line of the fields that set a model's shape."""
    keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "rope_theta",
            "rope_scaling", "tie_embeddings", "qkv_bias")
    return " ".join(f"{k}={getattr(cfg, k)}" for k in keys)
