"""SFT formats: hand-rendered tokens and masks, multi-turn masks, truncation policy, bad records."""
import json

import numpy as np
import pytest

from jaxlm.data.examples import chat as formats
from jaxlm.data.readers import read_records
from jaxlm.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
R = formats.Renderer.from_tokenizer(TOK)
ROLE = TOK.special_ids.roles
SYS, USER, ASSIST, END = ROLE["system"], ROLE["user"], ROLE["assistant"], ROLE["end_turn"]
EOS = TOK.eos_id


def b(text: str) -> list[int]:
    """Byte ids written out by hand: byte + 3."""
    return [c + 3 for c in text.encode()]


def chat(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_instruction_tokens_and_mask_by_hand():
    rec = {"instruction": "Add.", "input": "1 + 2", "output": "3"}
    ex = formats.render(R, rec, 64)
    prompt = b("### Instruction:\nAdd.\n\n1 + 2\n\n### Response:\n")
    seq = prompt + b("3") + [EOS]
    assert ex["tokens"].tolist() == seq[:-1]
    assert ex["targets"].tolist() == seq[1:]
    # Targets "3" and eos are trained (the model learns to stop); nothing else.
    assert ex["loss_mask"].tolist() == [0.0] * (len(prompt) - 1) + [1.0, 1.0]
    assert formats.prompt_ids(R, rec).tolist() == prompt
    assert formats.stop_token(R, rec) == EOS


def test_instruction_without_input_and_custom_template():
    r = formats.Renderer.from_tokenizer(TOK, "Q: {prompt}\nA:")
    ex = formats.render(r, {"instruction": "Hi?", "output": " yo"}, 64)
    seq = b("Q: Hi?\nA:") + b(" yo") + [EOS]
    assert ex["tokens"].tolist() == seq[:-1]
    assert ex["loss_mask"].tolist() == [0.0] * (len(b("Q: Hi?\nA:")) - 1) + [1.0] * 4
    with pytest.raises(ValueError, match="prompt"):
        formats.Renderer.from_tokenizer(TOK, "no placeholder")


def test_three_turn_chat_trains_exactly_the_three_assistant_spans():
    rec = chat(("system", "S"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a22"),
               ("user", "u3"), ("assistant", "a333"))
    ex = formats.render(R, rec, 128)
    seq, trained = [], []
    for m in rec["messages"]:
        is_a = m["role"] == "assistant"
        seq += [ROLE[m["role"]]] + b(m["content"]) + [END]
        trained += [False] + [is_a] * (len(m["content"]) + 1)
    assert ex["tokens"].tolist() == seq[:-1] and ex["targets"].tolist() == seq[1:]
    assert ex["loss_mask"].tolist() == [float(t) for t in trained[1:]]
    # Read back: the trained targets are exactly each assistant reply followed by <|end_turn|>.
    targets, mask = ex["targets"], ex["loss_mask"].astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    spans = [targets[a:z].tolist() for a, z in zip(edges[::2], edges[1::2])]
    assert spans == [b("a1") + [END], b("a22") + [END], b("a333") + [END]]
    # The generation prompt is the conversation up to the last reply, then the assistant marker.
    assert formats.prompt_ids(R, rec).tolist() == seq[:len(seq) - len(b("a333")) - 1]
    assert formats.stop_token(R, rec) == END


def _turns(ex):
    """Role markers in an example's tokens, in order."""
    inverse = {v: k for k, v in ROLE.items()}
    return [inverse[t] for t in np.append(ex["tokens"], ex["targets"][-1]) if t in inverse]


def test_trim_context_drops_oldest_turns_keeps_system_and_last_response():
    rec = chat(("system", "sys"), ("user", "u" * 20), ("assistant", "a" * 20), ("user", "v" * 5),
               ("assistant", "last"))
    full = len(formats.render(R, rec, 1000)["tokens"])
    # Room for all but the first exchange: it goes whole (user and assistant), the system stays.
    small = full - (20 + 2) - (20 + 2)
    ex = formats.render(R, rec, small)
    assert _turns(ex) == ["system", "end_turn", "user", "end_turn", "assistant", "end_turn"]
    assert len(ex["tokens"]) == small
    assert TOK.decode(ex["tokens"]).startswith("sys" + "v" * 5)
    # One token less: the last prompt loses its oldest tokens; the response is kept whole.
    ex = formats.render(R, rec, small - 2)
    assert TOK.decode(ex["tokens"]) == "sys" + "v" * 3 + "last"
    assert ex["targets"][ex["loss_mask"] > 0].tolist() == b("last") + [END]
    # Dropping the first user turn alone would leave the assistant turn first: both go.
    ex = formats.render(R, rec, full - 3)
    assert _turns(ex)[:3] == ["system", "end_turn", "user"] and "u" not in TOK.decode(ex["tokens"])


def test_trim_context_on_instructions_cuts_the_start_of_the_prompt():
    rec = {"instruction": "abcdefgh", "output": "xy"}
    full = len(formats.render(R, rec, 1000)["tokens"])
    ex = formats.render(R, rec, full - 3)
    assert TOK.decode(ex["tokens"]) == "### Instruction:\ndefgh\n\n### Response:\nxy"
    # The template and response alone do not fit: dropped, never cut inside the response.
    assert formats.render(R, rec, full - 9) == "too_long"
    assert formats.render(R, rec, full - 1, truncation="drop") == "too_long"


def test_bad_records_are_counted_and_the_rest_used(tmp_path):
    good = {"instruction": "a", "output": "b"}
    lines = [json.dumps(good), "{not json", json.dumps([1, 2]), json.dumps({"text": "plain"}),
             json.dumps({"instruction": "a"}), json.dumps({"instruction": "a", "output": "  "}),
             json.dumps(chat(("user", "hi"), ("robot", "x"))), json.dumps(chat(("assistant", "x"), ("user", "hi"))),
             json.dumps(chat(("user", "hi"), ("assistant", ""), ("user", "again"), ("assistant", "ok"))),
             json.dumps({"messages": []}), json.dumps(chat(("user", "q"), ("assistant", "r"))), "",
             json.dumps("malformed_json"), "7"]  # a JSON string or number is a record of unknown format
    path = tmp_path / "sft.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    examples, counts = formats.render_all(R, read_records([path]), 64)
    assert len(examples) == 2 and counts["used"] == 2
    assert {k: v for k, v in counts.items() if k not in ("records", "used", "truncated")} == {
        "malformed_json": 1, "invalid_utf8": 1, "unknown_format": 4, "missing_field": 2, "empty_response": 2,
        "unknown_role": 1, "not_ending_with_assistant": 1}
    assert counts["records"] == 14


def test_chat_needs_role_markers():
    r = formats.Renderer(TOK.encode, EOS, dict.fromkeys(ROLE))
    with pytest.raises(ValueError, match="role markers"):
        formats.render(r, chat(("user", "q"), ("assistant", "r")), 64)
