"""A run directory: self-contained (its tokenizer copied in, paths absolute, usable from anywhere),
never resumed under a config that trains something else, and `--step` errors that say what exists."""
import dataclasses
import shutil
import sys

import pytest
import yaml

from jaxlm import cli, runs
from jaxlm.config import ConfigError
from jaxlm.data.tokenizers.spm import train_sentencepiece
from jaxlm.testing import tiny_config, write_run

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]


def test_load_run_unpacks_into_config_params_tokenizer_mesh(tiny_run):
    cfg, params, tokenizer, mesh = run = runs.load_run(tiny_run)
    assert run.step == 20 and run.role == "policy" and cfg.train.steps == 20
    assert tokenizer.name == "byte" and set(params) >= {"embed", "layers", "final_norm"}
    assert params["embed"]["embedding"].sharding.mesh.shape == mesh.shape


def test_a_run_keeps_its_tokenizer_and_works_from_any_directory(tmp_path, monkeypatch, capsys):
    spm = train_sentencepiece(iter(TEXTS), tmp_path / "tok" / "spm", vocab_size=300, n_sentinels=3, num_threads=1)
    cfg = tiny_config(model=dict(vocab_size=400), data=dict(tokenizer=str(spm)))
    run_dir = write_run(tmp_path / "runs" / "spm", cfg, step=3)
    assert (run_dir / "tokenizer.model").read_bytes() == spm.read_bytes()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["tokenizer"] == str(spm) and saved["train"]["run_dir"] == str(run_dir)
    shutil.rmtree(tmp_path / "tok")  # the original is gone: the run's copy serves
    monkeypatch.chdir(tmp_path / "runs")
    assert runs.load_run(run_dir).tokenizer.vocab_size == 300
    assert cli.main(["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def _copy(tiny_run, tmp_path):
    """A copy of the session's run, to try writing into."""
    return shutil.copytree(tiny_run, tmp_path / "run")


@pytest.mark.parametrize("change, fragment", [
    (dict(model=dict(n_layers=3)), "model.n_layers=3 (saved: 2)"),
    (dict(data=dict(objective={"clm": 0.5, "fim": 0.5})),
     "data.objective={'clm': 0.5, 'fim': 0.5} (saved: {'clm': 1.0})"),
    (dict(data=dict(max_documents=61)), "data.max_documents=61 (saved: 60)"),
    (dict(train=dict(seq_len=16)), "train.seq_len=16 (saved: 32)"),
])
def test_a_run_directory_refuses_a_config_that_trains_something_else(tiny_run, tmp_path, change, fragment):
    run_dir = _copy(tiny_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    train = dict(change.get("train", {}), run_dir=str(run_dir))
    cfg = tiny_config(**{**change, "train": train})
    with pytest.raises(ConfigError) as info:
        runs.start(cfg)
    msg = str(info.value)
    assert "\n" not in msg and fragment in msg and "use another train.run_dir" in msg, msg
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing written


def test_a_run_directory_accepts_its_own_config_with_other_runtime_settings(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    cfg = tiny_config(train=dict(run_dir=str(run_dir), steps=40), model=dict(remat="full", scan_layers=False),
                      mesh=dict(rules="dp"), optim=dict(lr=1e-3))
    saved = runs.start(cfg)
    assert saved.train.steps == 40 and runs.run_config(run_dir).model.remat == "full"


def test_a_moved_run_is_not_started_over_at_its_old_path(tiny_run, tmp_path, capsys):
    moved = _copy(tiny_run, tmp_path)  # its config.yaml still names tiny_run
    assert cli.main(["pretrain", str(moved / "config.yaml"), "train.steps=21"]) == 2
    err = capsys.readouterr().err
    assert "the run was moved" in err and f"train.run_dir={moved}" in err and err.count("\n") == 1, err
    # with its directory named, it resumes where it is
    runs.check_not_moved(moved / "config.yaml", runs.run_config(moved, [f"train.run_dir={moved}"]))


def test_a_changed_tokenizer_file_is_refused(tmp_path):
    spm = train_sentencepiece(iter(TEXTS), tmp_path / "spm", vocab_size=300, n_sentinels=3, num_threads=1)
    cfg = tiny_config(model=dict(vocab_size=400), data=dict(tokenizer=str(spm)),
                      train=dict(run_dir=str(tmp_path / "run")))
    runs.start(cfg)
    train_sentencepiece(iter(TEXTS[::-1][:150]), tmp_path / "spm", vocab_size=310, n_sentinels=3, num_threads=1)
    with pytest.raises(ConfigError, match="is not the tokenizer the run .* was trained with"):
        runs.start(cfg)


def test_an_unusable_run_directory_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        runs.start(tiny_config(train=dict(run_dir=str(tmp_path / "file"))))


def test_a_step_that_does_not_exist_lists_those_that_do(tiny_run, capsys):
    assert cli.main(["generate", str(tiny_run), "--prompt", "x", "--step", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint at step 7" in err[0] and "it has steps 10, 15, 20" in err[0], err


def test_init_from_a_run_with_another_model_or_tokenizer_is_one_line(tiny_run, tmp_path):
    cfg = runs.run_config(tiny_run)
    other = dataclasses.replace(cfg.model, d_ff=48)
    with pytest.raises(ConfigError, match=r"model.d_ff=48 differs from the train.init_from run"):
        runs.check_init_from(other, "byte", tiny_run)
    spm = train_sentencepiece(iter(TEXTS), tmp_path / "spm", vocab_size=300, n_sentinels=3, num_threads=1)
    with pytest.raises(ConfigError, match="differs from the tokenizer of the train.init_from run"):
        runs.check_init_from(cfg.model, str(spm), tiny_run)
    runs.check_init_from(dataclasses.replace(cfg.model, remat="full", value_head=True), "byte", tiny_run)
    # context extension: a longer context with scaled RoPE starts from the shorter run's params
    longer = dataclasses.replace(cfg.model, max_seq_len=4 * cfg.model.max_seq_len, rope_scaling="yarn",
                                 rope_scaling_factor=4.0, rope_original_max_len=cfg.model.max_seq_len)
    runs.check_init_from(longer, "byte", tiny_run)
    runs.check_init_from(dataclasses.replace(cfg.model, sliding_window=16, attention_sinks=4), "byte", tiny_run)


def _tfevents(path):
    """The Event protos of a TensorBoard event file, each record's two CRCs checked."""
    import struct

    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    masked = lambda b: ((((crc32c(b) >> 15) | (crc32c(b) << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    data, events = path.read_bytes(), []
    while data:
        header, (header_crc,) = data[:8], struct.unpack("I", data[8:12])
        (n,) = struct.unpack("Q", header)
        body, (body_crc,) = data[12:12 + n], struct.unpack("I", data[12 + n:16 + n])
        assert header_crc == masked(header) and body_crc == masked(body)
        events.append(Event.FromString(body))
        data = data[16 + n:]
    return events


def test_metrics_go_to_jsonl_and_a_tensorboard_event_file(tmp_path):
    log = runs.MetricsWriter(tmp_path)
    log.scalars({"step": 1, "loss": 2.5, "eval_loss": 3.0, "rewards/accuracy": 0.5, "note": "x"})
    log.scalars({"step": 2, "loss": float("nan")})
    log.event("end", step=2)
    log.close()
    later = runs.MetricsWriter(tmp_path)  # another writer in the same second: a file of its own
    later.scalars({"step": 3, "loss": 1.0})
    later.close()
    assert runs.read_metrics(tmp_path)[:2] == [{"step": 1, "loss": 2.5, "eval_loss": 3.0, "rewards/accuracy": 0.5,
                                                "note": "x"},
                                               {"step": 2, "loss": None}]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a row the run is writing now
    assert runs.read_metrics(tmp_path)[-1] == {"step": 3, "loss": 1.0}
    path, other = sorted((tmp_path / "tensorboard").iterdir(), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    assert [(e.step, [v.tag for v in e.summary.value]) for e in _tfevents(other)[1:]] == [(3, ["train/loss"])]
    first, *rows = _tfevents(path)
    assert first.file_version == "brain.Event:2"
    got = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in rows]
    assert got == [(1, {"train/loss": 2.5, "eval/loss": 3.0, "rewards/accuracy": 0.5}), (2, {})]


# --- Weights & Biases: every metrics row, read back from the offline run's own file ----------------


def _wandb_history(run_dir) -> dict:
    """{run id: [{metric: value, "_step": step}, ...]} of the offline W&B runs under RUN_DIR/wandb, read
    from their .wandb files (a LevelDB log: 32 KiB blocks of chunks with 7-byte headers, after W&B's
    7-byte file header, each record a wandb_internal.proto `Record`)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    runs_of: dict = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, record = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            record, pos = record + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last chunk of one
                r = wandb_internal_pb2.Record.FromString(record)
                record = b""
                if r.WhichOneof("record_type") == "history":
                    row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in r.history.item}
                    runs_of.setdefault(path.stem.removeprefix("run-"), []).append(
                        {k: v for k, v in row.items() if k in ("_step",) or not k.startswith("_")})
    return runs_of


def test_metrics_rows_go_to_weights_and_biases_too_and_a_resumed_run_appends(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = tiny_config(train=dict(wandb_project="jaxlm-test", run_dir=str(run_dir)))
    writer = runs.MetricsWriter(run_dir, cfg=cfg)
    writer.scalars({"step": 1, "loss": 2.5, "eval_loss": 3.0, "rewards/accuracy": 0.5})
    writer.event("spike", step=1)
    writer.scalars({"step": 2, "loss": 2.0})
    writer.close()
    again = runs.MetricsWriter(run_dir, cfg=cfg)  # a resumed run
    again.scalars({"step": 3, "loss": 1.5})
    again.close()
    history = _wandb_history(run_dir)
    assert list(history) == [runs.wandb_run_id(run_dir)]  # one W&B run per run directory
    assert history[runs.wandb_run_id(run_dir)] == [
        {"_step": 1, "train/loss": 2.5, "eval/loss": 3.0, "rewards/accuracy": 0.5},
        {"_step": 2, "train/loss": 2.0}, {"_step": 3, "train/loss": 1.5}]
    assert len(runs.read_metrics(run_dir)) == 4  # metrics.jsonl as ever: 3 rows and the event


def test_weights_and_biases_not_installed_is_one_line_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = tiny_config(train=dict(wandb_project="p"))
    with pytest.raises(ConfigError, match=r"train.wandb_project='p' .* pip install wandb"):
        runs.MetricsWriter(tmp_path / "run", cfg=cfg)
    runs.MetricsWriter(tmp_path / "other", cfg=tiny_config()).close()  # off by default: no import
