"""Fake 8 CPU devices before JAX starts, and share compile-heavy fixtures.

Markers (CI runs them all): `slow` (tens of seconds: subprocess runs, whole stages), `multiprocess`
(several jaxlm processes joined by jax.distributed), `parity` (against transformers and torch).
A quick local run: `pytest -m "not slow and not multiprocess and not parity"`.
"""
import atexit
import os
import shutil
import tempfile

# XLA:CPU's cheaper backend passes halve the compile time that dominates the suite; every compared
# program is compiled with the same flags (subprocesses inherit them), and no test times anything.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILE,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per session (subprocesses inherit it): the stages' tests build the
# same programs again in every run they start (a new jit per run), and a cache hit skips the compile.
_CACHE = tempfile.mkdtemp(prefix="jaxlm-tests-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# What jaxlm measures of the machine (the peak FLOP/s behind MFU) is kept per session, not in the home.
os.environ["JAXLM_CACHE_DIR"] = os.path.join(_CACHE, "jaxlm")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One pretraining run of `jaxlm.testing.TINY_RUN` (20 steps, checkpoints every 5), trained once
    per session, in process. Tests read it; a test that writes into a run makes its own."""
    from jaxlm.testing import tiny_config
    from jaxlm.train import pretrain

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    pretrain.main(tiny_config(train=dict(run_dir=str(run_dir))))
    return run_dir
