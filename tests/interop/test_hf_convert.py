"""`jaxlm convert`: HF directory -> jaxlm run -> HF directory, what the run holds, and one-line errors."""
import json
import shutil

import jax
import pytest

from jaxlm import cli
from jaxlm.checkpoint import restore_params
from jaxlm.config import load_config
from jaxlm.data.tokenizers.spm import train_sentencepiece
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.interop import export_run, import_run, load_hf
from jaxlm.testing import write_run
from jaxlm.train.pretrain import lm_objective, policy_role
from jaxlm.train.state import compile_stage

TEXTS = [f"The {w} number {i} jumps over {i * 7 % 13} lazy dogs; café naïve {w}.\n"
         for i in range(60) for w in ("quick", "slow", "brown", "green")]


def test_cli_round_trip(hf_dir, odd_cfg, assert_same, tmp_path, capsys):
    src, params, _ = hf_dir(odd_cfg)
    train_sentencepiece(iter(TEXTS), src / "tokenizer", vocab_size=400, n_sentinels=3, num_threads=1)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    run, out = tmp_path / "run", tmp_path / "out"

    assert cli.main(["convert", "--from-hf", str(src), "--out", str(run)]) == 0
    assert "imported" in capsys.readouterr().out
    cfg = load_config(run / "config.yaml")  # a complete, valid jaxlm Config
    assert cfg.model == odd_cfg and cfg.train.run_dir == str(run)
    assert cfg.data.tokenizer == str((run / "hf" / "tokenizer.model").absolute())
    assert load_tokenizer(cfg.data.tokenizer).vocab_size == 400
    # What the loop does for train.init_from: restore into the stage's sharded params target.
    stage = compile_stage(cfg, policy_role(cfg), lm_objective(cfg.model))
    restored, step = restore_params(run, stage.abstract_state["params"]["policy"])
    assert step == 0
    assert_same(params, jax.device_get(restored))

    assert cli.main(["convert", "--to-hf", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "tokenizer.model" in printed
    for name in ("tokenizer.model", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    cfg2, params2 = load_hf(out)
    assert cfg2 == odd_cfg
    assert_same(params, jax.device_get(params2))


def test_export_follows_init_from_to_the_imported_family(hf_dir, odd_cfg, assert_same, tmp_path):
    """A run fine-tuned from an imported Mistral exports as Mistral, with its own latest params."""
    src, params, _ = hf_dir(odd_cfg, family="mistral")
    first, tuned, out = tmp_path / "imported", tmp_path / "tuned", tmp_path / "out"
    import_run(src, first)
    cfg = load_config(first / "config.yaml", [f"train.init_from={first}"])
    new_params = jax.tree.map(lambda x: x * 2, params)
    write_run(tuned, cfg, new_params, step=7)
    files, notes = export_run(tuned, out)
    assert "read the params of step 7" in notes
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    assert_same(new_params, jax.device_get(load_hf(out)[1]))


def one_line_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxlm convert: error: "), captured.err
    return lines[0]


def test_errors(hf_dir, tmp_path, capsys):
    src, _, hf = hf_dir()
    import_run(src, tmp_path / "run")
    assert "already holds a run" in one_line_error(
        ["convert", "--from-hf", str(src), "--out", str(tmp_path / "run")], capsys)
    assert "is not a jaxlm run (no config.yaml)" in one_line_error(
        ["convert", "--to-hf", str(src), "--out", str(tmp_path / "x")], capsys)
    export_run(tmp_path / "run", tmp_path / "out")
    assert "already holds a checkpoint" in one_line_error(
        ["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")], capsys)
    assert "is a jaxlm run directory" in one_line_error(
        ["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "run")], capsys)
    other = tmp_path / "gpt2"
    shutil.copytree(src, other)
    (other / "config.json").write_text(json.dumps({**hf, "architectures": ["GPT2LMHeadModel"]}))
    message = one_line_error(["convert", "--from-hf", str(other), "--out", str(tmp_path / "r2")], capsys)
    assert "architecture 'GPT2LMHeadModel' is not supported" in message
    assert not (tmp_path / "r2").exists()  # nothing written
    assert "has no config.json" in one_line_error(
        ["convert", "--from-hf", str(tmp_path / "run"), "--out", str(tmp_path / "r3")], capsys)
    with pytest.raises(SystemExit) as info:  # needs one of --from-hf / --to-hf
        cli.main(["convert", "--out", str(tmp_path / "r4")])
    assert info.value.code == 2


def test_help_names_both_directions(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for fragment in ("--from-hf DIR", "--to-hf RUN_DIR", "--out", "no CONFIG"):
        assert fragment in out
