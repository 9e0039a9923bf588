"""Faults a cluster or a user causes, and what the loop does about them: damaged checkpoints are
set aside and the run resumes from the newest intact one; a diverging run stops after bounded
restores with a non-zero exit; a save that will not fit stops the run at once; signals stop
at a step boundary with that step saved; a kill during a save loses nothing that was complete."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxlm import cli, runs
from jaxlm.checkpoint import Checkpointer, CheckpointCorrupt, NonFiniteState
from jaxlm.errors import RunFailed
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
    """A checkpointer holding steps 1 and 2 of a small state, and that state per step."""
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
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
    with pytest.raises(CheckpointCorrupt, match="checkpoint 2 "):
        ckpt.restore(2, *target)
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
    """Batches from stream position `first_bad` on have a NaN in their loss mask."""

    def __init__(self, inner, first_bad: int):
        self.inner, self.first_bad = inner, first_bad

    def batch(self, cursor, global_batch, process_index=0, process_count=1):
        b = self.inner.batch(cursor, global_batch, process_index, process_count)
        if cursor + global_batch > self.first_bad:
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
    assert out.stderr.strip().splitlines()[-1] == "jaxlm pretrain: interrupted (SIGTERM); saved at the step it stopped"
    (event,) = [r for r in runs.read_metrics(tmp_path / "run") if r.get("event") == "interrupted"]
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
    resumed = _cli(path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (start,) = [r for r in runs.read_metrics(tmp_path / "run") if r.get("event") == "resume"]
    assert start["step"] in (5, 10)  # the save of step 10 was complete or it was not there at all
    got, want = _losses(tmp_path / "run"), _losses(tiny_run)
    assert [got[s] for s in range(1, 21)] == [want[s] for s in range(1, 21)]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.broken"))
