"""Config: YAML + dotted overrides compose, presets, round trip, one-line errors naming the key."""
import dataclasses
from pathlib import Path

import jax
import pytest
import yaml

from jaxlm.config import (
    PRESET_NAMES,
    Config,
    ConfigError,
    MeshConfig,
    load_config,
    model_preset,
    save_config,
)
from jaxlm.sharding import make_mesh


def _error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# Each case: overrides, then fragments the one-line message must contain (the key, and
# what is allowed).
BAD = {
    "unknown key": (["model.n_layer=2"], ["'model.n_layer'", "n_layers", "d_model"]),
    "unknown section": (["trian.steps=3"], ["'trian'", "model", "train", "optim", "mesh", "data"]),
    "str for int": (["train.steps=ten"], ["train.steps", "'ten'", "int"]),
    "bool for int": (["train.steps=true"], ["train.steps", "True", "int"]),
    "float for int": (["train.batch_size=2.5"], ["train.batch_size", "2.5", "int"]),
    "int for bool": (["model.tie_embeddings=1"], ["model.tie_embeddings", "true or false"]),
    "str for float": (["optim.lr=fast"], ["optim.lr", "'fast'", "float"]),
    "heads vs d_model": (["model.d_model=100", "model.n_heads=3"], ["model.n_heads=3", "model.d_model=100"]),
    "kv heads vs heads": (["model.n_heads=4", "model.n_kv_heads=3"], ["model.n_kv_heads=3", "model.n_heads=4"]),
    "negative warmup": (["optim.warmup_steps=-1"], ["optim.warmup_steps=-1", ">= 0"]),
    "seq_len > max": (["model.max_seq_len=64", "train.seq_len=65"],
                      ["train.seq_len=65", "model.max_seq_len=64"]),
    "accum vs batch": (["train.batch_size=10", "train.grad_accum_steps=4"],
                       ["train.grad_accum_steps=4", "train.batch_size=10"]),
    "remat choice": (["model.remat=some"], ["model.remat='some'", "none, dots, full"]),
    "rules choice": (["mesh.rules=tp"], ["mesh.rules='tp'", "dp, fsdp, fsdp_tp"]),
    "decay choice": (["optim.decay=step"], ["optim.decay='step'", "cosine, linear, inverse_sqrt, constant"]),
    "unknown preset": (["model.preset=3b"], ["model.preset='3b'", "tiny", "7b", "70b"]),
    "two -1 mesh": (["mesh.data=-1", "mesh.fsdp=-1"], ["mesh.data", "mesh.fsdp", "-1"]),
    "sequence shards": (["train.seq_len=250", "mesh.sequence=4"], ["train.seq_len=250", "mesh.sequence=4"]),
    "sequence -1": (["mesh.sequence=-1"], ["mesh.sequence=-1", ">= 1"]),
    "not key=value": (["train.steps"], ["'train.steps'", "key.sub=value"]),
    "value not YAML": (["train.steps=[1,"], ["'train.steps=[1,'", "'[1,'", "not valid YAML"]),
    "attention choice": (["model.attention=flash"], ["model.attention='flash'", "auto, blocks, cudnn, reference"]),
    "shuffle block": (["data.shuffle_block=0"], ["data.shuffle_block=0", "positive"]),
    "infinite lr": (["optim.lr=.inf"], ["optim.lr=inf", "finite"]),
    "nan spike factor": (["train.spike_factor=.nan"], ["train.spike_factor=nan", "finite"]),
    "infinite objective weight": (["data.objective={clm: .inf, fim: 1.0}"], ["data.objective.clm=inf", "finite"]),
    "causal encoder": (["model.arch=encoder_decoder", "data.bidirectional_prefix=false"],
                       ["data.bidirectional_prefix=false", "model.arch=decoder", "encoder_decoder"]),
}


@pytest.mark.parametrize("overrides, fragments", BAD.values(), ids=BAD.keys())
def test_bad_override_is_one_line_naming_key_and_allowed(overrides, fragments):
    msg = _error(overrides)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_bad_values_in_a_yaml_file_are_reported_like_overrides(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {n_layer: 2}\n")
    msg = _error(path=path)
    assert "'model.n_layer'" in msg and "n_layers" in msg and "\n" not in msg
    path.write_text("train: {steps: true}\n")
    msg = _error(path=path)
    assert "train.steps" in msg and "int" in msg and "\n" not in msg


def test_missing_and_malformed_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _error(path=missing)
    assert str(missing) in msg and "does not exist" in msg and "\n" not in msg
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {n_layers: [1,\n  2\ntrain: :\n")
    msg = _error(path=broken)
    assert str(broken) in msg and "YAML" in msg and "\n" not in msg
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    msg = _error(path=listy)
    assert str(listy) in msg and "mapping" in msg


def test_mesh_product_must_equal_device_count():
    assert jax.device_count() == 8
    with pytest.raises(ConfigError) as info:
        make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    msg = str(info.value)
    assert "\n" not in msg
    assert "mesh.data*mesh.fsdp*mesh.sequence*mesh.tensor" in msg and "3" in msg and "8 devices" in msg
    with pytest.raises(ConfigError, match="do not divide the 8 devices"):
        make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1))


def test_defaults_validate():
    assert load_config() == Config()


def test_file_and_overrides_compose_and_override_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {n_layers: 3, d_model: 64}\ntrain: {steps: 500, run_dir: runs/a}\n")
    cfg = load_config(path, ["train.steps=700", "optim.lr=0.01", "model.n_heads=2"])
    assert cfg.train.steps == 700  # the override beats the file
    assert cfg.train.run_dir == "runs/a"  # untouched file values survive
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (3, 64, 2)
    assert cfg.optim.lr == 0.01
    assert cfg.model.vocab_size == Config().model.vocab_size  # unspecified: the default


def test_preset_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: 125m, n_layers: 2}\n")
    cfg = load_config(path, ["model.d_ff=1000"])
    expected = dataclasses.replace(model_preset("125m"), n_layers=2, d_ff=1000)
    assert cfg.model == expected
    assert cfg.model != model_preset("125m")
    # An override may change the preset itself; the file's other keys still apply on top.
    cfg = load_config(path, ["model.preset=1b"])
    assert cfg.model == dataclasses.replace(model_preset("1b"), n_layers=2)
    assert set(PRESET_NAMES) >= {"tiny", "125m", "1b", "7b", "70b"}


def test_overrides_parse_yaml_scalars():
    cfg = load_config(None, ["optim.lr=1e-4", "model.norm_eps=1.0e-6", "model.tie_embeddings=true",
                             "train.run_dir=/tmp/x y", "train.init_from=", "optim.clip_norm=0"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.norm_eps == pytest.approx(1e-6)
    assert cfg.model.tie_embeddings is True
    assert cfg.train.run_dir == "/tmp/x y"
    assert cfg.train.init_from == ""
    assert cfg.optim.clip_norm == 0.0 and isinstance(cfg.optim.clip_norm, float)


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=7b", "model.norm_eps=1e-6", "model.remat=dots",
                             "model.tie_embeddings=true", "mesh.fsdp=4", "mesh.data=-1",
                             "mesh.rules=fsdp_tp", "optim.lr=3e-5", "optim.decay=linear",
                             "train.run_dir=runs/yes", "train.steps=1234", "train.seq_len=2048",
                             "train.batch_size=12", "train.grad_accum_steps=3"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert yaml.safe_load(path.read_text())["train"]["run_dir"] == "runs/yes"  # not the bool True
    again = load_config(path)
    assert again == cfg
    assert again != Config()


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/**/*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_parses_and_validates(path):
    if path.parent.name == "pipeline":  # a pipeline of stage configs: each validated as it is composed
        from jaxlm import pipeline

        assert all(s.cfg is not None or s.name == "eval" for s in pipeline.load(path)[1])
        return
    cfg = load_config(path)
    assert cfg.train.seq_len <= cfg.model.max_seq_len  # validated as a whole
    assert cfg == load_config(path, [])  # and reads the same again


def test_there_are_shipped_configs():
    assert len(list(REPO.glob("configs/**/*.yaml"))) >= 7


def test_the_config_reference_is_generated_from_the_schema_and_gives_every_key_a_meaning():
    from jaxlm.config import reference

    path = Path(__file__).parents[1] / "docs" / "config.md"
    assert path.read_text() == reference.markdown(), \
        "docs/config.md is stale: python -m jaxlm.config.reference > docs/config.md"
    rows = [line for line in path.read_text().splitlines() if line.startswith("| `")]
    keys = {row.split("`")[1] for row in rows}
    assert {"model.sliding_window", "train.seq_len", "data.sources[].weight", "ppo.kl_coef"} <= keys
    assert [row for row in rows if row.endswith("|  |")] == []  # every key says what it does
    assert reference.field_notes(_Commented) == {"a": "", "b": "above b, two lines after b", "c": "after c's default"}


@dataclasses.dataclass(frozen=True)
class _Commented:
    a: int = 1

    # above b,
    # two lines
    b: str = "#"  # after b
    c: dict = dataclasses.field(default_factory=lambda: {
        "x": 1})  # after c's default


def test_yaml_1_2_booleans_yes_and_off_are_strings(tmp_path):
    """PyYAML reads yes/no/on/off as booleans (YAML 1.1); a config means the word (YAML 1.2), so a
    key that wants a bool names the word, and one that wants a string gets it."""
    with pytest.raises(ConfigError, match="model.remat='yes' is not allowed; choose one of: none, dots, full"):
        load_config(None, overrides=["model.remat=yes"])
    with pytest.raises(ConfigError, match="train.async_checkpoint='off' has the wrong type; expected true or false"):
        load_config(None, overrides=["train.async_checkpoint=off"])
    path = tmp_path / "c.yaml"
    path.write_text("train: {async_checkpoint: FALSE, run_dir: no}\nprepare: {sources: [{name: on, paths: [x]}]}\n")
    cfg = load_config(path)
    assert (cfg.train.async_checkpoint, cfg.train.run_dir, cfg.prepare.sources[0].name) == (False, "no", "on")


def test_a_mapping_override_replaces_the_files_and_a_longer_key_sets_one_entry(tmp_path):
    from jaxlm.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("data: {objective: {span_corruption: 1.0}}\n")
    assert load_config(path, ["data.objective={prefix_lm: 1.0}"]).data.objective == {"prefix_lm": 1.0}
    assert load_config(path, ["data.objective.clm=0.5"]).data.objective == {"span_corruption": 1.0, "clm": 0.5}
    with pytest.raises(ConfigError, match="not of the form section.key"):
        load_config(path, ["train=3"])
