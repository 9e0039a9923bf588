"""`model.*`: the decoder's shape and numerics, and the named sizes (presets)."""
from __future__ import annotations

import dataclasses

from jaxlm.config.schema import ConfigError, check


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # decoder (causal; a prefix decoder is this with a bidirectional prefix) | encoder_decoder (T5's
    # layout, jaxlm.model.encdec: a bidirectional encoder, and a decoder of n_layers blocks with
    # cross-attention to it)
    arch: str = "decoder"
    n_encoder_layers: int = 0  # encoder_decoder: the encoder's blocks; 0: n_layers
    vocab_size: int = 512  # token ids [0, vocab_size): the tokenizer's size
    d_model: int = 128  # width of the residual stream
    n_layers: int = 4  # decoder blocks
    n_heads: int = 4  # query heads; head dim = d_model / n_heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention; = n_heads: multi-head)
    d_ff: int = 352  # the gated feed-forward's hidden width
    # the gated feed-forward's gate, down(act(gate(x)) * up(x)): silu (SwiGLU, LLaMA) | gelu_tanh
    # (GeGLU with the tanh-approximate GELU: T5 v1.1's and UL2's gated-gelu)
    activation: str = "silu"
    max_seq_len: int = 256  # the longest sequence the model is made for (train.seq_len <= it)
    # rope (rotary embeddings on queries and keys) | t5_relative (T5's learned bias per head on the
    # attention logits, by bucket of relative distance: one bucket per distance up to a quarter of
    # relative_buckets (encoder, both ways) or half (decoder), then logarithmic up to
    # relative_max_distance; one table per stack; model.arch=encoder_decoder only)
    position: str = "rope"
    relative_buckets: int = 32  # t5_relative: buckets of relative distance (half each way in the encoder)
    relative_max_distance: int = 128  # t5_relative: distances from here on share the last bucket
    rope_theta: float = 10_000.0  # RoPE base: frequencies theta^(-2i/head_dim)
    # RoPE frequency scaling for long context (`jaxlm.model.attention.rope_inv_freq`):
    # none | linear (every frequency / factor: Position Interpolation) | llama3 (Llama 3.1: low
    # frequencies / factor, high ones kept, a smooth blend between, by wavelength relative to
    # rope_original_max_len) | ntk (NTK-aware: theta * factor^(H/(H-2))) | dynamic (Hugging Face's
    # dynamic NTK: ntk's base for the batch's length L once L > rope_original_max_len, plain RoPE
    # below) | yarn (YaRN: ramp between kept and / factor frequencies, sin and cos times an
    # attention factor).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0  # how many times longer the context becomes (rope_scaling)
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3, dynamic, yarn: the context length before scaling
    # yarn only: frequencies turning more than beta_fast times over rope_original_max_len are kept,
    # fewer than beta_slow times divided by factor; the ramp's bounds are rounded out (truncate)
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0  # yarn only: see rope_beta_fast
    rope_attention_factor: float = 0.0  # yarn only; 0: 0.1 * ln(factor) + 1
    rope_truncate: bool = True  # yarn only: round the ramp's bounds out to whole pairs
    # Local attention (`jaxlm.model.attention.in_window`): each token sees the last sliding_window
    # positions, itself included (Mistral), and with attention_sinks > 0 also the first
    # attention_sinks positions of its sequence (the Lambda-shaped window of LM-Infinite and
    # StreamingLLM). The KV cache then holds attention_sinks + sliding_window columns, so
    # generation runs past max_seq_len at constant memory. 0: off.
    sliding_window: int = 0
    attention_sinks: int = 0  # first positions every token also sees; needs sliding_window
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # the output head is the embedding table's transpose
    qkv_bias: bool = False  # biases on q, k and v (Qwen2)
    dtype: str = "auto"  # compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU
    param_dtype: str = "float32"
    remat: str = "none"  # none | dots | full
    # true: the layers run as one jax.lax.scan over their stacked params (compile time does
    # not grow with depth); false: a Python loop over per-layer slices, which compiles longer
    # but saves the scan's copies of every layer's activations into stacked buffers (faster
    # for shallow models; same params and checkpoints either way).
    scan_layers: bool = True
    scan_unroll: int = 1  # layers per scan iteration: more compiles longer, may run faster
    # auto: on CPU causal blocks where the mask allows; on a CUDA GPU cuDNN flash attention for
    # a plain causal mask in bf16/fp16; jax.nn.dot_product_attention's XLA path otherwise |
    # blocks (causal blocks, skipping the upper triangle, on any backend where the mask
    # allows) | cudnn (as auto on GPU; an error where cuDNN cannot run) | reference (plain
    # einsum). `jaxlm.model.attention.kernel` decides; `jaxlm bench` prints its choice.
    attention: str = "auto"
    init_std: float = 0.02  # standard deviation of the normal initialisation of the weights
    value_head: bool = False  # a scalar-per-token head (reward model, PPO critic)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> str:
        """`dtype` with "auto" resolved for the default backend."""
        if self.dtype != "auto":
            return self.dtype
        import jax

        return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# LLaMA shapes (Touvron et al. 2023, table 2; LLaMA-2 70B for GQA with 8 kv heads).
_PRESETS = {
    "tiny": ModelConfig(),
    "125m": ModelConfig(vocab_size=32_000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        d_ff=2048, max_seq_len=2048),
    "1b": ModelConfig(vocab_size=32_000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16,
                      d_ff=5632, max_seq_len=2048),
    "7b": ModelConfig(vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      d_ff=11_008, max_seq_len=2048, norm_eps=1e-6),
    "70b": ModelConfig(vocab_size=32_000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       d_ff=28_672, max_seq_len=4096, norm_eps=1e-5),
}
# T5 v1.1's encoder-decoders (Raffel et al. 2020; the v1.1 release: gated GELU, untied head), the
# parameter counts of google/t5-v1_1-base and -large (247.6M, 783.2M). Its small size has 6 heads of
# 64 on d_model 512, which jaxlm's head_dim = d_model / n_heads cannot hold.
_T5 = dict(arch="encoder_decoder", position="t5_relative", activation="gelu_tanh", vocab_size=32_128,
           max_seq_len=512, norm_eps=1e-6)
_PRESETS.update({
    "t5-base": ModelConfig(**_T5, d_model=768, n_layers=12, n_encoder_layers=12, n_heads=12, n_kv_heads=12,
                           d_ff=2048),
    "t5-large": ModelConfig(**_T5, d_model=1024, n_layers=24, n_encoder_layers=24, n_heads=16, n_kv_heads=16,
                            d_ff=2816),
})
PRESET_NAMES = tuple(_PRESETS)


def model_preset(name: str) -> ModelConfig:
    """The `ModelConfig` of a named size: tiny, 125m, 1b, 7b, 70b (decoders), t5-base, t5-large."""
    if name not in _PRESETS:
        raise ConfigError(f"model.preset={name!r} is not a preset; allowed: {', '.join(_PRESETS)}")
    return _PRESETS[name]



CHOICES = {
    "model.arch": ("decoder", "encoder_decoder"),
    "model.position": ("rope", "t5_relative"),
    "model.activation": ("silu", "gelu_tanh"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "dots", "full"),
    "model.attention": ("auto", "blocks", "cudnn", "reference"),
    "model.rope_scaling": ("none", "linear", "llama3", "ntk", "dynamic", "yarn"),
}


def validate(m: ModelConfig) -> None:
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                "scan_unroll"):
        check(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    check(m.d_model % m.n_heads == 0,
          f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}")
    check(m.n_heads % m.n_kv_heads == 0,
          f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    check(m.head_dim % 2 == 0, f"model.d_model/n_heads={m.head_dim} must be even for RoPE")
    check(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be positive")
    check(m.n_encoder_layers >= 0, f"model.n_encoder_layers={m.n_encoder_layers} must be >= 0 (0: model.n_layers)")
    if m.arch == "encoder_decoder":
        for key in ("value_head", "sliding_window"):
            check(not getattr(m, key), f"model.{key}={getattr(m, key)} is not supported with "
                  f"model.arch=encoder_decoder yet; allowed: model.arch=decoder")
    if m.position == "t5_relative":
        check(m.arch == "encoder_decoder", "model.position=t5_relative is for model.arch=encoder_decoder; "
              "allowed with model.arch=decoder: model.position=rope")
        check(m.rope_scaling == "none", f"model.rope_scaling={m.rope_scaling} scales RoPE, which "
              "model.position=t5_relative does not use; allowed: none")
        check(m.attention in ("auto", "reference"), f"model.attention={m.attention} has no attention bias "
              "(model.position=t5_relative); allowed: auto, reference")
        check(m.relative_buckets >= 4, f"model.relative_buckets={m.relative_buckets} must be >= 4")
        check(m.relative_max_distance > m.relative_buckets // 2,
              f"model.relative_max_distance={m.relative_max_distance} must exceed model.relative_buckets / 2 "
              f"= {m.relative_buckets // 2} (the decoder's distances that keep a bucket each)")
    check(m.sliding_window >= 0, f"model.sliding_window={m.sliding_window} must be >= 0 (0: off)")
    check(m.attention_sinks >= 0, f"model.attention_sinks={m.attention_sinks} must be >= 0 (0: none)")
    check(m.attention_sinks == 0 or m.sliding_window > 0,
          f"model.attention_sinks={m.attention_sinks} needs model.sliding_window > 0 (sinks belong to a window)")
    if m.rope_scaling != "none":
        check(m.rope_scaling_factor > 0, f"model.rope_scaling_factor={m.rope_scaling_factor} must be positive")
    if m.rope_scaling == "llama3":
        check(0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
              f"model.rope_low_freq_factor={m.rope_low_freq_factor} and model.rope_high_freq_factor="
              f"{m.rope_high_freq_factor} must satisfy 0 < low < high")
    if m.rope_scaling in ("llama3", "dynamic", "yarn"):
        check(m.rope_original_max_len > 0,
              f"model.rope_original_max_len={m.rope_original_max_len} must be positive")
    if m.rope_scaling in ("ntk", "dynamic"):
        check(m.head_dim > 2, f"model.rope_scaling={m.rope_scaling} needs model.d_model/n_heads > 2 "
              f"(theta * factor^(H/(H-2))); got {m.head_dim}")
    if m.rope_scaling == "yarn":
        check(m.rope_theta > 1, f"model.rope_theta={m.rope_theta} must exceed 1 for model.rope_scaling=yarn")
        check(0 < m.rope_beta_slow <= m.rope_beta_fast,
              f"model.rope_beta_slow={m.rope_beta_slow} and model.rope_beta_fast={m.rope_beta_fast} must "
              f"satisfy 0 < beta_slow <= beta_fast")
        check(m.rope_attention_factor >= 0, f"model.rope_attention_factor={m.rope_attention_factor} must be "
              f">= 0 (0: 0.1 * ln(factor) + 1)")
