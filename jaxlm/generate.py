"""KV-cache sampling: batched prefill, then decoding inside one compiled `lax.while_loop`.

`generate(cfg, params, prompts, prompt_lengths, max_new_tokens, ...)` takes right-padded
prompts [B, P] and returns a `Generation`: the new tokens, their count per row, and each
token's log-probability under the sampling distribution and under the unmodified model.

How it runs: prompts are re-laid left-padded into a bucket of width P' (the next power of
two >= 16 that holds the longest prompt), so every row writes the same cache column at each
step (`jaxlm.model.kv_cache.KVCache`). One jitted function does the prefill (one forward
over [B, P'], or bidirectional over the prompt for a prefix LM), samples the first token,
then runs `lax.while_loop` over one-token decode steps until every row has stopped (a stop
token, or its own length limit) or the budget is spent. Decode steps run the layers unrolled
over per-layer weight slices taken once per call (`unroll_layers`), so no step re-copies the
weights out of the scanned stack. It compiles once per (batch size,
prompt bucket, max_new_tokens, sampling mode: greedy or not, top_k, top_p or not, number of
stop tokens / 8); temperature, top_p, seeds, stop tokens and per-row limits are traced.

Sampling: logits / temperature, then top-k (exactly the k best, ties broken by lower id),
then top-p (the smallest set of best tokens whose probability reaches p), then a draw.
temperature=0 is greedy (argmax; its sampling log-probability is log 1 = 0).

The shell half (`encode_prompt`, `infill_prompt`, `generate_texts`, `run`) is `jaxlm generate`:
text prompts, streaming, JSONL; `jaxlm.runs.load_run` gives it a run's params and tokenizer.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model, sharding
from jaxlm.config import ModelConfig
from jaxlm.objectives.lm import token_log_probs

__all__ = ["Generation", "generate", "sample_logits", "prompt_bucket", "left_pad"]


class Generation(NamedTuple):
    """What `generate` returns. Positions past a row's length hold `pad_id` and log-prob 0."""

    tokens: jax.Array  # [B, N] int32: the new tokens (a stop token is kept, and counted)
    lengths: jax.Array  # [B] int32: new tokens per row
    logprobs: jax.Array  # [B, N] float32: log-prob under the sampling distribution
    model_logprobs: jax.Array  # [B, N] float32: log-prob under the model (temperature 1, no filter)


def prompt_bucket(n: int) -> int:
    """Width of the prompt bucket for a longest prompt of n tokens: a power of two, >= 16."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def left_pad(prompts_BP: np.ndarray, lengths_B: np.ndarray, width: int, pad_id: int = 0) -> np.ndarray:
    """Right-padded prompts [B, P] -> left-padded [B, width] (row b's prompt in its last columns)."""
    P = prompts_BP.shape[1]
    cols_BW = np.arange(width)[None, :] - (width - lengths_B[:, None])  # source column, < 0 is pad
    taken = np.take_along_axis(prompts_BP, np.clip(cols_BW, 0, max(P - 1, 0)), axis=1)
    return np.where(cols_BW >= 0, taken, pad_id).astype(np.int32)


def sample_logits(logits_BV: jax.Array, keys_B: jax.Array, temperature=1.0, top_k: Optional[int] = None,
                  top_p=None) -> tuple[jax.Array, jax.Array]:
    """One draw per row from the tempered, top-k and top-p filtered logits.

    keys_B: one PRNG key per row. temperature == 0 (a Python number) is greedy. Returns
    (tokens [B] int32, log-probs [B] float32 of the drawn tokens under the filtered
    distribution). top_k is static (a Python int); temperature and top_p may be traced.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), jnp.zeros(logits_BV.shape[:1], jnp.float32)
    scaled_BV = logits_BV / temperature
    if top_k is None and top_p is None:
        logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
        token_B = jax.vmap(jax.random.categorical)(keys_B, logp_BV)
        return token_B.astype(jnp.int32), jnp.take_along_axis(logp_BV, token_B[:, None], -1)[:, 0]
    # Candidates sorted best first (lax.top_k breaks ties by the lower index).
    k = scaled_BV.shape[-1] if top_k is None else min(top_k, scaled_BV.shape[-1])
    vals_BC, ids_BC = jax.lax.top_k(scaled_BV, k)
    if top_p is not None:
        probs_BC = jax.nn.softmax(vals_BC, axis=-1)
        mass_before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
        vals_BC = jnp.where(mass_before_BC < top_p, vals_BC, -jnp.inf)  # the best one always stays
    logp_BC = jax.nn.log_softmax(vals_BC, axis=-1)
    choice_B = jax.vmap(jax.random.categorical)(keys_B, logp_BC)[:, None]
    return (jnp.take_along_axis(ids_BC, choice_B, -1)[:, 0].astype(jnp.int32),
            jnp.take_along_axis(logp_BC, choice_B, -1)[:, 0])


def _loop(cfg, params, prompt_BP, lengths_B, limits_B, stop_S, temperature, top_p, keys_B, *,
          max_new: int, greedy: bool, top_k, use_top_p: bool, bidirectional: bool, pad_id: int,
          on_token, mesh, rules, unroll_layers: bool):
    """Prefill, first draw, then a while_loop of decode steps: the whole sampler, traced once."""
    activate = sharding.activate(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with activate:
        B, P = prompt_BP.shape
        N = max_new
        params = model.compute_params(cfg, params)  # cast once, not at every decode step
        logits_BV, cache = model.prefill(cfg, params, prompt_BP, lengths_B, P + N - 1,
                                         bidirectional=bidirectional, start_id=pad_id)
        layers = model.layer_params(cfg, params) if unroll_layers and N > 1 else None  # once, not per step

        def choose(t, logits_BV, out):
            step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, t)
            token_B, logp_B = sample_logits(logits_BV, step_keys_B, 0 if greedy else temperature,
                                            top_k, top_p if use_top_p else None)
            active_B = ~out["done"]
            put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, t, axis=1)
            token_B = jnp.where(active_B, token_B, pad_id)
            zero = jnp.float32(0)
            model_logp_B = token_log_probs(logits_BV[:, None], token_B[:, None])[:, 0]
            out = {"tokens": put(out["tokens"], token_B),
                   "logprobs": put(out["logprobs"], jnp.where(active_B, logp_B, zero)),
                   "model_logprobs": put(out["model_logprobs"], jnp.where(active_B, model_logp_B, zero)),
                   "lengths": out["lengths"] + active_B.astype(jnp.int32)}
            stopped_B = jnp.any(token_B[:, None] == stop_S[None, :], axis=-1)
            out["done"] = ~active_B | stopped_B | (out["lengths"] >= limits_B)
            if on_token is not None:
                jax.debug.callback(on_token, t, token_B, active_B)
            return out

        out = {"tokens": jnp.full((B, N), pad_id, jnp.int32), "logprobs": jnp.zeros((B, N), jnp.float32),
               "model_logprobs": jnp.zeros((B, N), jnp.float32), "lengths": jnp.zeros((B,), jnp.int32),
               "done": limits_B <= 0}
        out = choose(jnp.int32(0), logits_BV, out)

        def cond(carry):
            t, _, out = carry
            return (t < N) & ~jnp.all(out["done"])

        def body(carry):
            t, cache, out = carry
            last_B1 = jax.lax.dynamic_slice_in_dim(out["tokens"], t - 1, 1, axis=1)
            logits_B1V, cache = model.decode(cfg, params, last_B1, cache, layers=layers)
            return t + 1, cache, choose(t, logits_B1V[:, 0], out)

        _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out))
        gen = Generation(out["tokens"], out["lengths"], out["logprobs"], out["model_logprobs"])
        # whole on every device: each process of a multi-process run reads every row
        return gen if mesh is None else sharding.replicate(gen, mesh)


_compiled_loop = jax.jit(_loop, static_argnums=(0,), static_argnames=(
    "max_new", "greedy", "top_k", "use_top_p", "bidirectional", "pad_id", "on_token", "mesh", "rules",
    "unroll_layers"))


def as_key(key) -> jax.Array:
    """A typed PRNG key (or keys) from a key, legacy uint32 key data, an int seed, or None (seed 0)."""
    if key is None or isinstance(key, (int, np.integer)):
        return jax.random.key(int(key or 0))
    key = jnp.asarray(key)
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _row_keys(key, B: int) -> jax.Array:
    """One typed PRNG key per row: `key` [B] as given; a single key or an int seed folded with the row."""
    key = as_key(key)
    if key.shape == (B,):
        return key
    if key.shape != ():
        raise ValueError(f"key has shape {key.shape}; allowed: one key, an int seed, or {B} keys (one per row)")
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B))


def generate(cfg, params: dict, prompts, prompt_lengths=None, max_new_tokens=64, *,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             stop_tokens: Sequence[int] = (), key=None, prefix_lm: bool = False, pad_id: int = 0,
             mesh=None, rules: str = "fsdp_tp", on_token: Optional[Callable] = None,
             unroll_layers: bool = True) -> Generation:
    """Sample up to `max_new_tokens` new tokens after each prompt.

    cfg: the `ModelConfig` (a full `Config` is accepted: its `.model` is used). prompts [B, P]
    int, right-padded; prompt_lengths [B] (each in [1, P]; None: all P). max_new_tokens: an int,
    or [B] per-row limits (the budget N is their maximum). A row stops after a token in
    `stop_tokens` (kept and counted) or at its limit; rows stop independently.
    key: a PRNG key or int seed (row b draws with fold_in(key, b)), or [B] keys, one per row, so
    that a row's samples do not depend on the rows around it. None: seed 0.
    prefix_lm: the prompt is a bidirectional prefix (as `model.apply(prefix_len=lengths)`).
    mesh: run sharded on it (batch on data x fsdp, heads on tensor under `rules`); params are
    placed by the rules, and the result is whole on every device (a mesh over several processes:
    each holds every row; every process must pass the same prompts and key). on_token(t,
    tokens [B], active [B]): a host callback per step, for streaming (it may run out of order;
    `t` says which step). unroll_layers: decode with the
    layers unrolled over per-layer weight slices made once per call (`model.layer_params`):
    faster decoding, for a second copy of the layer weights while generating; False: scan the
    stacked weights (no extra memory, but each decode step re-slices every layer's weights).
    Where the compute dtype is narrower than the params (bfloat16 on GPU), the weights are cast
    once per call (`model.compute_params`), a copy in that dtype, so that the decode steps read
    bfloat16 weights.
    """
    cfg = getattr(cfg, "model", cfg)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg is a {type(cfg).__name__}; pass the ModelConfig (or the Config holding it)")
    prompts_BP = np.asarray(jax.device_get(prompts))
    if prompts_BP.ndim != 2 or prompts_BP.shape[1] == 0:
        raise ValueError(f"prompts have shape {prompts_BP.shape}; expected [batch, prompt_len >= 1]")
    B, P = prompts_BP.shape
    lengths_B = np.full(B, P) if prompt_lengths is None else np.asarray(jax.device_get(prompt_lengths))
    lengths_B = lengths_B.astype(np.int32)
    if lengths_B.shape != (B,) or lengths_B.min() < 1 or lengths_B.max() > P:
        raise ValueError(f"prompt_lengths={lengths_B.tolist()} must be {B} lengths in [1, {P}]")
    limits_B = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (B,)).copy()
    N = int(limits_B.max())
    if N < 1 or limits_B.min() < 0:
        raise ValueError(f"max_new_tokens={np.asarray(max_new_tokens).tolist()} must be >= 0, at least one >= 1")
    # an encoder-decoder's prompt and answer lie on two sides, each within max_seq_len
    longest = max(int(lengths_B.max()), N) if cfg.arch == "encoder_decoder" else int(lengths_B.max()) + N
    if longest > cfg.max_seq_len and not cfg.sliding_window:
        raise ValueError(f"longest prompt ({int(lengths_B.max())}) + max_new_tokens ({N}) exceeds "
                         f"model.max_seq_len={cfg.max_seq_len}, the positions this model was made for; ask "
                         f"for fewer tokens, or extend the context (model.rope_scaling and a longer "
                         f"model.max_seq_len), or use a model with model.sliding_window (and "
                         f"model.attention_sinks), which generates past it at constant memory")
    temperature = float(temperature)
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k={top_k} must be an integer >= 1 (or None)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None)")
    stops = [int(s) for s in stop_tokens]
    stop_S = np.full(max(8, -(-len(stops) // 8) * 8), -1, np.int32)
    stop_S[:len(stops)] = stops

    if temperature == 0:  # greedy: filters cannot change the argmax, so they add no compiles
        top_k = top_p = None
    width = prompt_bucket(int(lengths_B.max()))
    args = [left_pad(prompts_BP, lengths_B, width, pad_id), lengths_B, limits_B, stop_S]
    if mesh is not None:
        params = model.place(cfg, params, mesh, rules)
        rows = lambda a: jax.sharding.NamedSharding(
            mesh, sharding.spec(mesh, rules, a.shape, ("act_batch",) + (None,) * (a.ndim - 1)))
        args = [jax.device_put(a, rows(a)) for a in args[:3]] + [args[3]]
    return _compiled_loop(cfg, params, *args, jnp.float32(temperature or 1.0),
                          jnp.float32(1.0 if top_p is None else top_p), _row_keys(key, B),
                          max_new=N, greedy=temperature == 0, top_k=None if top_k is None else int(top_k),
                          use_top_p=top_p is not None, bidirectional=bool(prefix_lm), pad_id=int(pad_id),
                          on_token=on_token, mesh=mesh, rules=rules, unroll_layers=bool(unroll_layers))


# --- the shell: a run directory's params, prompts as text, `jaxlm generate` -------------------


def default_stops(tokenizer) -> list[int]:
    """eos, and <|end_turn|> when the tokenizer has it (a chat turn's end)."""
    ids = [tokenizer.eos_id, tokenizer.special_ids.roles.get("end_turn")]
    return [i for i in ids if i is not None]


def encode_prompt(tokenizer, text: str, doc_start: bool = True, specials: bool = False) -> np.ndarray:
    """Prompt ids. Special symbols written in the text ("<|fim_prefix|>") are text, unless
    `specials`: then they become their ids (`jaxlm generate --specials`).

    doc_start: lead with eos, the separator jaxlm's packed pretraining puts before every
    document, so the prompt reads as the start of a document.
    """
    ids = tokenizer.encode(text, specials=specials)
    return np.concatenate([[tokenizer.eos_id], ids]).astype(np.int32) if doc_start else ids


def infill_prompt(tokenizer, prefix: str, suffix: str, mode: str = "psm", doc_start: bool = True) -> np.ndarray:
    """The fill-in-the-middle prompt of (prefix, suffix): exactly `jaxlm.data.examples.fim.fim_permute`'s
    layout with an empty middle, PSM `<fim_prefix> prefix <fim_suffix> suffix <fim_middle>` (or
    SPM), so the model writes the middle next and ends it with eos, as in training."""
    from jaxlm.data.examples.fim import fim_permute

    sp = tokenizer.special_ids
    if None in (sp.fim_prefix, sp.fim_middle, sp.fim_suffix):
        raise ValueError(f"tokenizer {tokenizer.name!r} has no FIM symbols; infilling needs "
                         "<|fim_prefix|>, <|fim_middle|>, <|fim_suffix|>")
    pre, suf = tokenizer.encode(prefix), tokenizer.encode(suffix)
    ids = fim_permute(np.concatenate([pre, suf]).astype(np.int32), len(pre), len(pre), sp, mode)
    return np.concatenate([[tokenizer.eos_id], ids]).astype(np.int32) if doc_start else ids


def completion_ids(tokens_N, length: int, stops) -> tuple[list[int], bool]:
    """A row's new tokens without a final stop token, and whether it stopped on one."""
    ids = [int(t) for t in np.asarray(tokens_N)[:length]]
    stopped = bool(ids) and ids[-1] in set(stops)
    return (ids[:-1] if stopped else ids), stopped


class TextStreamer:
    """An `on_token` callback that prints row 0's text as it is generated (steps may arrive out
    of order; text is printed in order, holding back a partial UTF-8 character)."""

    def __init__(self, tokenizer, stops, out=None):
        import sys

        self.tokenizer, self.stops, self.out = tokenizer, set(stops), out or sys.stdout
        self.ids: dict[int, int] = {}
        self.printed = ""
        self.closed = False

    def __call__(self, t, tokens_B, active_B):
        if self.closed:
            return
        if bool(np.asarray(active_B)[0]):
            self.ids[int(t)] = int(np.asarray(tokens_B)[0])
        seq = []
        while len(seq) in self.ids and self.ids[len(seq)] not in self.stops:
            seq.append(self.ids[len(seq)])
        text = self.tokenizer.decode(seq).rstrip("\ufffd")
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


def generate_texts(cfg, params, tokenizer, prompts: Sequence[np.ndarray], *, batch_size: int = 8,
                   max_new_tokens: int = 128, stops=None, key=0, mesh=None, rules: str = "fsdp_tp",
                   on_token=None, row_ids=None, fill: bool = False, **sampling) -> list[dict]:
    """Generate for token prompts in fixed-size batches (short batches are filled with idle rows,
    so every batch of a prompt bucket reuses one compile; `fill`: a single short batch too). Row i
    draws with fold_in(key, row_ids[i]) (default i), so results do not depend on the batch size
    or on the rows around it. Returns per prompt: completion text, token count, whether it stopped
    on a stop token, and the completion's log-prob under the model."""
    stops = default_stops(tokenizer) if stops is None else list(stops)
    base_key = as_key(key)
    row_ids = np.arange(len(prompts)) if row_ids is None else np.asarray(row_ids)
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        chunk_ids = list(row_ids[start:start + batch_size])
        n = len(chunk)
        if n < batch_size and (len(prompts) > batch_size or fill):
            chunk += [chunk[0]] * (batch_size - n)  # idle rows: limit 0
            chunk_ids += [chunk_ids[0]] * (batch_size - n)
        lengths = np.array([len(p) for p in chunk], np.int32)
        prompts_BP = np.zeros((len(chunk), lengths.max()), np.int32)
        for b, p in enumerate(chunk):
            prompts_BP[b, :len(p)] = p
        limits = np.where(np.arange(len(chunk)) < n, max_new_tokens, 0)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(base_key, jnp.asarray(chunk_ids, jnp.int32))
        out = generate(cfg, params, prompts_BP, lengths, limits, stop_tokens=stops, key=keys,
                       mesh=mesh, rules=rules, on_token=on_token, **sampling)
        out = jax.device_get(out)
        for b in range(n):
            ids, stopped = completion_ids(out.tokens[b], int(out.lengths[b]), stops)
            results.append({"completion": tokenizer.decode(ids), "new_tokens": int(out.lengths[b]),
                            "stopped": stopped,
                            "logprob": float(out.model_logprobs[b, :out.lengths[b]].sum())})
    return results


def _read_prompt_records(path) -> list[dict]:
    from jaxlm.data import readers

    text = lambda rec, key: isinstance(rec.get(key), str)
    valid = lambda r: text(r, "prompt") or (text(r, "prefix") and text(r, "suffix"))
    return readers.read_valid_records(path, valid, 'a string "prompt", or string "prefix" and "suffix" (infill)')


def run(cfg, params, mesh, tokenizer, *, prompt: Optional[str] = None, prompts_path=None, infill=None,
        out_path=None, batch_size: int = 8, max_new_tokens: int = 128, seed: int = 0, doc_start: bool = True,
        specials: bool = False, fim_mode: str = "psm", quiet: bool = False, **sampling) -> list[dict]:
    """`jaxlm generate`: one prompt (or `infill` = (prefix, suffix)) streamed to stdout, or a JSONL
    file of {"prompt"} / {"prefix", "suffix"} records written as JSONL (to `out_path` or stdout),
    each record with "completion", "new_tokens", "stopped" and "logprob" added. `specials`: symbols
    written in a prompt become their ids (`encode_prompt`). A line of counts and seconds follows on
    stderr unless `quiet`."""
    import json
    import sys
    import time

    from jaxlm.config import ConfigError

    common = dict(max_new_tokens=max_new_tokens, key=seed, mesh=mesh, rules=cfg.mesh.rules, **sampling)
    try:
        if prompts_path is not None:
            records = _read_prompt_records(prompts_path)
            prompts = [infill_prompt(tokenizer, r["prefix"], r["suffix"], fim_mode, doc_start) if "prompt" not in r
                       else encode_prompt(tokenizer, r["prompt"], doc_start, specials) for r in records]
            t0 = time.perf_counter()
            results = generate_texts(cfg.model, params, tokenizer, prompts, batch_size=batch_size, **common)
            with open(out_path, "w") if out_path else contextlib.nullcontext(sys.stdout) as out:
                for rec, res in zip(records, results):
                    out.write(json.dumps({**rec, **res}, ensure_ascii=False) + "\n")
            stopped = sum(r["stopped"] for r in results)
            if not quiet:
                print(f"[{len(results)} prompts, {sum(r['new_tokens'] for r in results)} new tokens in "
                      f"{time.perf_counter() - t0:.2f} s including compile; {stopped} stopped, "
                      f"{len(results) - stopped} at the length limit{f'; written to {out_path}' if out_path else ''}]",
                      file=sys.stderr)
            return results
        if infill is not None:
            ids = infill_prompt(tokenizer, infill[0], infill[1], fim_mode, doc_start)
            sys.stdout.write(infill[0])
        else:
            ids = encode_prompt(tokenizer, prompt, doc_start, specials)
            sys.stdout.write(prompt)
        t0 = time.perf_counter()
        streamer = TextStreamer(tokenizer, default_stops(tokenizer))
        results = generate_texts(cfg.model, params, tokenizer, [ids], batch_size=1, on_token=streamer, **common)
        jax.effects_barrier()  # every streamed step has been printed
        streamer.closed = True
        rest = results[0]["completion"]  # the stream holds back a trailing partial character
        sys.stdout.write(rest[len(streamer.printed):] if rest.startswith(streamer.printed) else "")
        sys.stdout.write((infill[1] if infill is not None else "") + "\n")
        r = results[0]
        if not quiet:
            print(f"[{r['new_tokens']} tokens in {time.perf_counter() - t0:.2f} s including compile; "
                  f"{'stopped' if r['stopped'] else 'length limit'}]", file=sys.stderr)
        return results
    except ValueError as e:
        raise ConfigError(str(e)) from None
