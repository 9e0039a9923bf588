"""`jaxlm plan`: size a run before buying it. Pure arithmetic on the config, no devices.

Per device, for the mesh the config names over `devices` devices:

- parameters, gradients and optimizer state: each tensor's shard under the logical-axis
  table (`jaxlm.sharding.RULES`) and, for the ZeRO presets, `jaxlm.sharding.optimizer_spec`,
  exactly as the train step lays them out (a dimension a mesh axis does not divide stays whole):
  params as the table says; the optimizer state split over data x fsdp under zero1 and zero2,
  the gradients too under zero2, both as the params otherwise (the ZeRO paper's formula: the
  table in `jaxlm.sharding`). AdamW keeps two float32 moments per parameter, Adafactor about one
  factored row + column per matrix (counted as such). Gradients: one micro-batch's, where the
  step reduces them to, in the param dtype.
- activations saved for the backward pass of one micro-batch (an estimate, in the compute
  dtype, the local batch b = batch / grad_accum / batch shards, sequence T), per layer:
  remat none ~ b*T*(10D + 2KH + 4F) values (inputs of every matmul and norm; attention's
  T x T scores are not kept: flash-style kernels recompute them; XLA's CPU path does keep
  them), dots ~ b*T*(4D + 2KH + 2F) (the matmul outputs and the layer input), full ~ b*T*D
  (the layer input), the last two plus one layer rebuilt during the backward pass; plus the
  logits b*T*V in float32 unless `train.loss_chunk` (then b*chunk*V). Context parallelism
  (`mesh.sequence` = s > 1) leaves each device T/s positions of every sequence: activations and
  logits / s, plus the keys and values that attention all-gathers, 2*b*T*KH per layer (saved for
  the backward pass in every layer under remat none, rebuilt one layer at a time otherwise).
  Pipeline parallelism (`mesh.stage` = S > 1, M microbatches, R repeats) leaves each device L/S
  layers of every microbatch: activations / S, times the schedule's iterations over its useful
  ones, (R M + S - 1) / (R M) (the bubble's slots also keep what they computed).
- compute C = 6 * N * D_tokens (N matmul parameters; attention adds 6*L*T*d per token,
  included in the FLOPs per token below), the Chinchilla-optimal token count ~20 N
  (Hoffmann et al. 2022), and the time to train `tokens` at a given MFU of `peak` FLOP/s. An
  encoder-decoder's token is a column of its rows, one encoder and one decoder token
  (`jaxlm.perf.encoder_decoder_flops`). Under a pipeline the layers' share takes 1 / (1 - bubble)
  as long, bubble = (S - 1) / (R M + S - 1), and the head's FLOPs (6 D V per token) run on every
  stage's devices alike.
"""
from __future__ import annotations

import math

from jaxlm import perf
from jaxlm.config import Config, ConfigError

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def mesh_sizes(cfg: Config, devices: int) -> dict[str, int]:
    sizes = {"stage": cfg.mesh.stage, "data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "sequence": cfg.mesh.sequence,
             "tensor": cfg.mesh.tensor}
    known = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
        if v == -1:
            if devices % known:
                raise ConfigError(f"mesh {sizes} does not divide --devices {devices}")
            sizes[k] = devices // known
    if math.prod(sizes.values()) != devices:
        raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices, not --devices {devices}")
    return sizes


def plan(cfg: Config, devices: int, mfu: float = 0.4, peak_tflops: float = 0.0,
         tokens: float = 0.0) -> dict:
    """The numbers `jaxlm plan` prints (bytes per device; FLOPs; seconds)."""
    import jax

    from jaxlm import model, sharding
    from jaxlm.config import pipeline_microbatches
    from jaxlm.model.pipeline import Schedule

    m, t = cfg.model, cfg.train
    sizes = mesh_sizes(cfg, devices)
    rules = cfg.mesh.rules
    shapes, axes = model.abstract_params(m), model.logical_axes(m)
    leaves = zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)))
    p_bytes = _DTYPE_BYTES[m.param_dtype]
    elems = []  # (param shard, optimizer-state shard, shape) elements per device
    for a, names in leaves:
        p_spec = sharding.spec(sizes, rules, a.shape, names)
        o_spec = sharding.optimizer_spec(sizes, rules, a.shape, p_spec)
        elems.append((math.prod(sharding.shard_shape(sizes, p_spec, a.shape)),
                      math.prod(sharding.shard_shape(sizes, o_spec, a.shape)), a.shape))
    params = sum(n for n, _, _ in elems) * p_bytes
    grads = sum(o if sharding.ZERO.get(rules, 0) >= 2 else n for n, o, _ in elems) * p_bytes
    if cfg.optim.name == "adamw":
        opt = sum(o for _, o, _ in elems) * 4 * 2
    else:  # adafactor: factored second moment for matrices (row + column), full for vectors
        opt = sum((n // shape[-1] + n // shape[-2] if len(shape) >= 2 else o) * 4 for n, o, shape in elems)
    batch_shards = sizes["data"] * sizes["fsdp"]
    b = max(t.batch_size // t.grad_accum_steps // batch_shards, 1)
    T, D, F, KH = t.seq_len, m.d_model, m.d_ff, m.n_kv_heads * m.head_dim
    per_layer = {"none": 10 * D + 2 * KH + 4 * F, "dots": 4 * D + 2 * KH + 2 * F, "full": D}[m.remat]
    c_bytes = _DTYPE_BYTES["bfloat16" if m.dtype == "auto" else m.dtype]
    tensor = sizes["tensor"] if rules == "fsdp_tp" else 1
    seq = sizes["sequence"]  # every preset splits the activations' sequence over it
    schedule = Schedule(sizes["stage"], pipeline_microbatches(cfg), cfg.mesh.repeats)
    staged = schedule.iterations / (schedule.repeats * schedule.microbatches) / schedule.stages
    acts = b * T * per_layer * m.n_layers * c_bytes / tensor / seq * staged
    if m.remat != "none":  # the backward pass rebuilds one layer's activations at a time
        acts += b * T * (10 * D + 2 * KH + 4 * F) * c_bytes / tensor / seq
    kv_gathered = 0.0
    if seq > 1:  # context parallelism: each layer's whole-sequence keys and values
        kv_tensor = tensor if m.n_heads % tensor == 0 and m.n_kv_heads % tensor == 0 else 1
        kv_gathered = 2 * b * T * KH * c_bytes / kv_tensor * (m.n_layers if m.remat == "none" else 1)
    logits = b * (min(t.loss_chunk, T) if t.loss_chunk else T) * m.vocab_size * 4 / tensor / seq
    n_matmul = perf.matmul_params(m)
    fpt = perf.flops_per_token(m, T)
    tokens = tokens or 20.0 * n_matmul
    peak = (peak_tflops or _default_peak()) * 1e12
    head = 6.0 * D * m.vocab_size  # FLOPs per token of the output projection
    fpt_staged = (fpt - head) / (1 - schedule.bubble) + head * schedule.stages if schedule.stages > 1 else fpt
    seconds = fpt_staged * tokens / (mfu * peak * devices)
    return {"mesh": sizes, "rules": rules, "params_total": model.param_count(m), "params_matmul": n_matmul,
            "local_batch": b, "bytes_params": params, "bytes_grads": grads, "bytes_optimizer": opt,
            "bytes_activations": acts, "bytes_kv_gathered": kv_gathered, "bytes_logits": logits,
            "bytes_total": params + grads + opt + acts + kv_gathered + logits,
            "flops_per_token": fpt, "chinchilla_tokens": 20.0 * n_matmul, "tokens": tokens,
            "compute_flops": 6.0 * n_matmul * tokens, "train_flops": fpt * tokens,
            "peak_tflops_per_device": peak / 1e12, "mfu": mfu, "seconds": seconds,
            "pipeline": schedule._asdict() | {"bubble": schedule.bubble}}


def _default_peak() -> float:
    """bf16 dense peak of an H100 SXM (989 TFLOP/s), the usual reference when none is given."""
    return 989.0


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def format_plan(p: dict) -> str:
    days = p["seconds"] / 86400
    lines = [
        f"mesh {p['mesh']}, rules {p['rules']}  (local batch {p['local_batch']} sequences per micro-batch)",
        f"parameters {p['params_total'] / 1e9:.3f} B ({p['params_matmul'] / 1e9:.3f} B in matmuls)",
        "per device:",
        f"  parameters   {_gib(p['bytes_params'])}",
        f"  gradients    {_gib(p['bytes_grads'])}",
        f"  optimizer    {_gib(p['bytes_optimizer'])}",
        f"  activations  {_gib(p['bytes_activations'])}  (estimate; see `jaxlm.plan`)",
        *([f"  gathered K/V {_gib(p['bytes_kv_gathered'])}  (context parallelism: 2*b*T*K*H per saved layer)"]
          if p["bytes_kv_gathered"] else []),
        f"  logits       {_gib(p['bytes_logits'])}",
        f"  total        {_gib(p['bytes_total'])}",
        f"compute C = 6 N D = {p['compute_flops']:.3g} FLOPs for D = {p['tokens']:.3g} tokens "
        f"(Chinchilla-optimal D ~ 20 N = {p['chinchilla_tokens']:.3g}); with attention "
        f"{p['flops_per_token']:.3g} FLOPs/token",
        *([f"pipeline: {p['pipeline']['stages']} stages, {p['pipeline']['microbatches']} microbatches, "
           f"{p['pipeline']['repeats']} repeat(s): bubble {p['pipeline']['bubble']:.1%} of each stage's time"]
          if p["pipeline"]["stages"] > 1 else []),
        f"time at MFU {p['mfu']:.0%} of {p['peak_tflops_per_device']:.0f} TFLOP/s per device: "
        f"{p['seconds'] / 3600:.1f} h ({days:.1f} days)",
    ]
    return "\n".join(lines)
