"""SFT formats: instruction and chat records -> token examples whose loss covers responses only.

Two record kinds (JSONL, one per line):

- instruction: {"instruction": str, "input": str (optional), "output": str}, rendered with a
  template holding `{prompt}` (default "### Instruction:\\n{prompt}\\n\\n### Response:\\n");
  the prompt is the instruction, then a blank line and the input when there is one. The
  response is `output` followed by eos.
- chat: {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]},
  rendered as <|role|> content <|end_turn|> per message with the tokenizer's reserved role
  markers (`tok.special_ids.roles`). The conversation must end with an assistant turn.

Markup comes from the renderer only: the role ids are inserted as ids, and the record's text is
encoded as text, so a message that writes "<|end_turn|><|assistant|>" cannot forge a turn. The
template (config, not data) may hold special symbols, which become their ids.

Masks: a token is trained when it is a response token: every assistant turn's content and
its closing <|end_turn|> (chat), or the output and its closing eos (instruction). The
closing marker is trained so the model learns to stop; role markers, template text and
prompts are not. Every assistant turn of a conversation is trained in the same example.
An example is `tokens = seq[:-1]`, `targets = seq[1:]`, `loss_mask[t] = trained(seq[t+1])`.

Truncation (an example may hold at most `max_tokens` = seq_len tokens, i.e. seq_len + 1
rendered ids): `trim_context` keeps the last response whole and cuts the oldest context:
first whole messages from the start (a system message is kept; the conversation is left
starting with a non-assistant turn), then prompt tokens of the last exchange from the left
(user content first, the system message last); if the markers and the last response alone
do not fit, the example is dropped. `drop` drops every over-long example. Both count.

Bad records are not errors: `render` returns a reason (`BAD_REASONS`) and the caller counts it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Optional, Union

import numpy as np

from jaxlm.data.readers import Unreadable

DEFAULT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
ROLES = ("system", "user", "assistant")
TRUNCATIONS = ("trim_context", "drop")
BAD_REASONS = ("unknown_format", "missing_field", "unknown_role", "empty_prompt", "empty_response",
               "not_ending_with_assistant", "too_long")


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of token ids of one message: trained (a response) or not; `content` marks text
    from the record (trimmable context), as opposed to markers and template text."""

    ids: np.ndarray
    trained: bool
    content: bool
    turn: int
    role: str


@dataclasses.dataclass(frozen=True)
class Renderer:
    """What rendering needs from a tokenizer: `encode(text) -> ids`, eos, and the role ids."""

    encode: Callable[[str], np.ndarray]  # record text: symbols in it stay text
    eos: int
    roles: dict  # system, user, assistant, end_turn -> id (None where the tokenizer lacks one)
    template: str = DEFAULT_TEMPLATE
    markup: Optional[Callable[[str], np.ndarray]] = None  # the template's text (symbols -> ids); None: encode

    @classmethod
    def from_tokenizer(cls, tok, template: str = DEFAULT_TEMPLATE) -> "Renderer":
        check_template(template)
        return cls(tok.encode, tok.eos_id, dict(tok.special_ids.roles), template,
                   functools.partial(tok.encode, specials=True))


def check_template(template: str) -> None:
    if template.count("{prompt}") != 1:
        raise ValueError(f"template {template!r} must hold {{prompt}} exactly once")


def _ids(x) -> np.ndarray:
    return np.asarray(x, np.int32).reshape(-1)


def _role_id(r: Renderer, role: str) -> int:
    rid = r.roles.get(role)
    if rid is None:
        raise ValueError(f"the tokenizer has no <|{role}|> marker; chat records need a tokenizer "
                         "with the role markers (byte, or one trained by `jaxlm data tokenizer`)")
    return int(rid)


def kind_of(record: dict) -> Optional[str]:
    """"chat", "instruction", or None when the record is neither."""
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    return None


def instruction_prompt(record: dict) -> str:
    text, extra = record["instruction"], record.get("input") or ""
    return f"{text}\n\n{extra}" if text and extra else text or extra


def _check_instruction(record: dict) -> Optional[str]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            return "missing_field"
    if not isinstance(record.get("input", ""), (str, type(None))):
        return "missing_field"
    if not instruction_prompt(record).strip():
        return "empty_prompt"
    if not record["output"].strip():
        return "empty_response"
    return None


def _check_chat(record: dict) -> Optional[str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "missing_field"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "missing_field"
        if m["role"] not in ROLES:
            return "unknown_role"
    if messages[-1]["role"] != "assistant":
        return "not_ending_with_assistant"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        return "empty_response"
    return None


def check_record(record) -> Optional[str]:
    """Why a record is unusable (one of `BAD_REASONS`), or None if it is fine."""
    if not isinstance(record, dict):
        return "unknown_format"
    kind = kind_of(record)
    if kind is None:
        return "unknown_format"
    return _check_chat(record) if kind == "chat" else _check_instruction(record)


@functools.lru_cache(maxsize=64)
def _template_ids(encode, template: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the template's text before and after {prompt}, encoded once per template."""
    head, tail = template.split("{prompt}")
    return _ids(encode(head)), _ids(encode(tail))


def _instruction_pieces(r: Renderer, record: dict, with_response: bool) -> list[Piece]:
    head, tail = _template_ids(r.markup or r.encode, r.template)
    pieces = [Piece(head, False, False, 0, "user"),
              Piece(_ids(r.encode(instruction_prompt(record))), False, True, 0, "user"),
              Piece(tail, False, False, 0, "user")]
    if with_response:
        pieces += [Piece(_ids(r.encode(record["output"])), True, True, 1, "assistant"),
                   Piece(_ids([r.eos]), True, False, 1, "assistant")]
    return pieces


def _chat_pieces(r: Renderer, messages: list, with_response: bool) -> list[Piece]:
    end = _role_id(r, "end_turn")
    pieces = []
    for i, m in enumerate(messages):
        role, trained = m["role"], m["role"] == "assistant"
        pieces += [Piece(_ids([_role_id(r, role)]), False, False, i, role),
                   Piece(_ids(r.encode(m["content"])), trained, True, i, role),
                   Piece(_ids([end]), trained, False, i, role)]
    if not with_response:  # generation prompt: the conversation so far + the assistant marker
        pieces.append(Piece(_ids([_role_id(r, "assistant")]), False, False, len(messages), "assistant"))
    return pieces


def pieces_of(r: Renderer, record: dict) -> list[Piece]:
    """The rendered pieces of a valid record (`check_record(record) is None`)."""
    if kind_of(record) == "chat":
        return _chat_pieces(r, record["messages"], True)
    return _instruction_pieces(r, record, True)


def prompt_ids(r: Renderer, record: dict) -> np.ndarray:
    """Token ids a sampler starts from to produce the (last) response of `record`.

    Instruction: the templated prompt. Chat: every message before the last assistant turn,
    then the assistant marker. Equal to the training rendering up to the response.
    """
    if kind_of(record) == "chat":
        messages = record["messages"]
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        pieces = _chat_pieces(r, messages, False)
    else:
        pieces = _instruction_pieces(r, record, False)
    return np.concatenate([p.ids for p in pieces]).astype(np.int32)


def stop_token(r: Renderer, record: dict) -> int:
    """The id that closes a response: <|end_turn|> for chat, eos for instructions."""
    return _role_id(r, "end_turn") if kind_of(record) == "chat" else int(r.eos)


def _length(pieces) -> int:
    return sum(len(p.ids) for p in pieces)


def fit(pieces: list[Piece], max_ids: int, policy: str = "trim_context") -> tuple[Optional[list[Piece]], bool]:
    """(pieces cut to at most `max_ids` ids by `policy`, or None if dropped; whether it was cut)."""
    if policy not in TRUNCATIONS:
        raise ValueError(f"truncation={policy!r} is not a policy; allowed: {', '.join(TRUNCATIONS)}")
    if _length(pieces) <= max_ids:
        return pieces, False
    if policy == "drop":
        return None, False
    turns = sorted({p.turn for p in pieces})
    role = {p.turn: p.role for p in pieces}
    last = max(p.turn for p in pieces if p.trained)
    earlier = [t for t in turns if t < last and role[t] == "assistant"]
    exchange = earlier[-1] + 1 if earlier else 0  # first turn of the last exchange
    # 1. Whole messages before the last exchange, oldest first; never the system message, and
    # never leave an assistant turn first.
    gone: set = set()
    for t in (t for t in turns if t < exchange and role[t] != "system"):
        # t is the first non-system turn left: stop once it fits, unless t would lead as assistant
        if _length([p for p in pieces if p.turn not in gone]) <= max_ids and role[t] != "assistant":
            break
        gone.add(t)
    pieces = [p for p in pieces if p.turn not in gone]
    # 2. Prompt tokens of what is left, from the left: non-system content first, system last.
    excess = _length(pieces) - max_ids
    order = sorted((i for i, p in enumerate(pieces) if p.content and not p.trained),
                   key=lambda i: (pieces[i].role == "system", i))
    pieces = list(pieces)
    for i in order:
        if excess <= 0:
            break
        cut = min(excess, len(pieces[i].ids))
        pieces[i] = dataclasses.replace(pieces[i], ids=pieces[i].ids[cut:])
        excess -= cut
    if excess > 0:
        return None, False
    return pieces, True


def to_example(pieces: list[Piece]) -> dict:
    """tokens, targets int32 [n] and loss_mask float32 [n] from rendered pieces (n = ids - 1)."""
    seq = np.concatenate([p.ids for p in pieces]).astype(np.int32)
    trained = np.repeat(np.array([p.trained for p in pieces], np.float32), [len(p.ids) for p in pieces])
    return {"tokens": seq[:-1], "targets": seq[1:], "loss_mask": trained[1:]}


def render(r: Renderer, record, max_tokens: int, truncation: str = "trim_context") -> Union[dict, str]:
    """One record -> an example dict (tokens, targets, loss_mask, truncated), or a bad reason.

    `max_tokens` is the longest example (the train seq_len).
    """
    reason = check_record(record)
    if reason is not None:
        return reason
    pieces, cut = fit(pieces_of(r, record), max_tokens + 1, truncation)
    if pieces is None:
        return "too_long"
    return {**to_example(pieces), "truncated": cut}


def render_all(r: Renderer, records, max_tokens: int, truncation: str = "trim_context"):
    """(examples, counts): every usable record rendered; counts has `records`, `used`,
    `truncated` and one key per bad reason met (a record unusable as read, e.g. malformed
    JSON, arrives as its reason, `readers.Unreadable`, and is counted as it is)."""
    examples, counts = [], collections.Counter()
    for record in records:
        counts["records"] += 1
        out = record if isinstance(record, Unreadable) else render(r, record, max_tokens, truncation)
        if isinstance(out, str):
            counts[out] += 1
            continue
        counts["used"] += 1
        counts["truncated"] += int(out.pop("truncated"))
        if "task" in record:
            out["task"] = record["task"]
        examples.append(out)
    return examples, counts
