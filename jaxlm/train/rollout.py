"""Rollouts: responses sampled from a policy, laid out as rows to score and to train on.

`sample` draws `group_size` responses to each prompt through the shared KV-cache sampler
(`jaxlm.generate.generate`, a key per row) and lays them out (`layout`) as rows [prompt,
response, padding] of one width, with `mask` 1 at the positions whose target is a response
token: the actions. `Forward` computes the rows' log-probs and values in jitted forward passes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model, sharding
from jaxlm.generate import completion_ids, generate
from jaxlm.objectives.lm import token_log_probs


def layout(prompts: list, responses: list, T: int, pad_id: int = 0) -> dict:
    """Rows [prompt, response, padding] of width T (numpy): tokens, targets (the next token),
    segment_ids (1 on the sequence, 0 on padding), positions, and mask: 1 at the positions whose
    target is a response token, so that the last of them predicts the response's last token."""
    B = len(prompts)
    out = {"tokens": np.full((B, T), pad_id, np.int32), "targets": np.full((B, T), pad_id, np.int32),
           "segment_ids": np.zeros((B, T), np.int32), "positions": np.zeros((B, T), np.int32),
           "mask": np.zeros((B, T), np.float32)}
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        seq = list(prompt) + list(response)
        n, start = len(seq), len(prompt)
        if n > T:
            raise ValueError(f"row {b}: prompt and response are {n} tokens, more than the rollout width {T}")
        out["tokens"][b, :n] = seq
        out["targets"][b, :n - 1] = seq[1:]
        out["segment_ids"][b, :n] = 1
        out["positions"][b, :n] = np.arange(n)
        out["mask"][b, start - 1:n - 1] = 1
    return out


@dataclasses.dataclass
class Rollout:
    batch: dict  # `layout`'s rows, numpy [B, T]
    texts: list  # each response decoded, without its stop token
    stopped: np.ndarray  # [B] bool: the response ended on a stop token
    lengths: np.ndarray  # [B] response tokens (a stop token counted)


def sample(model_cfg, params, prompt_ids: list, group_size: int, key, *, width: int, max_new_tokens: int,
           temperature: float, tokenizer, stops, mesh=None, rules: str = "fsdp") -> Rollout:
    """`group_size` responses to each prompt (token ids), the G of a prompt adjacent; row r draws
    with fold_in(key, r)."""
    ids = [x for x in prompt_ids for _ in range(group_size)]
    B = len(ids)
    lengths = np.array([len(x) for x in ids], np.int32)
    prompts_BP = np.zeros((B, lengths.max()), np.int32)
    for b, x in enumerate(ids):
        prompts_BP[b, :len(x)] = x
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B))
    out = jax.device_get(generate(model_cfg, params, prompts_BP, lengths, max_new_tokens, temperature=temperature,
                                  stop_tokens=stops, key=keys, mesh=mesh, rules=rules, pad_id=tokenizer.pad_id))
    texts, stopped = [], []
    for b in range(B):
        kept, s = completion_ids(out.tokens[b], int(out.lengths[b]), stops)
        texts.append(tokenizer.decode(kept))
        stopped.append(s)
    responses = [out.tokens[b, :out.lengths[b]] for b in range(B)]
    return Rollout(layout(ids, responses, width, tokenizer.pad_id), texts, np.asarray(stopped),
                   np.asarray(out.lengths))


class Forward:
    """Jitted forward passes over rollout rows (on `mesh` under `rules`), 0 where mask is 0, their
    results whole on every process:
    `logp(params, batch)`, the log-prob of each target with the logits divided by `temperature`
    (as sampled); `values(params, batch)`, a value-head model's values."""

    def __init__(self, model_cfg, temperature: float, mesh, rules: str):
        value_cfg = dataclasses.replace(model_cfg, value_head=True)

        def in_mesh(f):
            def wrapped(*args):
                with sharding.activate(mesh, rules):
                    return sharding.replicate(f(*args), mesh)  # every process reads every row
            return jax.jit(wrapped)

        def logp(params, b):
            logits = model.apply(model_cfg, params, b["tokens"], b["segment_ids"], b["positions"])
            return token_log_probs(logits.astype(jnp.float32) / temperature, b["targets"]) * b["mask"]

        def values(params, b):
            return model.apply(value_cfg, params, b["tokens"], b["segment_ids"], b["positions"],
                               head="value") * b["mask"]

        self.logp, self.values = in_mesh(logp), in_mesh(values)
        self.mesh = mesh

    def put(self, batch: dict) -> dict:
        """The rows' arrays the passes read, on the mesh (every process holds them all)."""
        return sharding.put_shared_batch(self.mesh, {k: batch[k] for k in ("tokens", "segment_ids", "positions",
                                                                    "targets", "mask")})
