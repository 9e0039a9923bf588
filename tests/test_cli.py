"""The `jaxlm` command line: help texts, one-line errors with exit status 2, the huge-page restart."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm import cli, hugepages

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, fragments", [
    ([], ["usage: jaxlm", "pretrain", "bench"]),
    (["pretrain"], ["usage: jaxlm pretrain", "config", "key.sub=value", "RUN_DIR"]),
    (["bench"], ["usage: jaxlm bench", "--steps", "--compare", "name=value"]),
])
def test_help_exits_zero_with_usage(argv, fragments, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for fragment in fragments:
        assert fragment in out, (fragment, out)


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "usage: jaxlm" in capsys.readouterr().err


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{preset: tiny, n_layers: 1}}\ntrain: {{steps: 2, run_dir: {tmp_path / 'run'}}}\n"
                    "optim: {warmup_steps: 1}\n")
    return path


@pytest.mark.parametrize("command", ["pretrain", "bench"])
@pytest.mark.parametrize("override, fragments", [
    ("train.steps=ten", ["train.steps", "'ten'", "int"]),
    ("model.remat=most", ["model.remat", "none, dots, full"]),
])
def test_bad_override_in_process(command, override, fragments, config_file, tmp_path, capsys):
    assert cli.main([command, str(config_file), override]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jaxlm {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert captured.out == ""
    assert not (tmp_path / "run").exists()  # nothing ran


def test_missing_config_file_in_process(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert cli.main(["pretrain", str(missing)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxlm pretrain: error: ") and str(missing) in lines[0]


def test_bad_override_as_a_process(config_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "jaxlm", "pretrain", str(config_file), "model.n_layer=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback
    assert lines[0].startswith("jaxlm pretrain: error: ")
    assert "'model.n_layer'" in lines[0] and "n_layers" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hugepages.huge_pages_help(), reason="needs glibc >= 2.35 and transparent huge pages on madvise")
@pytest.mark.parametrize("preset, starts", [(None, [None, hugepages.HUGE_PAGES]), ("", [""])])
def test_the_command_restarts_itself_once_with_huge_pages_unless_tunables_are_set(preset, starts, tmp_path):
    # A sitecustomize records every interpreter start of the process: its pid and GLIBC_TUNABLES.
    (tmp_path / "sitecustomize.py").write_text(
        "import json, os\n"
        f"with open({str(tmp_path / 'starts.jsonl')!r}, 'a') as f:\n"
        "    f.write(json.dumps([os.getpid(), os.environ.get('GLIBC_TUNABLES')]) + '\\n')\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), str(REPO), os.environ.get("PYTHONPATH")]))
    if preset is not None:
        env["GLIBC_TUNABLES"] = preset
    proc = subprocess.run([sys.executable, "-m", "jaxlm", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "usage: jaxlm" in proc.stdout, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "starts.jsonl").read_text().splitlines()]
    assert [tunables for _, tunables in records] == starts
    assert len({pid for pid, _ in records}) == 1  # exec: the same process, not a child


def test_a_smoke_run_shorter_than_its_warmup_runs_and_says_so(config_file, capsys):
    assert cli.main(["pretrain", str(config_file), "optim.warmup_steps=5", "train.progress=false",
                     "data.max_documents=20", "train.seq_len=32", "train.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "note: optim.warmup_steps=5 is more than the 2 optimizer steps of this run: the learning rate of " \
           "policy rises to 40% of its peak and never decays" in out, out
