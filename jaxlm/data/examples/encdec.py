"""Examples in encoder-decoder form (`model.arch: encoder_decoder`), and their packing.

An objective with a bidirectional prefix (span corruption, UL2, prefix LM) lays out one sequence
for the decoder-only model: the prefix (inputs), then the target, with loss on the target. Its
encoder-decoder form cuts the same sequence in two: the prefix goes to the encoder, and the
decoder reads `start` then the target shifted by one and predicts the target (T5: the decoder
starts from the pad id). So both architectures learn the very same targets from the same inputs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

KEYS = ("encoder_tokens", "encoder_segment_ids", "encoder_positions", "tokens", "targets", "loss_mask",
        "segment_ids", "positions")


def to_encoder_decoder(example: dict, start_id: int) -> dict:
    """A decoder-only example (tokens, targets, loss_mask [n], prefix_len p >= 1) -> encoder_tokens
    [p] (the prefix) and the decoder's tokens [m] (start, then the target but its last token),
    targets [m] and loss_mask [m], m = n - p + 1 (the positions from the prefix's last on)."""
    p = int(example["prefix_len"])
    if p < 1:
        raise ValueError("an encoder-decoder example needs inputs: prefix_len >= 1 (span corruption, ul2, "
                         "prefix_lm; clm and fim have no encoder-decoder form)")
    targets = np.asarray(example["targets"], np.int32)[p - 1:]
    return {"encoder_tokens": np.asarray(example["tokens"], np.int32)[:p],
            "tokens": np.concatenate([[start_id], targets[:-1]]).astype(np.int32), "targets": targets,
            "loss_mask": np.asarray(example["loss_mask"], np.float32)[p - 1:]}


def pack_encoder_decoder(examples: Sequence[dict], T: int, pad_id: int) -> tuple[dict, int]:
    """First-fit decreasing packing into rows of T encoder and T decoder columns: (rows, truncated).

    Examples are decoder-only ones (converted by `to_encoder_decoder`, start = pad_id) or already
    in encoder-decoder form; an example goes to the first row where both its sides fit. Each side
    numbers the row's examples 1, 2, ... alike (0: padding), with positions restarting per
    example. A side longer than T is cut to T (counted in `truncated`).
    """
    pairs = [x if "encoder_tokens" in x else to_encoder_decoder(x, pad_id) for x in examples]
    enc = np.array([min(len(x["encoder_tokens"]), T) for x in pairs], np.int64)
    dec = np.array([min(len(x["tokens"]), T) for x in pairs], np.int64)
    truncated = sum(len(x["encoder_tokens"]) > T or len(x["tokens"]) > T for x in pairs)
    free_enc, free_dec = np.full(len(pairs), T, np.int64), np.full(len(pairs), T, np.int64)
    used, place = 0, []
    for i in np.argsort(-(enc + dec), kind="stable"):
        if dec[i] == 0:
            continue
        fits = np.flatnonzero((free_enc[:used] >= enc[i]) & (free_dec[:used] >= dec[i]))
        r = int(fits[0]) if len(fits) else used
        used = max(used, r + 1)
        place.append((i, r, T - free_enc[r], T - free_dec[r]))
        free_enc[r] -= enc[i]
        free_dec[r] -= dec[i]
    rows = {key: np.zeros((used, T), np.float32 if key == "loss_mask" else np.int32) for key in KEYS}
    rows["encoder_tokens"][:] = pad_id
    rows["tokens"][:] = pad_id
    rows["targets"][:] = pad_id
    segments = np.zeros(max(used, 1), np.int32)
    for i, r, a, b in place:
        x, n, m = pairs[i], enc[i], dec[i]
        segments[r] += 1
        rows["encoder_tokens"][r, a:a + n] = x["encoder_tokens"][:n]
        rows["encoder_segment_ids"][r, a:a + n] = segments[r]
        rows["encoder_positions"][r, a:a + n] = np.arange(n)
        for key in ("tokens", "targets", "loss_mask"):
            rows[key][r, b:b + m] = x[key][:m]
        rows["segment_ids"][r, b:b + m] = segments[r]
        rows["positions"][r, b:b + m] = np.arange(m)
    return rows, int(truncated)
