"""The `jaxlm` command line: help texts, one-line errors with exit status 2, the huge-page restart."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import yaml

from jaxlm import cli, config, hugepages

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
    out, err = capsys.readouterr()
    assert "note: optim.warmup_steps=5 is more than the 2 optimizer steps of this run: the learning rate of " \
           "policy rises to 40% of its peak and never decays" in err, err
    run = config_file.parent / "run"
    assert "[jaxlm] done: step 2, train loss " in out and f"run directory: {run} " in out, out
    assert f"next: jaxlm generate {run} --prompt" in out, out


@pytest.mark.parametrize("flag", [None, "--quiet", "--json"])
def test_the_console_and_what_quiet_and_json_leave_of_it(flag, config_file, capsys):
    assert cli.main(["pretrain", str(config_file), "data.max_documents=20", "train.seq_len=32", "train.batch_size=8",
                     "optim.warmup_steps=5", *[flag] * bool(flag)]) == 0
    out, err = capsys.readouterr()
    assert "note: optim.warmup_steps=5" in err  # a warning stays
    if flag is None:  # a banner, plain progress lines (the output is no terminal), held-out losses, a summary
        assert out.startswith("[jaxlm] pretrain: ") and "M parameters; 8 cpu devices (mesh " in out, out
        assert "[jaxlm] step 2/2: loss " in out and "[jaxlm] step 2: held-out accuracy " in out, out
        assert "[jaxlm] done: step 2, train loss " in out and "\nnext: jaxlm generate " in out, out
    elif flag == "--quiet":
        assert out == "" and err.splitlines() == [e for e in err.splitlines() if e.startswith("note: ")], err
    else:
        (line,) = out.splitlines()
        assert json.loads(line)["final_step"] == 2


@pytest.mark.parametrize("name, kinds", [
    ("configs/pretrain/tiny.yaml", ()),  # as in a clone, from any directory
    ("jaxlm:pretrain/tiny.yaml", ()),
    ("pretrain/tiny", ()),
    ("tiny", ("pretrain",)),
    ("tiny.yaml", ("data", "pretrain")),
])
def test_a_shipped_config_is_found_by_name_from_any_directory(name, kinds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.find_config(name, kinds) == REPO / "jaxlm" / "configs" / "pretrain" / "tiny.yaml"


def test_a_file_of_ones_own_comes_before_a_shipped_config_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "pretrain").mkdir(parents=True)
    (tmp_path / "configs" / "pretrain" / "tiny.yaml").write_text("train: {steps: 3}\n")
    assert config.find_config("configs/pretrain/tiny.yaml").resolve() == tmp_path / "configs/pretrain/tiny.yaml"


def test_an_unknown_config_name_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sft", "tiniest"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "'tiniest'" in lines[0] and "sft/tiny" in lines[0] and "pretrain/" not in lines[0]


def test_the_package_ships_every_config_and_config_list_names_a_command_that_takes_each(capsys):
    shipped = sorted(str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").rglob("*.yaml"))
    assert config.shipped_configs() == shipped and len(shipped) >= 15
    assert cli.main(["config", "list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in rows] == shipped
    for name, jaxlm, *command in rows:
        args = cli.parser().parse_args(command)  # e.g. `jaxlm rejection-sample tiny`
        assert jaxlm == "jaxlm" and config.find_config(args.config, cli.KINDS[args.command]) == \
            REPO / "jaxlm" / "configs" / f"{name}.yaml"


def test_config_show_prints_the_resolved_config_with_overrides(capsys):
    assert cli.main(["config", "show", "pretrain/tiny", "train", "model", "--model.n_layers=3",
                     "--train.steps", "7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = config.to_dict(config.load_config(REPO / "configs/pretrain/tiny.yaml",
                                                 ["model.n_layers=3", "train.steps=7"]))
    assert list(shown) == ["train", "model"] and shown == {k: expected[k] for k in ("train", "model")}
    assert cli.main(["config", "show", "optim"]) == 0  # no file: the defaults
    assert yaml.safe_load(capsys.readouterr().out) == {"optim": config.to_dict(config.Config())["optim"]}


def test_dotted_flags_are_overrides():
    assert cli._dotted_flags(["pretrain", "tiny", "--train.steps=10", "--model.remat", "full", "x.y=1",
                              "--json", "--data.tokenizer"]) == \
        ["pretrain", "tiny", "train.steps=10", "model.remat=full", "x.y=1", "--json", "data.tokenizer="]
    assert cli._dotted_flags(["eval", "run", "--qa", "a.jsonl", "--step", "3"]) == \
        ["eval", "run", "--qa", "a.jsonl", "--step", "3"]


def test_overrides_may_follow_options():
    args = cli._parse(["pipeline", "tiny", "--until", "pretrain", "pretrain.train.steps=20", "dir=x"])
    assert args.until == "pretrain" and args.overrides == ["pretrain.train.steps=20", "dir=x"]
    args = cli._parse(["eval", "run", "a.b=1", "--qa", "f.jsonl", "mesh.fsdp=1"])
    assert args.qa == ["f.jsonl"] and args.overrides == ["a.b=1", "mesh.fsdp=1"]
    with pytest.raises(SystemExit):
        cli._parse(["report", "dir", "a.b=1"])  # report takes no overrides
