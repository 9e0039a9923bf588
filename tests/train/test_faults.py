"""Faults a cluster or a user causes, and what the loop does about them: damaged checkpoints are
set aside and the run resumes from the newest intact one, while a checkpoint of another optimizer
or one that fails to read for another reason is kept and the run stops; a diverging run stops
after bounded restores with a non-zero exit; a save that will not fit stops the run at once;
signals stop at a step boundary with that step saved (unless a bad step is pending); a kill
during a save loses nothing that was complete."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxlm import checkpoint, cli, runs
from jaxlm.checkpoint import Checkpointer, CheckpointCorrupt, NonFiniteState, restore_params
from jaxlm.errors import ConfigError, RunFailed
from jaxlm.testing import TINY_RUN, merge, tiny_config
from jaxlm.train import loop, pretrain

FAULT_WORKER = Path(__file__).with_name("fault_worker.py")


# --- the checkpoint itself ------------------------------------------------------------------


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_4k(step_dir: Path):
    path = _largest_file(step_dir / "policy")
    data = bytearray(path.read_bytes())
    start = len(data) // 4
    data[start:start + 4096] = bytes(b ^ 0x5A for b in data[start:start + 4096])
    path.write_bytes(bytes(data))


def truncate(step_dir: Path):
    path = _largest_file(step_dir / "policy")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_params(step_dir: Path):
    shutil.rmtree(step_dir / "policy")


def empty_meta(step_dir: Path):
    (step_dir / "meta" / "metadata").write_text("")


def stray_folder(step_dir: Path):
    """An empty folder named like a newer step (a copy or a cleanup gone wrong)."""
    shutil.rmtree(step_dir)
    step_dir.mkdir()


CORRUPTIONS = {"flipped 4 KiB": flip_4k, "truncated": truncate, "params deleted": delete_params,
               "empty meta": empty_meta, "stray empty folder": stray_folder}


@pytest.fixture
def saved(tmp_path):
    """A checkpointer of run directory tmp_path/run holding steps 1 and 2 of a small state, and that
    state per step."""
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    states = {}
    for s in (1, 2):
        params = {"policy": {"w": jnp.arange(3000, dtype=jnp.float32) * s, "b": jnp.ones((7,), jnp.bfloat16)}}
        opt = {"policy": {"mu": jnp.full((3000,), 0.5 * s), "count": jnp.asarray(s, jnp.int32)}}
        ckpt.save(s, params, opt, {"step": s})
        states[s] = (params, opt)
    return ckpt, states


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_damaged_checkpoint_is_refused_and_set_aside(saved, corrupt):
    ckpt, states = saved
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states[2])
    corrupt(ckpt.directory / "2")
    ckpt.manager.reload()  # as a new start would list the steps
    assert ckpt.latest_step() == 2
    with pytest.raises(CheckpointCorrupt, match="checkpoint 2 ") as e:
        ckpt.restore(2, *target)
    assert "\n" not in str(e.value) and "TensorStore" not in str(e.value) and "pybind11" not in str(e.value)
    moved = ckpt.set_aside(2)
    assert moved.name == "2.broken" and moved.is_dir() and ckpt.latest_step() == 1
    params, opt, meta = ckpt.restore(1, *target)
    jax.tree.map(np.testing.assert_array_equal, (params, opt), states[1])
    assert meta["step"] == 1


def test_an_intact_checkpoint_restores_onto_another_sharding_with_the_same_digest(saved):
    ckpt, states = saved
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split if x.ndim and
                                                         x.shape[0] % 4 == 0 else x.sharding), states[2])
    params, _, _ = ckpt.restore(2, *target)  # the digest is checked on the other layout
    assert params["policy"]["w"].sharding == split


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _with_w(params, w):
    return {"policy": {**params["policy"], "w": w}}


@pytest.mark.parametrize("change, needle", [
    (lambda p, o: (p, {"policy": {"v_row": o["policy"]["mu"], "count": o["policy"]["count"]}}),
     "opt_state: 1 stored arrays this run lacks (e.g. 'policy/mu'), 1 arrays of this run not stored "
     "(e.g. 'policy/v_row')"),
    (lambda p, o: (_with_w(p, jnp.zeros(3001)), o), "policy: 'w' is float32[3000] there, float32[3001] here"),
    (lambda p, o: (_with_w(p, jnp.zeros(3000, jnp.bfloat16)), o), "'w' is float32[3000] there, bfloat16[3000] here"),
], ids=["optimizer", "shape", "dtype"])
def test_a_checkpoint_of_another_layout_is_refused_as_a_config_error(saved, change, needle):
    ckpt, states = saved
    with pytest.raises(ConfigError, match="checkpoint 2 was written with a different optimizer or model") as e:
        ckpt.restore(2, *_abstract(change(*states[2])))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_params_read_alone_are_checked_against_their_digest(saved):
    ckpt, states = saved
    run_dir = ckpt.directory.parent
    target = _abstract(states[2][0]["policy"])
    params, step = restore_params(run_dir, target)
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, params, states[2][0]["policy"])
    # Step 1's params, complete and readable, in step 2's place: only the digest tells.
    shutil.rmtree(ckpt.directory / "2" / "policy")
    shutil.copytree(ckpt.directory / "1" / "policy", ckpt.directory / "2" / "policy")
    with pytest.raises(CheckpointCorrupt, match="checkpoint 2 does not match the digest written with it"):
        restore_params(run_dir, target)
    flip_4k(ckpt.directory / "2")  # data that cannot be decoded: one line, no traceback of the reader
    with pytest.raises(CheckpointCorrupt, match="^checkpoint 2 ") as e:
        restore_params(run_dir, target, step=2)
    assert "\n" not in str(e.value) and "pybind11" not in str(e.value)


def test_a_checkpoint_with_one_digest_for_all_items_still_reads(saved):
    """Checkpoints written before per-item digests: restore checks the one digest, restore_params reads unchecked."""
    ckpt, states = saved
    meta_file = ckpt.directory / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    params, opt = states[1]
    meta.pop("digests")
    meta["digest"] = checkpoint.digest({"params": params, "opt_state": opt})[0]
    meta_file.write_text(json.dumps(meta))
    restored, _, _ = ckpt.restore(1, *_abstract(states[1]))
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    assert restore_params(ckpt.directory.parent, _abstract(params["policy"]), step=1)[1] == 1
    meta["digest"][0] += 1  # a changed file, as the old digest sees it
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointCorrupt, match="does not match the digest"):
        ckpt.restore(1, *_abstract(states[1]))


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.00GiB."),
     "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.00GiB"),
    (Exception("Encountered error while reading array index: (slice(0, 7, 1),). See full TensorStore details: "
               "<bound method pybind11_detail_function_record_v1.spec of TensorStore({\n  'base': {\n"),
     "Encountered error while reading array index: (slice(0, 7, 1),)"),
], ids=["ENOSPC", "device out of memory", "TensorStore"])
def test_an_error_is_told_in_one_readable_line(error, reason):
    assert checkpoint._first_line(error) == reason


def test_only_a_finite_state_is_saved(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    with pytest.raises(NonFiniteState):
        ckpt.save(1, {"policy": {"w": jnp.array([1.0, jnp.nan])}}, {"policy": {}}, {"step": 1})
    assert ckpt.all_steps() == []


# --- through the loop -------------------------------------------------------------------------


def _losses(run_dir, since_start: int = 1) -> dict:
    """step -> logged loss, from the `since_start`-th session of the run on (1: all)."""
    rows, starts = {}, 0
    for r in runs.read_metrics(run_dir):
        starts += r.get("event") == "start"
        if starts >= since_start and "loss" in r and "event" not in r:
            rows[r["step"]] = r["loss"]
    return rows


@pytest.mark.slow
def test_the_run_resumes_from_the_newest_intact_checkpoint(tiny_run, tmp_path, capsys):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    flip_4k(run_dir / "checkpoints" / "20")
    summary = pretrain.main(tiny_config(train=dict(run_dir=str(run_dir))))
    assert summary["final_step"] == 20
    err = [line for line in capsys.readouterr().err.splitlines() if "set_aside" in line]
    assert len(err) == 1 and "step=20" in err[0] and "instead=15" in err[0], err
    assert (run_dir / "checkpoints" / "20.broken").is_dir()
    events = runs.read_metrics(run_dir)
    assert [e["step"] for e in events if e.get("event") == "resume"] == [15]
    straight, resumed = _losses(tiny_run), _losses(run_dir, since_start=2)
    assert [resumed[s] for s in range(16, 21)] == [straight[s] for s in range(16, 21)]  # the same steps again


class Poisoned:
    """Batches that hold stream positions in [first_bad, last_bad) have a NaN in their loss mask."""

    def __init__(self, inner, first_bad: int, last_bad: float = float("inf")):
        self.inner, self.first_bad, self.last_bad = inner, first_bad, last_bad

    def batch(self, cursor, global_batch, process_index=0, process_count=1):
        b = self.inner.batch(cursor, global_batch, process_index, process_count)
        if cursor + global_batch > self.first_bad and cursor < self.last_bad:
            b = dict(b, loss_mask=np.where(np.arange(b["loss_mask"].size).reshape(b["loss_mask"].shape) == 0,
                                           np.nan, b["loss_mask"]).astype(np.float32))
        return b


@pytest.mark.slow
def test_a_run_that_keeps_going_bad_after_a_checkpoint_stops_after_bounded_restores(tmp_path):
    cfg = tiny_config(train=dict(run_dir=str(tmp_path / "run"), steps=40, save_every=5, max_bad_steps=2,
                                 max_restores_per_step=2, eval_every=40))
    stage = pretrain.build(cfg)
    stage.train_data = Poisoned(stage.train_data, first_bad=8 * 7)  # every step from step 8 on
    with pytest.raises(RunFailed, match=r"bad steps followed checkpoint 5 3 times"):
        loop.run(cfg, stage)
    rows = runs.read_metrics(tmp_path / "run")
    restores = [r for r in rows if r.get("event") == "restore"]
    assert [r["restored_step"] for r in restores] == [5, 5]
    # Data skipped by restores is counted once: the examples since checkpoint 5 (cursor 40) up to the
    # first restore, then those since the first restore.
    (a, b), (_, d) = (r["skipped_examples"] for r in restores)
    assert a == 40 and [r["skipped_total"] for r in restores] == [b - 40, d - 40]
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    bad_rows = [r for r in rows if "loss" in r and "event" not in r and r["loss"] is None]
    assert bad_rows and all(r["grad_norm"] is None for r in bad_rows)  # written as null
    assert Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == 5  # no bad state saved


def test_a_run_whose_every_step_is_bad_fails_without_a_checkpoint(tmp_path, capsys):
    tree = merge(TINY_RUN, train=dict(run_dir=str(tmp_path / "run"), steps=12, save_every=4, max_bad_steps=2,
                                      eval_every=12), optim=dict(lr=1e9, warmup_steps=0, decay="constant",
                                                                 clip_norm=0.0))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["pretrain", str(tmp_path / "cfg.yaml")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("jaxlm pretrain: failed: ") and ("diverges" in err[-1] or "no step" in err[-1]), err
    assert not Checkpointer(tmp_path / "run" / "checkpoints").all_steps()


def test_a_run_that_learned_nothing_saves_nothing_and_a_rerun_fails_again(tmp_path, tiny_run):
    cfg = tiny_config(train=dict(run_dir=str(tmp_path / "run"), steps=4, save_every=2, max_bad_steps=10, eval_every=4))
    stage = pretrain.build(cfg)
    stage.train_data = Poisoned(stage.train_data, first_bad=0)  # no update is ever applied
    with pytest.raises(RunFailed, match="no step of the run was finite"):
        loop.run(cfg, stage)
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == []
    # A rerun counts the updates a checkpoint holds, not its step: none is nothing learned.
    run_dir = shutil.copytree(tiny_run, tmp_path / "copy")
    meta_file = run_dir / "checkpoints" / "20" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta["step"] == meta["updates"] == 20
    meta_file.write_text(json.dumps({**meta, "updates": 0}))
    with pytest.raises(RunFailed, match="no step of the run was finite"):
        pretrain.main(tiny_config(train=dict(run_dir=str(run_dir))))


@pytest.mark.slow
def test_a_rerun_with_another_optimizer_stops_and_sets_nothing_aside(tiny_run, tmp_path):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"another config: optim.name='adafactor' \(saved: 'adamw'\)"):
        pretrain.main(tiny_config(optim=dict(name="adafactor"), train=dict(run_dir=str(run_dir))))
    (run_dir / "config.yaml").unlink()  # no config to compare: the checkpoint's own layout refuses it
    with pytest.raises(ConfigError, match=r"^checkpoint 20 was written with a different optimizer or model "
                                          r"\(opt_state: .*\); use the run's config, or a new train.run_dir$"):
        pretrain.main(tiny_config(optim=dict(name="adafactor"), train=dict(run_dir=str(run_dir))))
    assert Checkpointer(run_dir / "checkpoints").all_steps() == [10, 15, 20]
    assert not list((run_dir / "checkpoints").glob("*.broken*"))


@pytest.mark.slow
def test_a_checkpoint_that_fails_to_read_for_another_reason_is_kept(tiny_run, tmp_path, monkeypatch):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.00GiB.")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", out_of_memory)
    with pytest.raises(RunFailed) as e:
        pretrain.main(tiny_config(train=dict(run_dir=str(run_dir))))
    assert not isinstance(e.value, CheckpointCorrupt)
    assert str(e.value).startswith("checkpoint 20 could not be read (RESOURCE_EXHAUSTED: Out of memory"), e.value
    assert Checkpointer(run_dir / "checkpoints").all_steps() == [10, 15, 20]
    assert not list((run_dir / "checkpoints").glob("*.broken*"))


@pytest.mark.slow
def test_a_run_whose_checkpoints_were_all_set_aside_does_not_start_over(tiny_run, tmp_path):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    for step in (10, 15, 20):
        flip_4k(run_dir / "checkpoints" / str(step))
    cfg = tiny_config(train=dict(run_dir=str(run_dir)))
    with pytest.raises(RunFailed, match="no checkpoint in .* could be read"):
        pretrain.main(cfg)
    with pytest.raises(RunFailed, match=r"holds no intact checkpoint, only ones set aside as damaged \(10.broken, "
                                        r"15.broken, 20.broken\)"):
        pretrain.main(cfg)  # the next start: refused, not a fresh run from step 0
    assert Checkpointer(run_dir / "checkpoints").all_steps() == []
    assert [r["step"] for r in runs.read_metrics(run_dir) if r.get("event") == "start"] == [0]  # tiny_run's only


@pytest.mark.slow
def test_a_step_set_aside_during_the_run_is_saved_again(tmp_path, monkeypatch):
    cfg = tiny_config(train=dict(run_dir=str(tmp_path / "run"), steps=15, save_every=5, eval_every=15,
                                 max_bad_steps=1, async_checkpoint=False))
    stage = pretrain.build(cfg)
    stage.train_data = Poisoned(stage.train_data, first_bad=80, last_bad=88)  # step 11 alone
    checkpoints = tmp_path / "run" / "checkpoints"

    def damage_10(done_step):
        if done_step == 11 and not (checkpoints / "10.broken").exists():  # the restore step 11 calls for finds it
            flip_4k(checkpoints / "10")

    monkeypatch.setattr(loop, "step_hooks", [damage_10])
    loop.run(cfg, stage)
    events = runs.read_metrics(tmp_path / "run")
    assert [(e["step"], e["instead"]) for e in events if e.get("event") == "set_aside"] == [(10, 5)]
    assert [e["restored_step"] for e in events if e.get("event") == "restore"] == [5]
    assert (checkpoints / "10.broken").is_dir()
    assert Checkpointer(checkpoints).all_steps() == [5, 10, 15]  # step 10 written again on the way


def _sigterm_at(step):
    def hook(done_step):
        if done_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


@pytest.mark.slow
def test_a_stop_right_after_a_bad_step_saves_nothing_and_says_so(tmp_path, monkeypatch):
    cfg = tiny_config(train=dict(run_dir=str(tmp_path / "run"), steps=20, save_every=5, eval_every=20,
                                 max_bad_steps=5))
    stage = pretrain.build(cfg)
    stage.train_data = Poisoned(stage.train_data, first_bad=8 * 6)  # every step from step 7 on
    monkeypatch.setattr(loop, "step_hooks", [_sigterm_at(7)])
    with pytest.raises(loop.Interrupted) as e:
        loop.run(cfg, stage)
    assert (e.value.code, e.value.saved, e.value.latest) == (143, None, 5)
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [5]


@pytest.mark.slow
def test_a_stopped_and_resumed_run_keeps_the_guards_running_mean(tmp_path, monkeypatch):
    cfg = tiny_config(train=dict(run_dir=str(tmp_path / "run"), steps=12, save_every=5, eval_every=12,
                                 spike_factor=3.0))
    monkeypatch.setattr(loop, "step_hooks", [_sigterm_at(6)])
    with pytest.raises(loop.Interrupted) as e:
        pretrain.main(cfg)
    assert (e.value.saved, e.value.latest) == (7, 7)  # the step dispatched when the signal came
    monkeypatch.setattr(loop, "step_hooks", [])
    pretrain.main(cfg)
    events = runs.read_metrics(tmp_path / "run")
    assert not [e for e in events if e.get("event") == "spike"]
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 13))
    mean = losses[1]  # the guard's running mean, by hand, over both sessions' steps
    for s in range(2, 13):
        mean = 0.9 * mean + 0.1 * losses[s]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "12" / "meta" / "metadata").read_text())
    np.testing.assert_allclose(meta["guard"]["loss_mean"], mean, rtol=1e-6)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_the_save_that_does_not_fit(tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        tree = merge(TINY_RUN, train=dict(run_dir=str(disk / "run"), steps=20, save_every=5, eval_every=20,
                                          keep_checkpoints=5))
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
        assert cli.main(["pretrain", str(tmp_path / "cfg.yaml")]) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err  # jaxlm's line, no traceback (Orbax's own logging is quiet)
        # Refused before the write (the free space was short), or reported at the next step (the
        # write itself ran out): which one depends on Orbax's metadata, a few KiB either way.
        assert (err[0].startswith("jaxlm pretrain: failed: no room for checkpoint") and "MiB are free" in err[0]
                or err[0].startswith("jaxlm pretrain: failed: writing a checkpoint") and "no space left" in err[0]), err
        ckpt = Checkpointer(disk / "run" / "checkpoints")
        kept = ckpt.all_steps()
        assert kept and f"checkpoint is {kept[-1]}" in err[0]
        ckpt.close()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- signals and kills, from outside the process ------------------------------------------------


def _config(tmp_path, name, **train) -> Path:
    tree = merge(TINY_RUN, train=dict(run_dir=str(tmp_path / name), **train))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _cli(path, fault=None, delay=0.0):
    argv = ["-m", "jaxlm"] if fault is None else [str(FAULT_WORKER), str(fault[0]), fault[1], str(delay)]
    return subprocess.run([sys.executable, *argv, "pretrain", str(path)], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigterm_during_a_save_saves_once_and_exits_for_requeue(tiny_run, tmp_path):
    path = _config(tmp_path, "run")
    t0 = time.monotonic()
    out = _cli(path, fault=(10, "TERM"), delay=0.02)  # step 10 is a save: the signal lands inside it
    assert out.returncode == 143, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (event,) = [r for r in runs.read_metrics(tmp_path / "run") if r.get("event") == "interrupted"]
    assert out.stderr.strip().splitlines()[-1] == \
        f"jaxlm pretrain: interrupted (SIGTERM); saved at step {event['step']}, where it stopped"
    steps = Checkpointer(tmp_path / "run" / "checkpoints").all_steps()
    assert steps[-1] == event["step"] >= 10
    assert sorted(_losses(tmp_path / "run")) == list(range(1, event["step"] + 1))  # a row up to the stop
    assert time.monotonic() - t0 < 300
    resumed = _cli(path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got, want = _losses(tmp_path / "run"), _losses(tiny_run)
    assert [got[s] for s in range(1, 21)] == [want[s] for s in range(1, 21)]


@pytest.mark.slow
def test_kill_during_a_save_resumes_exactly(tiny_run, tmp_path):
    path = _config(tmp_path, "run")
    out = _cli(path, fault=(10, "KILL"), delay=0.02)
    assert out.returncode == -9
    # the save of step 10 was complete or is not there at all (on a loaded machine step 5's may
    # still have been in flight too: then there is none)
    complete = Checkpointer(tmp_path / "run" / "checkpoints").all_steps()
    assert set(complete) <= {5, 10}, complete
    resumed = _cli(path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    starts = [r["step"] for r in runs.read_metrics(tmp_path / "run") if r.get("event") == "resume"]
    assert starts == complete[-1:]  # from the newest complete checkpoint, or from the start without one
    got, want = _losses(tmp_path / "run"), _losses(tiny_run)
    assert [got[s] for s in range(1, 21)] == [want[s] for s in range(1, 21)]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.broken"))
