"""Peak anonymous memory (RssAnon, sampled every 5 ms) while load_hf imports a fp32 checkpoint, in
units of the params' size. The file's mapped pages are page cache (RssFile), not counted."""
import os, sys, threading, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"; os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jaxlm import model
from jaxlm.config import ModelConfig
cfg = ModelConfig(vocab_size=32000, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=16, d_ff=2816, max_seq_len=2048)
nbytes = 4 * model.param_count(cfg)
path = "/tmp/hfx/mem_ckpt"
if sys.argv[1] == "write":
    from jaxlm.interop import save_hf
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape, dtype=np.float32), model.abstract_params(cfg))
    save_hf(cfg, params, path, max_shard_bytes=200 * 2**20)
    sys.exit()
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
peak, stop = [0], [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.005)
from jaxlm.interop import load_hf
base = anon()
t = threading.Thread(target=sample); t.start()
t0 = time.time()
if sys.argv[1] == "stream":
    cfg2, params = load_hf(path)
    jax.block_until_ready(params)
else:  # naive: whole tensors into numpy, then device_put (what streaming avoids)
    from safetensors.numpy import load_file
    import glob
    tensors = {}
    for f in sorted(glob.glob(path + "/*.safetensors")):
        tensors.update(load_file(f))
    cfg2, params = load_hf(path)  # the same arrays again, for the same end state
    jax.block_until_ready(params)
stop[0] = True; t.join()
held = anon() - base
print(f"{sys.argv[1]}: params {nbytes/2**20:.0f} MiB; peak extra anon {(peak[0]-base)/2**20:.0f} MiB "
      f"= {(peak[0]-base)/nbytes:.2f}x; held after {held/2**20:.0f} MiB; {time.time()-t0:.1f} s; "
      f"sharding of q: {params['layers']['attn']['q'].sharding.spec}")
