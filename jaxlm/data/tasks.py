"""Built-in verifiable tasks: instruction data with exact checkers, no download.

Each task draws problems from a finite or large space; a problem's split is a fixed hash of
its canonical key (`split_of`), so train and test are disjoint by construction, whatever the
seed or the number drawn. Examples are instruction records with two more fields:
{"task", "instruction", "input", "output", "answer"}; `output` is what SFT trains on and
`answer` what the checker compares with.

`check(example, completion_text) -> bool` is the verifier: it reads the model's completion
(the text after the prompt, with the stop token removed), strips surrounding whitespace and
compares it with the answer exactly (numbers are compared as integers, lists element by
element). Later stages reuse it as a reward: `float(check(example, completion))`.

The tasks and their difficulty:

- add: two 2-digit numbers (10..99) -> their sum ("37 + 58" -> "95").
- reverse: a word of 4 random lowercase letters -> the word reversed ("abcd" -> "dcba").
- sort: 4 digits (0..9, repeats allowed) -> in ascending order ("7 2 9 2" -> "2 2 7 9").
- recall: 4 pairs key=value (distinct letters, digits), then the value of one key.

Lengths are fixed per task, so a tiny model can solve add, reverse and sort by attending at
fixed offsets; recall needs a content lookup (find the key), which is harder.
"""
from __future__ import annotations

import dataclasses
import string
import zlib
from typing import Callable

import numpy as np

TEST_PERCENT = 10  # share of each task's problem space held out for the test split
SPLITS = ("train", "test")


def split_of(task: str, key: str) -> str:
    """The split a problem belongs to: a fixed hash of the task name and the problem's key."""
    return "test" if zlib.crc32(f"{task}:{key}".encode()) % 100 < TEST_PERCENT else "train"


def _add(rng):
    a, b = (int(x) for x in rng.integers(10, 100, 2))
    return f"{a} + {b}", "Add:", f"{a} + {b}", str(a + b)


def _reverse(rng):
    word = "".join(rng.choice(list(string.ascii_lowercase), 4))
    return word, "Reverse:", word, word[::-1]


def _sort(rng):
    digits = [int(x) for x in rng.integers(0, 10, 4)]
    text = " ".join(map(str, digits))
    return text, "Sort:", text, " ".join(map(str, sorted(digits)))


def _recall(rng):
    keys = rng.choice(list(string.ascii_lowercase), 4, replace=False)
    values = rng.integers(0, 10, 4)
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    q = int(rng.integers(0, 4))
    return f"{pairs}?{keys[q]}", f"Value of {keys[q]}?", pairs, str(values[q])


def _int_equal(example, text: str) -> bool:
    text = text.strip()
    return text.lstrip("-").isdigit() and int(text) == int(example["answer"])


def _list_equal(example, text: str) -> bool:
    return text.split() == example["answer"].split()


def _text_equal(example, text: str) -> bool:
    return text.strip() == example["answer"]


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: `sample(rng) -> (key, instruction, input, answer)` and `check(example, text)`."""

    name: str
    sample: Callable
    check: Callable[[dict, str], bool]


TASKS = {t.name: t for t in (Task("add", _add, _int_equal), Task("reverse", _reverse, _text_equal),
                             Task("sort", _sort, _list_equal), Task("recall", _recall, _text_equal))}
TASK_NAMES = tuple(TASKS)


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not a built-in task; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def examples(name: str, split: str, n: int, seed: int = 0, distinct: bool = False) -> list[dict]:
    """`n` examples of task `name` from `split` (train or test), a pure function of the arguments.

    distinct=True draws `n` different problems (for test sets; fewer if the split holds fewer).
    """
    task = _task(name)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not a split; allowed: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), SPLITS.index(split)])
    out, seen, misses = [], set(), 0
    while len(out) < n and misses < 100 * max(n, 100):
        key, instruction, inp, answer = task.sample(rng)
        if split_of(name, key) != split or (distinct and key in seen):
            misses += 1
            continue
        seen.add(key)
        out.append({"task": name, "instruction": instruction, "input": inp, "output": answer,
                    "answer": answer})
    return out


def mixed(names, split: str, n_per_task: int, seed: int = 0, distinct: bool = False) -> list[dict]:
    """`n_per_task` examples of each named task, interleaved in a seeded order."""
    rows = [ex for name in names for ex in examples(name, split, n_per_task, seed, distinct)]
    order = np.random.default_rng([seed, 99]).permutation(len(rows))
    return [rows[i] for i in order]


def test_records(names, n: int) -> list[dict]:
    """`n` distinct test problems of each named task; seed 0, so every run sees the same set."""
    return mixed(names, "test", n, seed=0, distinct=True)


def check(example: dict, completion: str) -> bool:
    """Whether `completion` (the generated text after the prompt) solves `example` exactly."""
    return bool(_task(example["task"]).check(example, completion))
