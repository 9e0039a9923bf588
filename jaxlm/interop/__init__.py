"""Hugging Face interop: Llama (1, 2, 3), Qwen2 and Mistral safetensors checkpoints in and out.

    cfg, params = jaxlm.interop.load_hf("path/to/hf_dir")     # sharded as training places them
    jaxlm.interop.save_hf(cfg, params, "path/to/out_dir")

`jaxlm convert --from-hf DIR --out RUN_DIR` and `jaxlm convert --to-hf RUN_DIR --out DIR`
wrap them (`jaxlm.interop.run`). Needs the `safetensors` package (imported on use).
"""
from jaxlm.interop.hf import load_hf, save_hf
from jaxlm.interop.hf_config import ARCHITECTURES, InteropError
from jaxlm.interop.run import export_run, import_run

__all__ = ["load_hf", "save_hf", "import_run", "export_run", "InteropError", "ARCHITECTURES"]
