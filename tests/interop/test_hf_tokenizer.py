"""data.tokenizer: PATH/tokenizer.json through the `tokenizers` package, and its absence."""
import json
import sys

import pytest

from jaxlm.config import ConfigError, from_dict
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.interop import import_run

SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>"]


@pytest.fixture
def tokenizer_json(tmp_path):
    """A byte-level BPE tokenizer.json with bos/eos/pad named in tokenizer_config.json beside it."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)], trainer)
    directory = tmp_path / "tok"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>"}))
    return directory / "tokenizer.json"


def test_tokenizer_json(tokenizer_json):
    assert from_dict({"data": {"tokenizer": str(tokenizer_json)}}).data.tokenizer == str(tokenizer_json)
    tok = load_tokenizer(str(tokenizer_json))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.special_ids.roles["user"] == 3 and tok.special_ids.roles["assistant"] is None
    assert tok.special_ids.fim_prefix is None and tok.special_ids.sentinels == ()
    text = "the lazy fox, naïve café 🎉\n\tend"
    ids = tok.encode(text)
    assert ids.dtype.name == "int32" and 1 not in ids and 2 not in ids  # no bos/eos added
    assert tok.decode(ids) == text
    assert tok.decode([1, *ids, 2, 0]) == text  # pad/bos/eos dropped
    with_role = tok.encode("<|user|>the fox", specials=True)
    assert with_role[0] == 3 and tok.decode(with_role[1:]) == "the fox"
    assert 3 not in tok.encode("<|user|>the fox").tolist()  # unasked, the added token is text
    assert [list(x) for x in tok.encode_batch(["the fox", text])] == [list(tok.encode("the fox")), list(ids)]
    assert tok.vocab_size == 300


def test_missing_tokenizers_package_is_one_clear_line(tokenizer_json, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ConfigError) as info:
        load_tokenizer(str(tokenizer_json))
    assert str(info.value) == (f"data.tokenizer={str(tokenizer_json)!r} needs the `tokenizers` package "
                               "(pip install tokenizers)")


def test_convert_uses_a_tokenizer_json_when_there_is_no_tokenizer_model(tokenizer_json, hf_dir, odd_cfg,
                                                                         tmp_path):
    src, _, _ = hf_dir(odd_cfg)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tokenizer_json.parent / name).read_bytes())
    cfg, notes = import_run(src, tmp_path / "run")
    assert cfg.data.tokenizer == str((tmp_path / "run" / "hf" / "tokenizer.json").absolute())
    assert load_tokenizer(cfg.data.tokenizer).eos_id == 2 and notes == []
