"""The preference data a stage asks for (`reward.*`, `dpo.*`): JSONL files and the built-in tasks'
preferences rendered into groups (`jaxlm.data.examples.preference`), a held-out split, and a
loader that packs a whole group per row with exact resume (`jaxlm.data.loader.Loader`)."""
from __future__ import annotations

import functools

import numpy as np

from jaxlm import sharding
from jaxlm.config import ConfigError
from jaxlm.data import readers, tasks
from jaxlm.data.examples import chat, preference
from jaxlm.data.loader import Loader, Source
from jaxlm.data.pipeline import heldout_indices


def pairs_of(records):
    """Rankings as pairs, best against each of the others (what DPO trains on); other records pass."""
    for record in records:
        if preference.kind_of(record) == "ranking" and isinstance(record.get("responses"), list):
            best, *rest = record["responses"] or [None]
            extra = {k: v for k, v in record.items() if k != "responses"}
            yield from ({**extra, "chosen": best, "rejected": other} for other in rest)
        else:
            yield record


def file_records(name: str, paths):
    try:
        return list(readers.read_records(paths))
    except FileNotFoundError as e:
        raise ConfigError(f"{name}: {e}") from None


def load_groups(section, name: str, tok, *, template: str, T: int, heldout_fraction: float, seed: int,
                margins: dict, max_responses: int, pairs_only: bool = False, task_records=None):
    """(train groups, eval groups, info) of a config section with train_files, eval_files, tasks,
    task_pairs, task_eval_pairs and truncation (`name`: the section, for errors). Without eval files
    `heldout_fraction` of the file groups is held out; the tasks' test problems are held out always.
    pairs_only: rankings become pairs (`pairs_of`). task_records: (train, test) records of the tasks,
    instead of their near misses (`tasks.preference_records`). No usable data is a ConfigError."""
    if not section.train_files and not section.tasks:
        raise ConfigError(f"{name} needs data: set {name}.train_files (preference JSONL) and/or {name}.tasks "
                          f"(built-in: {', '.join(tasks.TASK_NAMES)})")
    r = chat.Renderer.from_tokenizer(tok, template)
    as_pairs = pairs_of if pairs_only else (lambda records: records)
    grouped = lambda records: preference.to_groups(r, as_pairs(records), T=T, truncation=section.truncation,
                                                   margins=margins, max_responses=max_responses)
    try:
        train, train_counts = grouped(file_records(name, section.train_files) if section.train_files else [])
        evals, eval_counts = grouped(file_records(name, section.eval_files) if section.eval_files else [])
    except ValueError as e:  # chat prompts and a tokenizer without role markers
        raise ConfigError(f"{name}: {e}") from None
    for key, found, counts in (("train_files", train, train_counts), ("eval_files", evals, eval_counts)):
        if getattr(section, key) and not found:
            raise ConfigError(f"{name}.{key}={list(getattr(section, key))} hold no usable record: "
                              + readers.counts_line(counts))
    if not section.eval_files and len(train) >= 2:
        held = heldout_indices(name, len(train), heldout_fraction)
        train, evals = [g for g, h in zip(train, held) if not h], [g for g, h in zip(train, held) if h]
    if task_records is None:
        task_records = (tasks.preference_records(section.tasks, "train", section.task_pairs, seed),
                        tasks.preference_records(section.tasks, "test", section.task_eval_pairs, 0, distinct=True))
    task_train, task_counts = grouped(task_records[0])
    task_eval, _ = grouped(task_records[1])
    if section.tasks and not task_train:
        raise ConfigError(f"{name}.tasks: no group fits train.seq_len={T}: " + readers.counts_line(task_counts))
    info = {"records_train": readers.counts_line(train_counts), "records_eval": readers.counts_line(eval_counts),
            "counts_train": dict(train_counts), "counts_eval": dict(eval_counts),
            "task_groups": readers.counts_line(task_counts)}
    return train + task_train, evals + task_eval, info


def loader(name: str, groups, T: int, pad: int, *, seed: int, lookahead: int, groups_per_row: int,
           max_responses: int):
    """A Loader over `groups`, each packed whole into a row (`preference.pack_groups`)."""
    packer = functools.partial(preference.pack_groups, groups_per_row=groups_per_row, max_responses=max_responses)
    return Loader([Source(name, groups)], T, eos_id=pad, seed=seed, packing="first_fit", lookahead=lookahead,
                  packer=packer)


def map_groups(fn, groups, T: int, mesh, *, groups_per_row: int, batch_rows: int = 8) -> list:
    """fn(batch) -> [B, G, K] values of packed rows, for every group: a list of [K_i] arrays in the
    order of `groups`. Rows go in fixed batches of `batch_rows` (one compile), sharded on `mesh`."""
    K = max([len(g["sequences"]) for g in groups] + [2])
    rows, _ = preference.pack_groups(groups, T, 0, groups_per_row=groups_per_row, max_responses=K)
    shards = sharding.batch_shards(mesh)
    batch_rows = -(-batch_rows // shards) * shards
    out: list = [None] * len(groups)
    keys = [k for k in rows if k != "index"]
    for start in range(0, len(rows["tokens"]), batch_rows):
        batch = {k: rows[k][start:start + batch_rows] for k in keys}
        short = batch_rows - len(batch["tokens"])
        batch = {k: np.concatenate([v, np.full((short, *v.shape[1:]), -1 if k == "ends" else 0, v.dtype)])
                 for k, v in batch.items()}
        values = sharding.to_host(fn(sharding.put_shared_batch(mesh, batch)))  # every process: all rows
        for b in range(len(batch["tokens"]) - short):
            for g, i in enumerate(rows["index"][start + b]):
                if i >= 0:
                    out[i] = values[b, g, :len(groups[i]["sequences"])]
    return out
