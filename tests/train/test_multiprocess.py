"""Several processes on this machine, as on several hosts: the same run as one process.

Each worker is `python -m jaxlm pretrain` with the JAXLM_* multi-process environment and
4 fake CPU devices (Gloo collectives over TCP); the reference is one process with 8.
Compiles go through a module-wide persistent cache, so only the first run of each
program pays for XLA.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxlm import distributed, sharding
from jaxlm.config import ConfigError, from_dict, load_config
from jaxlm.runs import read_metrics
from jaxlm.testing import TINY_RUN, merge

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
WORKER = Path(__file__).with_name("multiprocess_worker.py")
FAULT_WORKER = Path(__file__).with_name("fault_worker.py")
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TINY = merge(TINY_RUN, model=dict(max_seq_len=16),
             mesh=dict(data=2, fsdp=-1),  # data across the two processes, fsdp within each
             data=dict(max_documents=40),
             train=dict(steps=6, seq_len=16, eval_every=3, eval_batches=1, save_every=3, async_checkpoint=False))
RTOL = 1e-6  # Gloo and in-process all-reduces may add in different orders (seen: 1 ulp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXLM_", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable,
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def devices_env(env: dict, devices: int, **extra) -> dict:
    return dict(env, XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count={devices}", **extra)


def write_config(directory: Path, name: str, **distributed_keys) -> Path:
    tree = merge(TINY, train=dict(run_dir=str(directory / name)))
    if distributed_keys:
        tree["distributed"] = distributed_keys
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def one_process(env: dict, config: Path, command: str = "pretrain") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxlm", command, str(config)], env=devices_env(env, 8),
                          capture_output=True, text=True, timeout=300)


def start_processes(env: dict, argv: list[str], logs: Path, n=2, devices=4, per_process=None) -> list:
    """n workers of `python argv...` joined through JAXLM_*; output in logs/{i}.out and {i}.err.
    per_process: {i: argv} for workers that run something else (a fault injected).

    Callers end them with `stop` in a `finally`, so a failed test leaves no process behind.
    """
    port = free_port()
    procs = []
    for i in range(n):
        penv = devices_env(env, devices, JAXLM_COORDINATOR=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES=str(n),
                           JAXLM_PROCESS_ID=str(i))
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, *(per_process or {}).get(i, argv)], env=penv,
                                          stdout=out, stderr=err))
    return procs


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def losses(run_dir, key="loss"):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r and "event" not in r}


@pytest.fixture(scope="module")
def single(base_env, tmp_path_factory):
    """The reference: one process, 8 devices."""
    tmp = tmp_path_factory.mktemp("single")
    out = one_process(base_env, write_config(tmp, "run"))
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def double(base_env, tmp_path_factory):
    """Two processes of 4 devices, started by launch/multiprocess_cpu.sh."""
    tmp = tmp_path_factory.mktemp("double")
    script = subprocess.Popen([str(LAUNCH / "multiprocess_cpu.sh"), "-n", "2", "-d", "4", "pretrain",
                               str(write_config(tmp, "run"))], env=dict(base_env, XLA_FLAGS=FAST_XLA),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = script.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(script.pid, signal.SIGKILL)  # the script and both workers
        raise
    assert script.returncode == 0, stderr[-3000:]
    return tmp / "run", stdout


@pytest.fixture(scope="module")
def killed(base_env, tmp_path_factory):
    """Two processes; process 1 is SIGKILLed after step 5 (checkpoints at step 3)."""
    tmp = tmp_path_factory.mktemp("killed")
    config = write_config(tmp, "run", peer_timeout_s=5)  # JAX's own heartbeat timeout stays at 100 s
    procs = start_processes(base_env, ["-m", "jaxlm", "pretrain", str(config)], tmp,
                            per_process={1: [str(FAULT_WORKER), "5", "KILL", "pretrain", str(config)]})
    try:
        rc1 = procs[1].wait(timeout=300)
        died = time.monotonic()
        try:
            rc0 = procs[0].wait(timeout=120)  # a hang would run into this
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still running 120 s after process 1 died")
        after_death_s = time.monotonic() - died
    finally:
        stop(procs)
    return {"config": config, "run_dir": tmp / "run", "rc": (rc0, rc1), "after_death_s": after_death_s,
            "stderr0": (tmp / "0.err").read_text()}


@pytest.fixture(scope="module")
def preempted(base_env, tmp_path_factory):
    """Two processes; process 1 alone gets SIGTERM (a preemption notice) after step 2."""
    tmp = tmp_path_factory.mktemp("preempted")
    config = write_config(tmp, "run")
    procs = start_processes(base_env, ["-m", "jaxlm", "pretrain", str(config)], tmp,
                            per_process={1: [str(FAULT_WORKER), "2", "TERM", "pretrain", str(config)]})
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        stop(procs)
    return {"config": config, "run_dir": tmp / "run", "rc": rcs, "stderr": [(tmp / f"{i}.err").read_text()
                                                                           for i in range(2)]}


@pytest.mark.multiprocess
def test_two_processes_train_like_one(single, double):
    run_dir, stdout = double
    rows = [r for r in read_metrics(run_dir) if "loss" in r and "event" not in r]
    assert [r["step"] for r in rows] == list(range(1, 7))  # process 0 alone writes metrics
    start = next(r for r in read_metrics(run_dir) if r.get("event") == "start")
    assert start["processes"] == 2 and start["devices"] == 8
    assert start["mesh"] == {"stage": 1, "data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
    for key in ("loss", "grad_norm", "eval_loss"):
        got, want = losses(run_dir, key), losses(single, key)
        assert sorted(got) == sorted(want)
        np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=RTOL)
    assert sum(line.startswith("[jaxlm] done:") for line in stdout.splitlines()) == 1  # one summary, process 0's
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3", "6"]


@pytest.mark.multiprocess
def test_pipeline_stages_across_two_processes_train_like_one(single, base_env, tmp_path):
    """mesh.stage=2 with each process one stage (4 devices of tensor parallelism each): activations
    cross between the processes by collective permutes, and the run trains as the reference does."""
    tree = merge(TINY, mesh=dict(stage=2, data=1, fsdp=1, tensor=4, rules="fsdp_tp"),
                 train=dict(run_dir=str(tmp_path / "run")))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    procs = start_processes(base_env, ["-m", "jaxlm", "pretrain", str(tmp_path / "run.yaml")], tmp_path)
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        stop(procs)
    assert rcs == [0, 0], [(tmp_path / f"{i}.err").read_text()[-3000:] for i in range(2)]
    start = next(r for r in read_metrics(tmp_path / "run") if r.get("event") == "start")
    assert start["processes"] == 2 and start["mesh"]["stage"] == 2
    for key in ("loss", "grad_norm", "eval_loss"):
        got, want = losses(tmp_path / "run", key), losses(single, key)
        assert sorted(got) == sorted(want)
        np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5)


@pytest.mark.multiprocess
def test_processes_read_disjoint_rows_that_make_the_batch(base_env, tmp_path):
    config = write_config(tmp_path, "data")
    procs = start_processes(base_env, [str(WORKER), str(config), str(tmp_path)], tmp_path)
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        stop(procs)
    assert rcs == [0, 0], [(tmp_path / f"{i}.err").read_text()[-3000:] for i in range(2)]
    from jaxlm.train import pretrain

    stage = pretrain.build(load_config(config))
    outs = [json.loads((tmp_path / f"rows_{i}.json").read_text()) for i in range(2)]
    assert [o["process"] for o in outs] == [0, 1]
    assert outs[0]["mesh"] == {"stage": 1, "data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
    for b0, b1 in zip(outs[0]["batches"], outs[1]["batches"]):
        reference = stage.train_data.batch(b0["cursor"], 8, 0, 1)["tokens"]  # one process reads it all
        # Process p reads stream rows [cursor + 4p, cursor + 4p + 4): disjoint, and together the batch.
        np.testing.assert_array_equal(b0["local"], reference[:4])
        np.testing.assert_array_equal(b1["local"], reference[4:])
        assert b0["global_shape"] == [8, 16]
        np.testing.assert_array_equal(b0["global"], reference)  # assembled on the mesh, gathered back
        np.testing.assert_array_equal(b1["global"], reference)


@pytest.mark.multiprocess
def test_killed_process_stops_the_other_with_a_message(killed):
    rc0, rc1 = killed["rc"]
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0
    # Whichever notices first, both jaxlm's one line: Gloo's broken connection in a collective, or
    # the peer watch (no heartbeat file from process 1 for peer_timeout_s).
    err = killed["stderr0"]
    assert ("process 0 of 2 failed" in err and "another process died" in err
            or "process 0 of 2: process 1 sent no heartbeat" in err), err[-3000:]
    assert "detected fatal errors" not in err  # not JAX's abort with its C++ stack trace
    assert killed["after_death_s"] < 30  # seconds: peer_timeout_s=5, JAX's heartbeat timeout 100 s
    steps = sorted(int(p.name) for p in (killed["run_dir"] / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3]


@pytest.mark.multiprocess
def test_two_process_checkpoint_resumes_in_one_process(killed, single, base_env):
    out = one_process(base_env, killed["config"])  # same run dir: resumes where the pair stopped
    assert out.returncode == 0, out.stderr[-3000:]
    resume = [r for r in read_metrics(killed["run_dir"]) if r.get("event") == "resume"]
    assert [(r["step"], r["cursor"]) for r in resume] == [(3, 24)]
    start = [r for r in read_metrics(killed["run_dir"]) if r.get("event") == "start"]
    assert [r["processes"] for r in start] == [2, 1]
    got, want = losses(killed["run_dir"]), losses(single)  # steps 4-5 logged twice: the resumed values win
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=RTOL)
    np.testing.assert_allclose(losses(killed["run_dir"], "eval_loss")[6], losses(single, "eval_loss")[6], rtol=RTOL)


@pytest.mark.multiprocess
def test_sigterm_on_one_process_stops_all_at_one_step_with_a_checkpoint(preempted):
    assert preempted["rc"] == [143, 143], preempted["stderr"][0][-3000:]  # 128 + SIGTERM: requeue me
    (event,) = [r for r in read_metrics(preempted["run_dir"]) if r.get("event") == "interrupted"]
    assert 3 <= event["step"] < 6  # the first step that neither process had passed when they agreed
    steps = sorted(int(p.name) for p in (preempted["run_dir"] / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == event["step"]


@pytest.mark.multiprocess
def test_two_process_checkpoint_restores_onto_fewer_devices(preempted):
    """Restore reshards: the same values on a 4-device mesh as on the 8-device one."""
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.train import pretrain
    from jaxlm.train.state import compile_stage

    cfg = load_config(preempted["config"])
    ckpt = Checkpointer(preempted["run_dir"] / "checkpoints")
    step = ckpt.latest_step()
    restored = {}
    for n in (8, 4):
        c = compile_stage(cfg, pretrain.policy_role(cfg), pretrain.lm_objective(cfg.model), jax.devices()[:n])
        params, opt_state, meta = ckpt.restore(step, c.abstract_state["params"], c.abstract_state["opt_state"])
        assert meta["step"] == step and meta["cursor"] == 8 * step
        for leaf, target in zip(jax.tree.leaves(params), jax.tree.leaves(c.abstract_state["params"])):
            assert leaf.sharding == target.sharding and len(leaf.sharding.device_set) == n
        restored[n] = jax.tree.map(np.asarray, (params, opt_state))
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, restored[8], restored[4])


@pytest.mark.multiprocess
def test_a_shard_damaged_on_one_process_fails_the_restore_on_every_process(base_env, tmp_path):
    """Each process reads its own shards: the one that meets the damage must not be left alone with it
    while the others go on into the digest's collective (a hang)."""
    procs = start_processes(base_env, [str(WORKER), "--damaged-shard", str(tmp_path)], tmp_path)
    try:
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        stop(procs)
    assert rcs == [0, 0], [(tmp_path / f"{i}.err").read_text()[-3000:] for i in range(2)]
    outcomes = [(tmp_path / f"restore_{i}.txt").read_text() for i in range(2)]
    assert outcomes[1].startswith("CheckpointCorrupt: checkpoint 1 cannot be read: "), outcomes
    assert outcomes[0] == "CheckpointCorrupt: checkpoint 1 could not be restored on process 1 (see its log)", outcomes


@pytest.mark.multiprocess
def test_a_run_directory_of_another_run_is_refused_on_every_process(base_env, tmp_path):
    """Process 0 alone reads the saved config; the others must leave with it, not go on into the
    first collective and wait for it there."""
    config = write_config(tmp_path, "run")
    (tmp_path / "run").mkdir()
    other = merge(TINY, model=dict(n_layers=3), train=dict(run_dir=str(tmp_path / "run")))
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(other))
    procs = start_processes(base_env, ["-m", "jaxlm", "pretrain", str(config)], tmp_path)
    try:
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        stop(procs)
    errors = [[line for line in (tmp_path / f"{i}.err").read_text().splitlines() if "error:" in line]
              for i in range(2)]
    assert rcs == [2, 2], errors
    assert "holds a run with another config: model.n_layers=" in errors[0][0], errors
    assert errors[1] == [f"jaxlm pretrain: error: process 0 refused train.run_dir={str(tmp_path / 'run')!r} "
                         "(see its log)"], errors


# PPO from a run of random params: 2 iterations of 4 prompts x 2 responses to "add" problems (a
# prompt file: no task accuracy to evaluate, a shorter test), scored by the checker, the critic
# trained beside the policy.
PPO = merge(TINY_RUN, model=dict(max_seq_len=64),
            mesh=dict(data=2, fsdp=2, tensor=2, rules="fsdp_tp"),  # data across the processes
            optim=dict(lr=3e-3, warmup_steps=0), sft=dict(template="Q: {prompt}\nA: "),
            train=dict(steps=2, seq_len=64, save_every=1, async_checkpoint=False),
            ppo=dict(checker=True, prompts_per_iteration=4, group_size=2, max_new_tokens=6, epochs=1, minibatches=2))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ppo_in_two_processes_runs_like_one(base_env, tmp_path):
    """The rollout is sampled alike on every process (the same prompts and keys), scored on each,
    and trained on the mesh: per-iteration metrics and the final params as in one process."""
    from jaxlm import runs
    from jaxlm.data import tasks
    from jaxlm.data.examples import chat
    from jaxlm.testing import random_params, write_run

    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": chat.instruction_prompt(ex), "task": "add", "answer": ex["answer"]}
               for ex in tasks.mixed(["add"], "train", 8)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = from_dict(PPO)
    init = write_run(tmp_path / "init", cfg, random_params(cfg.model, 0, scale=0.3), step=2)
    configs = {name: tmp_path / f"{name}.yaml" for name in ("single", "double")}
    for name, path in configs.items():
        tree = merge(PPO, train=dict(run_dir=str(tmp_path / name), init_from=str(init)),
                     ppo=dict(prompt_files=[str(prompts)]))
        path.write_text(yaml.safe_dump(tree))
    procs = start_processes(base_env, ["-m", "jaxlm", "ppo", str(configs["double"])], tmp_path)
    try:
        out = one_process(base_env, configs["single"], "ppo")  # the reference, meanwhile
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        stop(procs)
    assert out.returncode == 0, out.stderr[-3000:]
    assert rcs == [0, 0], [(tmp_path / f"{i}.err").read_text()[-3000:] for i in range(2)]
    start = next(r for r in read_metrics(tmp_path / "double") if r.get("event") == "start")
    assert start["processes"] == 2 and start["mesh"]["data"] == 2
    rows = {name: [r for r in read_metrics(tmp_path / name) if "event" not in r] for name in configs}
    assert [r["step"] for r in rows["double"]] == [r["step"] for r in rows["single"]] == [1, 2]  # process 0 writes
    for got, want in zip(rows["double"], rows["single"]):
        numbers = sorted(k for k in want if not k.startswith("time_"))
        assert sorted(k for k in got if not k.startswith("time_")) == numbers
        np.testing.assert_allclose([got[k] for k in numbers], [want[k] for k in numbers], rtol=1e-5, atol=1e-5)
    assert any(r["kl"] != 0 for r in rows["single"] if "kl" in r)  # the second rollout is the trained policy's
    for role in ("policy", "value"):
        a, b = (runs.load_run(tmp_path / name, role=role).params for name in configs)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)
    summaries = ['[jaxlm] done: step 2,' in (tmp_path / f"{i}.out").read_text() for i in range(2)]
    assert summaries == [True, False]  # one summary, process 0's


# --- where a process sits, and the mesh across processes: pure functions, no processes -------------


def test_detect_reads_explicit_slurm_and_auto_environments():
    explicit = {"JAXLM_COORDINATOR": "10.0.0.1:1234", "JAXLM_NUM_PROCESSES": "4", "JAXLM_PROCESS_ID": "3"}
    assert distributed.detect(explicit) == distributed.Launch("env", "10.0.0.1:1234", 4, 3)
    assert distributed.detect({}) is None
    assert distributed.detect({**explicit, "JAXLM_NUM_PROCESSES": "1", "JAXLM_PROCESS_ID": "0"}) is None
    assert distributed.detect({**explicit, "JAXLM_DISTRIBUTED": "off"}) is None
    assert distributed.detect({"JAXLM_DISTRIBUTED": "auto"}) == distributed.Launch("auto")
    slurm = {"SLURM_JOB_ID": "4097", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
             "SLURM_STEP_NODELIST": "gpu[07-08]"}
    assert distributed.detect(slurm) == distributed.Launch("slurm", "gpu07:61441", 2, 1)
    assert distributed.detect({**slurm, "JAXLM_COORDINATOR": "h:9"}).coordinator == "h:9"
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}) is None  # not a step
    for bad, needle in (({**explicit, "JAXLM_PROCESS_ID": "4"}, "JAXLM_PROCESS_ID=4"),
                        ({**explicit, "JAXLM_COORDINATOR": "nohost"}, "JAXLM_COORDINATOR"),
                        ({"JAXLM_COORDINATOR": "h:1"}, "JAXLM_NUM_PROCESSES"),
                        ({"JAXLM_NUM_PROCESSES": "2", "JAXLM_COORDINATOR": "h:1"}, "JAXLM_PROCESS_ID"),
                        ({"JAXLM_DISTRIBUTED": "yes"}, "JAXLM_DISTRIBUTED='yes'"),
                        ({**explicit, "JAXLM_NUM_PROCESSES": "two"}, "JAXLM_NUM_PROCESSES='two'")):
        with pytest.raises(ConfigError, match=needle):
            distributed.detect(bad)


@pytest.mark.multiprocess
def test_auto_mode_without_a_cluster_is_a_one_line_error(base_env, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxlm", "pretrain", str(write_config(tmp_path, "auto"))],
                         env=devices_env(base_env, 1, JAXLM_DISTRIBUTED="auto"), capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("jaxlm pretrain: error:")]
    assert errors == ["jaxlm pretrain: error: JAXLM_DISTRIBUTED=auto but JAX detected no cluster "
                      "(coordinator_address should be defined.); set JAXLM_COORDINATOR, JAXLM_NUM_PROCESSES "
                      "and JAXLM_PROCESS_ID instead"], out.stderr[-2000:]


def test_first_host_of_slurm_node_lists():
    cases = {"node001": "node001", "node001,host2": "node001", "node[001-015],host2": "node001",
             "node[007,009-015]": "node007", "a[3-4]-ib,b1": "a3-ib"}
    assert {k: distributed.first_host(k) for k in cases} == cases


class FakeDevice:
    platform, device_kind = "cpu", "cpu"

    def __init__(self, id, process_index):
        self.id, self.process_index = id, process_index

    def __repr__(self):
        return f"d{self.id}@p{self.process_index}"


def test_mesh_across_processes_puts_each_process_in_its_own_block():
    devices = [FakeDevice(i, i // 4) for i in range(8)]  # 2 processes x 4 devices
    process = np.vectorize(lambda d: d.process_index)
    grid = sharding.device_grid([1, 2, 4, 1, 1], devices)  # data across the processes
    np.testing.assert_array_equal(process(grid)[0, :, :, 0, 0], [[0] * 4, [1] * 4])
    grid = sharding.device_grid([1, 1, 8, 1, 1], devices)  # data=1: the processes split fsdp
    np.testing.assert_array_equal(process(grid)[0, 0, :, 0, 0], [0] * 4 + [1] * 4)
    grid = sharding.device_grid([1, 4, 2, 1, 1], devices)
    np.testing.assert_array_equal(process(grid)[0, :, 0, 0, 0], [0, 0, 1, 1])
    assert sorted(d.id for d in grid.flat) == list(range(8))
    grid = sharding.device_grid([1, 2, 1, 2, 2], devices)  # sequence and tensor stay inside a process
    np.testing.assert_array_equal(process(grid)[0, :, 0], [[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    grid = sharding.device_grid([2, 1, 1, 1, 4], devices)  # pipeline stages across the processes
    np.testing.assert_array_equal(process(grid)[:, 0, 0, 0], [[0] * 4, [1] * 4])
    four = [FakeDevice(i, i // 2) for i in range(8)]  # 4 processes x 2 devices: data 2 x stage 2 across them
    grid = sharding.device_grid([2, 2, 1, 1, 2], four)
    np.testing.assert_array_equal(process(grid)[:, :, 0, 0, 0], [[0, 1], [2, 3]])  # one process per (stage, data)
    with pytest.raises(ConfigError, match="mesh.data, mesh.fsdp or mesh.stage .or their product. must be a multiple"):
        sharding.device_grid([1, 1, 1, 1, 8], devices)  # tensor parallelism across hosts: refused
    with pytest.raises(ConfigError, match="must be a multiple of 2"):
        sharding.device_grid([1, 1, 1, 8, 1], devices)  # and so is context parallelism


def test_launch_scripts_parse_and_explain_themselves():
    for name in ("local.sh", "multiprocess_cpu.sh", "slurm.sbatch", "tpu_pod.sh"):
        path = LAUNCH / name
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, name
        assert "usage:" in path.read_text().split("set -euo pipefail")[0], name
    usage = subprocess.run([str(LAUNCH / "multiprocess_cpu.sh"), "-h"], capture_output=True, text=True)
    assert usage.returncode == 0 and "usage:" in usage.stdout


def watch(directory: Path, timeout_s: float, seconds: float) -> subprocess.Popen:
    """Process 0 of 2's peer watch, in a process of its own (the watch exits it), for `seconds`."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; from jaxlm.distributed import PeerWatch; "
         f"PeerWatch(Path({str(directory)!r}), 0, 2, timeout_s={timeout_s}, interval_s=0.2).start(); "
         f"time.sleep({seconds})"], stderr=subprocess.PIPE, text=True)


def test_peer_watch_leaves_when_a_peer_stops_and_not_while_it_beats_or_is_done(tmp_path):
    """Peer 1 beats for 3 s, then stops."""
    watcher = watch(tmp_path, timeout_s=2, seconds=20)
    start = time.monotonic()
    for beat in range(15):  # peer 1's heartbeat, as its own watch would write it
        (tmp_path / "1").write_text(str(beat))
        time.sleep(0.2)
    assert watcher.poll() is None  # alive while the peer beats
    stopped = time.monotonic()
    rc = watcher.wait(timeout=30)
    assert rc == 1 and 1.5 < time.monotonic() - stopped < 10, time.monotonic() - start
    assert "process 0 of 2: process 1 sent no heartbeat" in watcher.stderr.read()
    done = watch(tmp_path, timeout_s=1, seconds=4)
    (tmp_path / "1.done").write_text("done")  # a peer that finished is not dead
    assert done.wait(timeout=30) == 0


def test_peer_watch_leaves_at_once_when_a_peer_failed(tmp_path):
    """A peer that failed with an error says so (`.failed`, not `.done`): the others leave without
    waiting for its heartbeat to time out."""
    watcher = watch(tmp_path, timeout_s=60, seconds=60)
    try:
        for beat in range(5):
            (tmp_path / "1").write_text(str(beat))
            time.sleep(0.2)
        failed = distributed.PeerWatch(tmp_path, 1, 2, timeout_s=60)  # peer 1's own watch, as the loop ends it
        failed.start().close(failed=True)
        assert (tmp_path / "1.failed").exists() and not (tmp_path / "1.done").exists()
        assert watcher.wait(timeout=10) == 1
    finally:
        stop([watcher])
    assert "process 0 of 2: process 1 failed (see its log); leaving the run" in watcher.stderr.read()
    distributed.PeerWatch(tmp_path, 1, 2, timeout_s=60).start().close()  # a next session that finishes
    assert (tmp_path / "1.done").exists() and not (tmp_path / "1.failed").exists()


def test_peer_watch_goes_on_when_its_heartbeat_cannot_be_written(tmp_path):
    """A heartbeat that fails to write (a full disk; here a folder in the way) is retried at the next
    beat, and the watch goes on judging the others meanwhile."""
    (tmp_path / "0.tmp").mkdir()
    watcher = watch(tmp_path, timeout_s=2, seconds=30)
    try:
        (tmp_path / "1").write_text("0")
        first = watcher.stderr.readline()  # at the first beat
        assert "process 0 of 2: cannot write its heartbeat" in first, first
        for beat in range(1, 10):
            (tmp_path / "1").write_text(str(beat))
            time.sleep(0.2)
        assert watcher.poll() is None and not (tmp_path / "0").exists()
        (tmp_path / "0.tmp").rmdir()
        for beat in range(10, 20):
            (tmp_path / "1").write_text(str(beat))
            time.sleep(0.2)
        assert (tmp_path / "0").exists()  # beating again
        assert watcher.wait(timeout=30) == 1  # peer 1 stopped: still watched
    finally:
        stop([watcher])
    assert "process 0 of 2: process 1 sent no heartbeat" in watcher.stderr.read()
