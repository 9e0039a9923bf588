"""The loop: exact resume after a hard kill, recovery from bad steps, init_from, outputs."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxlm.checkpoint import Checkpointer
from jaxlm.config import load_config
from jaxlm.train import pretrain
from jaxlm.train.loop import run
from jaxlm.runs import read_metrics
from jaxlm.testing import TINY_RUN, merge, tiny_config


def write_config(tmp_path, name, **train):
    tree = merge(TINY_RUN, train=dict(run_dir=str(tmp_path / name), **train))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


FAULT_WORKER = Path(__file__).with_name("fault_worker.py")


def pretrain_cli(config_path, fault=None):
    """`jaxlm pretrain CONFIG` in a process of its own; fault=(step, signal) kills it there."""
    argv = ["-m", "jaxlm"] if fault is None else [str(FAULT_WORKER), str(fault[0]), fault[1]]
    return subprocess.run([sys.executable, *argv, "pretrain", str(config_path)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight_run(tiny_run):
    """The session's run of TINY_RUN: trained in process, it is the reference for the runs below."""
    return tiny_run


@pytest.mark.slow
def test_killed_and_resumed_run_equals_straight_run(straight_run, tmp_path):
    path = write_config(tmp_path, "killed")
    killed = pretrain_cli(path, fault=(13, "KILL"))
    assert killed.returncode == -9  # SIGKILL: no cleanup, no final checkpoint
    assert Checkpointer(tmp_path / "killed" / "checkpoints").latest_step() == 10
    resumed = pretrain_cli(path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = [r for r in read_metrics(tmp_path / "killed") if r.get("event") == "resume"]
    assert events and events[0]["step"] == 10 and events[0]["cursor"] == 80
    expected = losses(straight_run)
    got = losses(tmp_path / "killed")  # steps 11..13 logged twice: the resumed values win
    assert sorted(got) == list(range(1, 21))
    np.testing.assert_array_equal([got[s] for s in range(1, 21)], [expected[s] for s in range(1, 21)])
    evals = lambda d: [r["eval_loss"] for r in read_metrics(d) if "eval_loss" in r]
    assert evals(tmp_path / "killed")[-1] == evals(straight_run)[-1]


def test_run_writes_resolved_config_and_learns(straight_run):
    cfg = load_config(straight_run / "config.yaml")
    assert cfg.train.steps == 20 and cfg.model.d_model == 32
    got = losses(straight_run)
    assert got[20] < got[1] - 1.0
    assert (straight_run / "tensorboard").is_dir()
    # Every logged row counts the sequences of its own steps, also next to saves and evals.
    rows = [r for r in read_metrics(straight_run) if "tokens_per_s" in r and "event" not in r]
    assert len(rows) == 20 and all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    # The logged lr is the one step s used: linear warmup over 2 steps, cosine to 10% at step 20.
    peak, final = 3e-3, 3e-4
    want = [peak * s / 2 if s < 2 else final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (s - 2) / 18))
            for s in range(20)]
    np.testing.assert_allclose([r["lr"] for r in rows], want, rtol=1e-6)


@pytest.mark.slow
def test_init_from_starts_from_another_runs_params(straight_run, tmp_path):
    cfg = tiny_config(train=dict(steps=2, run_dir=str(tmp_path / "b"), init_from=str(straight_run)))
    run(cfg, pretrain.build(cfg))
    first = losses(tmp_path / "b")[1]
    assert first < losses(straight_run)[1] - 1.0  # far below a fresh model's first loss


class Poisoned:
    """Wraps a data source; batches touching stream positions `bad` get a NaN loss mask or pad targets."""

    def __init__(self, inner, bad: range, kind: str):
        self.inner, self.bad, self.kind = inner, bad, kind

    def batch(self, cursor, global_batch, process_index=0, process_count=1):
        b = self.inner.batch(cursor, global_batch, process_index, process_count)
        if any(cursor + i in self.bad for i in range(global_batch)):
            b = {k: v.copy() for k, v in b.items()}
            if self.kind == "nan":
                b["loss_mask"][0, 0] = np.nan
            else:
                b["targets"] = np.zeros_like(b["targets"])  # pad: a token the model learns never comes
        return b


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nan", "spike"])
def test_bad_steps_restore_last_checkpoint_and_skip_their_batches(tmp_path, kind):
    cfg = tiny_config(optim=dict(lr=1e-2), train=dict(steps=30, save_every=10, run_dir=str(tmp_path / kind),
                                                      max_bad_steps=3, spike_factor=1.3 if kind == "spike" else 0.0))
    stage = pretrain.build(cfg)
    bad = range(8 * 14, 8 * 17)  # the batches of steps 15, 16, 17
    stage.train_data = Poisoned(stage.train_data, bad, kind)
    summary = run(cfg, stage)
    events = read_metrics(tmp_path / kind)
    flagged = [r["step"] for r in events if r.get("event") == ("nonfinite" if kind == "nan" else "spike")]
    assert flagged == [15, 16, 17]
    restores = [r for r in events if r.get("event") == "restore"]
    assert len(restores) == 1 and restores[0]["restored_step"] == 10
    assert summary["restores"] == 1 and summary["final_step"] == 30
    assert summary["skipped_examples"] == restores[0]["skipped_examples"][1] - 80 > 0
    if kind == "nan":
        assert summary["skipped"] == 3
    params = Checkpointer(tmp_path / kind / "checkpoints").latest_step()
    assert params == 30
    assert np.isfinite(summary["eval_loss"])


def test_sequence_sharded_run_equals_the_unsharded_run(tmp_path):
    """Context parallelism through the real loop: each sequence split over mesh.sequence=2 (batch on
    fsdp=4) trains to the same losses, gradient norms and held-out loss as the whole sequence (fsdp=8)."""
    rows, summaries = {}, {}
    for name, mesh in (("whole", dict(fsdp=8)), ("split", dict(fsdp=4, sequence=2))):
        cfg = tiny_config(train=dict(steps=4, save_every=4, eval_every=4, run_dir=str(tmp_path / name)), mesh=mesh)
        summaries[name] = pretrain.main(cfg)
        rows[name] = read_metrics(tmp_path / name)
    start = next(r for r in rows["split"] if r.get("event") == "start")
    assert start["mesh"] == {"stage": 1, "data": 1, "fsdp": 4, "sequence": 2, "tensor": 1}
    steps = {name: [r for r in rs if "loss" in r and "event" not in r] for name, rs in rows.items()}
    assert [r["step"] for r in steps["split"]] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in steps["split"]], [r[key] for r in steps["whole"]], rtol=2e-5)
    np.testing.assert_allclose(summaries["split"]["eval_loss"], summaries["whole"]["eval_loss"], rtol=2e-5)
