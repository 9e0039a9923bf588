"""Multi-process runs: which process this is, joining the others, and failing fast together.

Every process of a run executes the same command. Which process it is comes from the
environment, checked in this order:

- ``JAXLM_DISTRIBUTED=off``: one process, whatever else is set.
- ``JAXLM_DISTRIBUTED=auto``: let `jax.distributed.initialize()` detect the cluster
  (Cloud TPU pods and multislice, Open MPI, Kubernetes; `launch/tpu_pod.sh` sets it).
- ``JAXLM_COORDINATOR`` (host:port of process 0), ``JAXLM_NUM_PROCESSES``,
  ``JAXLM_PROCESS_ID``: explicit (`launch/multiprocess_cpu.sh`, `launch/slurm.sbatch`).
- inside a SLURM step (``srun``): the process count and id from ``SLURM_STEP_NUM_TASKS`` and
  ``SLURM_PROCID``, the coordinator from the first host of ``SLURM_STEP_NODELIST``
  (port ``JAXLM_COORDINATOR_PORT``, else derived from the job id as JAX does).
- otherwise, or with one process in all: a single-process run; nothing is initialised.

With explicit values every process sees all of its host's devices (one process per host);
JAX's own SLURM detection would give each process one GPU.

When a process dies, the others must not wait in a collective it will never join. During
training every process writes a heartbeat file (`PeerWatch`, RUN_DIR/.peers/<process>) and
watches the others'; one whose heartbeat stops for `distributed.peer_timeout_s` is dead, and
each survivor prints one line naming it and exits at once. A process that fails with a Python
error writes RUN_DIR/.peers/<process>.failed, so the others leave at once too, and exits
(`exit_now`). Behind both, JAX's coordination service terminates the
others after `distributed.heartbeat_timeout_s` without heartbeats (with a C++ stack trace).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Optional

from jaxlm.config import ConfigError, DistributedConfig

MODE = "JAXLM_DISTRIBUTED"
COORDINATOR = "JAXLM_COORDINATOR"
NUM_PROCESSES = "JAXLM_NUM_PROCESSES"
PROCESS_ID = "JAXLM_PROCESS_ID"
COORDINATOR_PORT = "JAXLM_COORDINATOR_PORT"


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in a multi-process run; None fields are left to JAX to detect."""

    source: str  # env | slurm | auto
    coordinator: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not m or not m.group(0):
        raise ConfigError(f"SLURM node list {nodelist!r} has no host name")
    prefix, ranges, suffix = m.groups()
    first = re.split(r"[,-]", ranges)[0] if ranges else ""
    return prefix + first + suffix


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"{key}={env[key]!r} must be an integer") from None


def detect(env: Mapping[str, str]) -> Optional[Launch]:
    """Where this process sits, from environment variables (see the module docstring); None: alone."""
    mode = env.get(MODE, "")
    if mode not in ("", "auto", "off"):
        raise ConfigError(f"{MODE}={mode!r} is not allowed; choose auto, off, or leave it unset")
    if mode == "off":
        return None
    if mode == "auto":
        return Launch("auto")
    slurm = "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env
    if NUM_PROCESSES in env:
        source, n = "env", _int(env, NUM_PROCESSES)
    elif slurm:
        source, n = "slurm", _int(env, "SLURM_STEP_NUM_TASKS")
    else:
        if COORDINATOR in env or PROCESS_ID in env:
            raise ConfigError(f"{COORDINATOR}/{PROCESS_ID} are set but {NUM_PROCESSES} is not; "
                              "set all three for a multi-process run")
        return None
    if n < 1:
        raise ConfigError(f"{NUM_PROCESSES}={n} must be >= 1")
    if n == 1:
        return None
    if PROCESS_ID in env:
        pid = _int(env, PROCESS_ID)
    elif slurm:
        pid = _int(env, "SLURM_PROCID")
    else:
        raise ConfigError(f"{NUM_PROCESSES}={n} but {PROCESS_ID} is not set; give each process its "
                          f"id in [0, {n})")
    if not 0 <= pid < n:
        raise ConfigError(f"{PROCESS_ID}={pid} must be in [0, {n}) for {NUM_PROCESSES}={n}")
    coordinator = env.get(COORDINATOR)
    if coordinator is None and slurm and "SLURM_STEP_NODELIST" in env:
        port = env.get(COORDINATOR_PORT) or str(_int(env, "SLURM_JOB_ID") % 4096 + 61440)
        coordinator = f"{first_host(env['SLURM_STEP_NODELIST'])}:{port}"
    if not coordinator or not re.fullmatch(r".+:\d+", coordinator):
        raise ConfigError(f"{COORDINATOR}={coordinator!r} must be host:port of process 0 "
                          f"for a run of {n} processes")
    return Launch(source, coordinator, n, pid)


_launch: Optional[Launch] = None


def initialize(cfg: DistributedConfig, env: Optional[Mapping[str, str]] = None) -> Optional[Launch]:
    """Join the run's other processes (before any JAX device use); None for a single process."""
    global _launch
    import jax

    launch = detect(os.environ if env is None else env)
    if launch is None or jax.distributed.is_initialized():
        return _launch
    kwargs = dict(initialization_timeout=cfg.init_timeout_s,
                  heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
                  shutdown_timeout_seconds=cfg.shutdown_timeout_s)
    if launch.source != "auto":
        kwargs.update(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                      process_id=launch.process_id, cluster_detection_method="deactivate")
        where = f"process {launch.process_id} of {launch.num_processes} via {launch.coordinator}"
    else:
        where = "a process of an auto-detected cluster"
    # A CPU run (tests, multiprocess_cpu.sh) needs cross-process collectives: Gloo over TCP.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # If the others never arrive, JAX aborts after the timeout; this line says what was awaited.
    print(f"[jaxlm] {where}: joining (timeout {cfg.init_timeout_s} s)", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # auto-detection found no cluster: no coordinator, count or id
        raise ConfigError(f"{MODE}=auto but JAX detected no cluster ({e}); set {COORDINATOR}, "
                          f"{NUM_PROCESSES} and {PROCESS_ID} instead") from None
    _launch = dataclasses.replace(launch, num_processes=jax.process_count(),
                                  process_id=jax.process_index())
    print(f"[jaxlm] process {jax.process_index()} of {jax.process_count()}: joined; "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", file=sys.stderr, flush=True)
    return _launch


def active() -> bool:
    """True once this process has joined others through `jax.distributed.initialize`."""
    import jax

    return jax.distributed.is_initialized()


def preempted(iteration: int) -> bool:
    """True, on every process at the same iteration, once any of them got SIGTERM.

    JAX's preemption sync manager catches SIGTERM on each process and agrees on the first
    iteration that all have not yet passed; call this once per loop iteration, counting up.
    """
    if not active():
        return False
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(iteration)


def watch_peers(run_dir, timeout_s: float) -> Optional["PeerWatch"]:
    """Several processes: this process's `PeerWatch` in RUN_DIR/.peers, started once every process
    has made its own (their marks of a last session gone); None for a single process."""
    import jax

    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    peers = PeerWatch(Path(run_dir) / ".peers", jax.process_index(), jax.process_count(), timeout_s)
    multihost_utils.sync_global_devices("jaxlm peer watch")
    return peers.start()


class PeerWatch:
    """Heartbeats in a shared directory: this process writes DIR/<its index> (a counter, every
    second) and reads the others'. A peer that wrote DIR/<index>.failed, or whose counter has not
    changed for `timeout_s` and that has not written DIR/<index>.done, is gone: this process
    prints one line naming it and exits (1).

    Every process creates its watch (which clears its marks of an earlier session), then all meet
    at a barrier, then each calls `start`: no process reads another's stale `.failed`.
    """

    def __init__(self, directory: Path, index: int, count: int, timeout_s: float, interval_s: float = 1.0):
        self.directory, self.index, self.count = Path(directory), index, count
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.directory.mkdir(parents=True, exist_ok=True)
        for end in ("done", "failed"):
            (self.directory / f"{index}.{end}").unlink(missing_ok=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxlm-peer-watch", daemon=True)

    def start(self) -> "PeerWatch":
        self._thread.start()
        return self

    def _run(self) -> None:
        beat, start, writing = 0, time.monotonic(), True
        seen = {}  # peer -> (the counter last read, or None; when it last changed)
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                (self.directory / f"{self.index}.tmp").write_text(str(beat))
                (self.directory / f"{self.index}.tmp").replace(self.directory / str(self.index))
                writing = True
            except OSError as e:  # a full disk: say so once, go on watching, write again next beat
                if writing:
                    print(f"[jaxlm] process {self.index} of {self.count}: cannot write its heartbeat ({e}); the "
                          "others may take it for dead", file=sys.stderr, flush=True)
                writing = False
            now = time.monotonic()
            for peer in range(self.count):
                if peer == self.index:
                    continue
                if (self.directory / f"{peer}.failed").exists():
                    self._leave(f"process {peer} failed (see its log)")
                if (self.directory / f"{peer}.done").exists():
                    continue
                try:
                    value = (self.directory / str(peer)).read_text()
                except OSError:  # not begun yet: judged from the start of this watch
                    value = None
                last, changed = seen.get(peer, (None, start))
                if value != last:
                    seen[peer] = (value, now)
                elif now - changed > self.timeout_s:
                    self._leave(f"process {peer} sent no heartbeat for {now - changed:.0f} s (it died or hangs; "
                                "see its log)")

    def _leave(self, why: str) -> None:
        print(f"[jaxlm] process {self.index} of {self.count}: {why}; leaving the run", file=sys.stderr, flush=True)
        exit_now(1)

    def close(self, failed: bool = False) -> None:
        """Stop watching, and tell the others how this process ends: finished or stopped cleanly
        (`<index>.done`: they go on without it), or failed (`<index>.failed`: they leave too)."""
        self._stop.set()
        self._thread.join()
        try:
            (self.directory / f"{self.index}.{'failed' if failed else 'done'}").write_text("")
        except OSError:  # a full disk: the others see the heartbeat stop instead
            pass


def exit_now(code: int) -> None:
    """Leave without waiting for the others at shutdown, so they see this process gone and stop.

    After an error on one process the others may sit in a collective it will never join;
    a normal exit would first wait for them at the shutdown barrier (shutdown_timeout_s).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
