"""SentencePiece training with reserved specials at fixed ids, and the tokenizer around it."""
import numpy as np
import pytest
import sentencepiece

from jaxlm.config import ConfigError
from jaxlm.data.corpus import stdlib_documents
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.data.tokenizers.specials import SPECIAL_TOKENS, SpecialIds, special_tokens
from jaxlm.data.tokenizers.spm import SentencePieceTokenizer, min_vocab_size, train_sentencepiece

TRICKY = [
    "def f(x):\n\tif x:\n\t\treturn  x   +  1\n",
    "class A:\n    def __init__(self):\n        self.x = [1, 2, 3]  # trailing  \n\n\n",
    "  leading spaces, trailing spaces   ",
    "\r\nwindows\r\nline ends\r\n",
    "unicode: naïve café 日本語 Ελληνικά ∑∫√",
    "emoji 🎉🐍👩‍💻 and a lone one: 🦀",
    "",
    " ",
    "\t\t\n",
]


@pytest.fixture(scope="module")
def corpus_texts():
    return [text for _, text in stdlib_documents(max_documents=30).documents]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, corpus_texts):
    path = train_sentencepiece(iter(corpus_texts), tmp_path_factory.mktemp("spm") / "tiny",
                               vocab_size=600, num_threads=2)
    assert path.name == "tiny.model" and path.is_file()
    return SentencePieceTokenizer(path)


def test_special_tokens_have_fixed_ids(tok):
    assert len(SPECIAL_TOKENS) == 4 + 3 + 3 + 100 + 4
    assert [tok.id_to_piece(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert SPECIAL_TOKENS[:4] == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.special_ids == SpecialIds(
        pad=0, bos=1, eos=2, unk=3, fim_prefix=4, fim_middle=5, fim_suffix=6,
        ul2={"r": 7, "s": 8, "x": 9}, sentinels=tuple(range(10, 110)),
        roles={"system": 110, "user": 111, "assistant": 112, "end_turn": 113})
    # Byte fallback pieces follow the specials.
    assert [tok.id_to_piece(i) for i in (114, 369)] == ["<0x00>", "<0xFF>"]
    assert tok.vocab_size == 600


def test_user_symbols_in_text_encode_to_their_one_id_when_asked_and_to_text_otherwise(tok):
    for i, piece in enumerate(SPECIAL_TOKENS[4:], start=4):
        assert tok.encode(piece, specials=True).tolist() == [i]
        text = f"x{piece}y = 1 {piece}{piece}\n"
        ids = tok.encode(text, specials=True)
        assert (ids == i).sum() == 3, piece
        assert tok.decode(ids) == text
        literal = tok.encode(text)  # the default: text is text
        assert not (literal < 114).any() and tok.decode(literal) == text, piece
    # Symbols next to each other, and inside words, still come out whole.
    text = "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|><|sentinel_99|><|end_turn|>"
    assert [i for i in tok.encode(text, specials=True).tolist() if i < 114] == [4, 6, 5, 109, 113]


def test_control_symbols_cannot_come_from_text(tok):
    ids = tok.encode("<pad><s></s><unk>")
    assert not np.isin(ids, [0, 1, 2, 3]).any()
    assert tok.decode(ids) == "<pad><s></s><unk>"


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert tok.decode(ids) == text


def test_round_trip_on_corpus_documents(tok, corpus_texts):
    for text in corpus_texts[:10]:
        assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_fall_back_to_bytes(tok):
    ids = tok.encode("🦀")
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    assert not (ids == tok.special_ids.unk).any()


def test_digits_split_one_per_token(tok):
    learned = [tok.id_to_piece(i) for i in range(min_vocab_size(), tok.vocab_size)]
    assert any(c.isdigit() for p in learned for c in p)  # digits were seen in training
    assert all(sum(c.isdigit() for c in p) <= 1 for p in learned)
    ids = tok.encode("x = 1234567890")
    digits = [tok.id_to_piece(i) for i in ids if any(c.isdigit() for c in tok.id_to_piece(i))]
    assert [p.lstrip("\u2581") for p in digits] == list("1234567890")


def test_decode_drops_pad_bos_eos_and_out_of_range(tok):
    text = "return x"
    ids = [1, *tok.encode(text).tolist(), 2, 0, 0, -5, 10_000]
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.int32)) == text


def test_encode_batch_matches_encode(tok):
    batch = tok.encode_batch(TRICKY, num_threads=2)
    assert len(batch) == len(TRICKY)
    for text, ids in zip(TRICKY, batch):
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, tok.encode(text))


def test_load_tokenizer_by_model_path(tok):
    loaded = load_tokenizer(str(tok.path))
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.name == str(tok.path) and loaded.vocab_size == 600
    np.testing.assert_array_equal(loaded.encode(TRICKY[0]), tok.encode(TRICKY[0]))
    with pytest.raises(ConfigError, match=r"'spm'.*byte.*\.model"):
        load_tokenizer("spm")


def test_missing_model_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(missing)


def test_foreign_model_loads_with_missing_specials_as_none(tmp_path, corpus_texts):
    prefix = tmp_path / "plain"
    sentencepiece.SentencePieceTrainer.train(  # sentencepiece's defaults: unk=0, bos=1, eos=2, no pad
        sentence_iterator=iter(corpus_texts[:10]), model_prefix=str(prefix), vocab_size=300,
        max_sentence_length=1 << 20, minloglevel=2)
    plain = SentencePieceTokenizer(f"{prefix}.model")
    assert plain.special_ids == SpecialIds(
        pad=None, bos=1, eos=2, unk=0, ul2={"r": None, "s": None, "x": None}, sentinels=(),
        roles={"system": None, "user": None, "assistant": None, "end_turn": None})
    assert plain.special_ids.fim_prefix is None and plain.pad_id is None
    assert plain.decode([1, *plain.encode("import os").tolist(), 2]) == "import os"


def test_sentinel_count_is_configurable(tmp_path, corpus_texts):
    path = train_sentencepiece(corpus_texts[:5], tmp_path / "few", vocab_size=400,
                               n_sentinels=3, num_threads=1)
    ids = SentencePieceTokenizer(path).special_ids
    assert ids.sentinels == (10, 11, 12)
    assert ids.roles == {"system": 13, "user": 14, "assistant": 15, "end_turn": 16}
    assert len(special_tokens(3)) == 17


def test_too_small_vocab_names_vocab_size_and_minimum(tmp_path, corpus_texts):
    assert min_vocab_size() == 114 + 256
    with pytest.raises(ValueError, match=r"vocab_size=300 .*370"):
        train_sentencepiece(corpus_texts[:2], tmp_path / "small", vocab_size=300)
    # Above the floor but below specials + bytes + the corpus's characters: still a ValueError.
    with pytest.raises(ValueError, match=r"vocab_size=371 .*need at least \d+"):
        train_sentencepiece(corpus_texts[:5], tmp_path / "small", vocab_size=371, num_threads=1)


def test_byte_tokenizer_provides_special_ids():
    ids = load_tokenizer("byte").special_ids
    assert (ids.pad, ids.bos, ids.eos, ids.unk, ids.fim_prefix) == (0, 1, 2, None, 259)
    assert len(ids.sentinels) == 100 and ids.roles["end_turn"] == 368
