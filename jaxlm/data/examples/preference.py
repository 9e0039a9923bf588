"""Preference records -> groups of token sequences that a reward model scores together.

Two record kinds (JSONL, one per line):

- pair: {"prompt", "chosen", "rejected"}, with an optional numeric "margin" or a Llama-2
  "grade" (significantly_better, better, slightly_better, negligibly_better), which
  `reward.margins` maps to a margin;
- ranking: {"prompt", "responses": [...]}, the responses best first (InstructGPT's K-way data);
- and, for scoring only (`jaxlm score`), a single response: {"prompt", "response"}.

The prompt is text, rendered with the instruction template, or chat messages ending with a
non-assistant turn, rendered as a conversation; each response is rendered after it exactly as
`jaxlm sft` renders a response, closing eos or <|end_turn|> included (`chat`). A group is

    {"sequences": [ids of prompt + response + closing token, best first], "margin": float,
     "masks": [bool per id: a response token (trained by SFT, closing token included)]}

The reward of a response is the value head's output at the last token of its sequence, the
closing token: never at padding; its log-prob (DPO) is the sum over its masked tokens.
`pack_groups` puts each group's sequences in one row, as segments, so the responses of a prompt
meet in one step.

Bad records are not errors: `to_group` returns a reason and the caller counts it (missing or
non-string fields, fewer than two responses, identical responses, more than `max_responses`,
an unknown grade, a margin that is not a number, or too long even with the prompt cut from the
left).
"""
from __future__ import annotations

import collections
import math
from typing import Sequence, Union

import numpy as np

from jaxlm.data.examples import chat
from jaxlm.data.readers import Unreadable

GRADES = ("significantly_better", "better", "slightly_better", "negligibly_better")
BAD_REASONS = ("unknown_format", "missing_field", "too_few_responses", "identical_responses",
               "too_many_responses", "unknown_grade", "bad_margin", "too_long", *chat.BAD_REASONS)


def kind_of(record) -> str | None:
    """"pair", "ranking", or None when the record is neither."""
    if not isinstance(record, dict) or "prompt" not in record:
        return None
    if "responses" in record:
        return "ranking"
    if "chosen" in record or "rejected" in record:
        return "pair"
    if "response" in record:
        return "single"
    return None


def responses_of(record) -> list:
    kind = kind_of(record)
    if kind == "ranking":
        return list(record["responses"]) if isinstance(record["responses"], list) else record["responses"]
    return [record.get("response")] if kind == "single" else [record.get("chosen"), record.get("rejected")]


def _margin(record, margins: dict) -> Union[float, str]:
    """The pair's margin, or a bad reason."""
    if "margin" in record:
        m = record["margin"]
        ok = isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m)
        return float(m) if ok else "bad_margin"
    if "grade" in record:
        return float(margins[record["grade"]]) if record["grade"] in margins else "unknown_grade"
    return 0.0


def sft_record(prompt, response: str) -> dict:
    """The SFT record of a prompt (text: an instruction; a list: chat messages) and its response."""
    if isinstance(prompt, str):
        return {"instruction": prompt, "output": response}
    return {"messages": [*prompt, {"role": "assistant", "content": response}]}


def check_preference(record, margins: dict, max_responses: int, min_responses: int = 2):
    """Why a preference record is unusable (one of `BAD_REASONS`), or None. A single response is
    usable with min_responses=1 only (scoring)."""
    kind = kind_of(record)
    if kind is None or (kind == "single" and min_responses > 1):
        return "unknown_format"
    responses = responses_of(record)
    if not isinstance(responses, list) or not all(isinstance(x, str) for x in responses):
        return "missing_field"
    if not isinstance(record["prompt"], (str, list)):
        return "missing_field"
    if len(responses) < min_responses:
        return "too_few_responses"
    if len(responses) > max_responses:
        return "too_many_responses"
    if len(set(responses)) < len(responses):
        return "identical_responses"
    if kind == "pair":
        margin = _margin(record, margins)
        if isinstance(margin, str):
            return margin
    for response in responses:
        reason = chat.check_record(sft_record(record["prompt"], response))
        if reason is not None:
            return reason
    return None


def _sequence(r: chat.Renderer, prompt, response: str, max_ids: int, truncation: str):
    """(ids, response mask) of one rendered response, or None if it does not fit."""
    pieces, _ = chat.fit(chat.pieces_of(r, sft_record(prompt, response)), max_ids, truncation)
    if pieces is None:
        return None
    ids = np.concatenate([p.ids for p in pieces]).astype(np.int32)
    return ids, np.repeat(np.array([p.trained for p in pieces], bool), [len(p.ids) for p in pieces])


def to_group(r: chat.Renderer, record, T: int, truncation: str, margins: dict, max_responses: int,
             min_responses: int = 2):
    """A record -> a group (module docstring) whose sequences fit together in T tokens, or a bad reason.

    Each response's sequence is fit to T; if together they are longer, to T // K each (the
    prompt cut from the left, as `chat.fit` cuts context)."""
    reason = check_preference(record, margins, max_responses, min_responses)
    if reason is not None:
        return reason
    responses = responses_of(record)
    for budget in (T, T // len(responses)):
        seqs = [_sequence(r, record["prompt"], x, budget, truncation) for x in responses]
        if all(s is not None for s in seqs) and sum(len(ids) for ids, _ in seqs) <= T:
            margin = _margin(record, margins) if kind_of(record) == "pair" else 0.0
            group = {"sequences": [ids for ids, _ in seqs], "masks": [m for _, m in seqs], "margin": margin}
            if "task" in record:
                group["task"] = record["task"]
            return group
        if truncation == "drop":
            break
    return "too_long"


def to_groups(r: chat.Renderer, records, T: int, truncation: str, margins: dict, max_responses: int):
    """(groups, counts): every usable record as a group; counts has `records`, `used` and one key
    per bad reason met (a record unusable as read arrives as its reason, `readers.Unreadable`, and is counted)."""
    groups, counts = [], collections.Counter()
    for record in records:
        counts["records"] += 1
        out = record if isinstance(record, Unreadable) else to_group(r, record, T, truncation, margins, max_responses)
        if isinstance(out, str):
            counts[out] += 1
            continue
        counts["used"] += 1
        groups.append(out)
    return groups, counts


def pack_groups(groups: Sequence[dict], T: int, pad_id: int, *, groups_per_row: int, max_responses: int):
    """First-fit decreasing packing of groups, each whole in one row, at most `groups_per_row` a row:
    (rows, 0). Rows [R, T]: tokens, segment_ids (1, 2, ... per sequence, 0: padding), positions
    (restarting per sequence), targets (the next token of the same sequence) and loss_mask (1 where
    that target is a response token); per group slot [R, G, K]: `ends`, the index in the row of each
    response's last token (-1: none), `segment` (its segment id, 0: none), `margin` (of the group, on
    every response) and, where the groups carry them, `ref_logp` (precomputed reference log-probs);
    `index` [R, G]: the group's position in `groups` (-1: an empty slot)."""
    G, K = groups_per_row, max_responses
    lens = np.array([sum(len(s) for s in g["sequences"]) for g in groups], np.int64)
    if len(lens) and lens.max() > T:
        raise ValueError(f"a group of {int(lens.max())} tokens does not fit a row of {T}")
    free, slots, place = [], [], []  # per row: free tokens, groups placed; per group: (index, row, start, slot)
    for i in np.argsort(-lens, kind="stable"):
        row = next((r for r in range(len(free)) if free[r] >= lens[i] and slots[r] < G), None)
        if row is None:
            row = len(free)
            free.append(T)
            slots.append(0)
        place.append((int(i), row, T - free[row], slots[row]))
        free[row] -= int(lens[i])
        slots[row] += 1
    R = len(free)
    rows = {"tokens": np.full((R, T), pad_id, np.int32), "segment_ids": np.zeros((R, T), np.int32),
            "positions": np.zeros((R, T), np.int32), "targets": np.full((R, T), pad_id, np.int32),
            "loss_mask": np.zeros((R, T), np.float32), "ends": np.full((R, G, K), -1, np.int32),
            "segment": np.zeros((R, G, K), np.int32), "margin": np.zeros((R, G, K), np.float32),
            "index": np.full((R, G), -1, np.int32)}
    with_ref = bool(groups) and all("ref_logp" in g for g in groups)
    if with_ref:
        rows["ref_logp"] = np.zeros((R, G, K), np.float32)
    segments = np.zeros(max(R, 1), np.int32)
    for i, row, start, slot in place:
        group = groups[i]
        rows["index"][row, slot] = i
        rows["margin"][row, slot, :] = group["margin"]
        masks = group.get("masks") or [np.ones(len(s), bool) for s in group["sequences"]]
        for k, (seq, mask) in enumerate(zip(group["sequences"], masks)):
            n = len(seq)
            segments[row] += 1
            rows["tokens"][row, start:start + n] = seq
            rows["segment_ids"][row, start:start + n] = segments[row]
            rows["positions"][row, start:start + n] = np.arange(n)
            rows["targets"][row, start:start + n - 1] = seq[1:]
            rows["loss_mask"][row, start:start + n - 1] = mask[1:]
            rows["ends"][row, slot, k] = start + n - 1
            rows["segment"][row, slot, k] = segments[row]
            if with_ref:
                rows["ref_logp"][row, slot, k] = group["ref_logp"][k]
            start += n
    return rows, 0
