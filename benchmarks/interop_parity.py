"""Max |jaxlm - Hugging Face| logits on the parity tests' tiny models (run from the repo root;
needs the test extra: transformers, CPU torch)."""
import os, importlib.util, tempfile, pathlib
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"; os.environ["JAX_PLATFORMS"] = "cpu"
spec = importlib.util.spec_from_file_location("par", "tests/interop/test_hf_parity.py")
par = importlib.util.module_from_spec(spec); spec.loader.exec_module(par)
import numpy as np, jax.numpy as jnp, dataclasses
from jaxlm.interop import load_hf
class F:
    def mktemp(self, n): return pathlib.Path(tempfile.mkdtemp(prefix=n))
get = par.built.__wrapped__(F())
for case in par.CASES:
    path, m, tokens, want = get(case)
    cfg, params = load_hf(path, mesh=par.one_device())
    out = np.asarray(par.apply(cfg, params, jnp.asarray(tokens, jnp.int32)))
    d = max(np.abs(out[b, :n] - want[b, :n]).max() for b, n in enumerate(par.LENGTHS))
    extra = ""
    if cfg.rope_scaling != "none":
        plain = np.asarray(par.apply(dataclasses.replace(cfg, rope_scaling="none"), params, jnp.asarray(tokens, jnp.int32)))
        extra = f" unscaled-rope diff {np.abs(plain[0]-want[0]).max():.3g}"
    if cfg.sliding_window:
        whole = par.apply(dataclasses.replace(cfg, sliding_window=0), params, jnp.asarray(tokens, jnp.int32))
        whole = np.asarray(whole)
        extra = f" no-window diff {np.abs(whole[0]-want[0]).max():.3g}"
    print(f"{case}: max |jaxlm - HF| on real positions {d:.3g}; max |logit| {np.abs(want).max():.3g}{extra}")
get_long = par.long_built.__wrapped__(F())
for case in par.LONG_CASES:  # 80 positions over 64 original ones
    path, tokens, want = get_long(case)
    cfg, params = load_hf(path, mesh=par.one_device())
    out = np.asarray(par.apply(cfg, params, jnp.asarray(tokens, jnp.int32)))
    plain = np.asarray(par.apply(dataclasses.replace(cfg, rope_scaling="none"), params, jnp.asarray(tokens, jnp.int32)))
    print(f"{case}: max |jaxlm - HF| {np.abs(out - want).max():.3g}; max |logit| {np.abs(want).max():.3g} "
          f"unscaled-rope diff {np.abs(plain - want).max():.3g}")
spec = importlib.util.spec_from_file_location("t5", "tests/interop/test_hf_t5.py")
t5 = importlib.util.module_from_spec(spec); spec.loader.exec_module(t5)
get_t5 = t5.built.__wrapped__(F())
for case in t5.CASES:  # encoder inputs right-padded, whole decoder rows
    path, m, inputs, decoder, want = get_t5(case)
    cfg, params = load_hf(path, mesh=t5.one_device())
    out = t5.our_logits(cfg, params, inputs, decoder)
    rope = t5.our_logits(dataclasses.replace(cfg, position="rope"),
                         {k: v for k, v in params.items() if not k.endswith("_relative")}, inputs, decoder)
    print(f"t5 {case}: max |jaxlm - HF| {np.abs(out - want).max():.3g}; max |logit| {np.abs(want).max():.3g} "
          f"rope-instead diff {np.abs(rope - want).max():.3g}")
