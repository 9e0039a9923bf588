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

from jaxlm.data.examples.chat import instruction_prompt

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


def _swap_adjacent(items: list, rng, avoid: set) -> list:
    """`items` with one adjacent pair of different items swapped, at a position not in `avoid`."""
    spots = [i for i in range(len(items) - 1) if items[i] != items[i + 1] and not {i, i + 1} & avoid]
    if not spots:
        return items
    i = int(rng.choice(spots))
    avoid.update((i, i + 1))
    return items[:i] + [items[i + 1], items[i]] + items[i + 2:]


def _digit_off(digits: list, rng, avoid: set) -> list:
    """One digit of a number moved by one (the leading digit never to 0)."""
    spots = [i for i in range(len(digits)) if i not in avoid]
    if not spots:
        return digits
    i = int(rng.choice(spots))
    avoid.add(i)
    d = int(digits[i])
    steps = [s for s in (-1, 1) if 0 <= d + s <= 9 and not (i == 0 and len(digits) > 1 and d + s == 0)]
    return digits[:i] + [str(d + int(rng.choice(steps)))] + digits[i + 1:]


def near_miss(example: dict, degree: int, rng: np.random.Generator):
    """A wrong answer `degree` small edits from the right one, or None if there is none: add, one
    digit off by one per edit; reverse and sort, one adjacent pair out of order per edit; recall,
    the value of another key (degree 1) or a digit none of the keys has (degree 2)."""
    answer, task = example["answer"], example["task"]
    avoid: set = set()
    if task == "recall":
        values = [p.split("=")[1] for p in example["input"].split(", ")]
        unused = [str(d) for d in range(10) if str(d) not in values]
        pool = [v for v in values if v != answer] if degree == 1 else unused
        return str(rng.choice(pool)) if pool else None
    items = list(answer) if task in ("add", "reverse") else answer.split()
    edit = _digit_off if task == "add" else _swap_adjacent
    edits = 0
    for _ in range(degree):
        edited = edit(items, rng, avoid)
        edits, items = edits + (edited != items), edited
    miss = " ".join(items) if task == "sort" else "".join(items)
    return miss if edits == degree and not check(example, miss) else None


def preference_records(names, split: str, n_per_task: int, seed: int = 0, distinct: bool = False) -> list[dict]:
    """`n_per_task` preference records per task (a pure function of the arguments): for a problem,
    the right answer against a near miss (`near_miss`): a pair with grade "better" (one edit), a
    pair with grade "significantly_better" (two edits: a worse miss, a larger margin), or a
    ranking [right, one edit, two edits], one of the three per problem at random."""
    out = []
    for ex in mixed(names, split, n_per_task, seed, distinct):
        rng = np.random.default_rng([seed, 7, zlib.crc32(f"{ex['task']}:{ex['input']}".encode())])
        one, two = near_miss(ex, 1, rng), near_miss(ex, 2, rng)
        prompt = instruction_prompt(ex)
        kinds = [k for k, ok in (("one", one), ("two", two), ("ranking", one and two and one != two)) if ok]
        if not kinds:
            continue
        kind = str(rng.choice(kinds))
        base = {"task": ex["task"], "prompt": prompt}
        if kind == "ranking":
            out.append({**base, "responses": [ex["answer"], one, two]})
        else:
            out.append({**base, "chosen": ex["answer"], "rejected": one if kind == "one" else two,
                        "grade": "better" if kind == "one" else "significantly_better"})
    return out


def sampled_preference_records(problems, samples, seed: int = 0) -> list[dict]:
    """Preference pairs from a model's own answers (on-policy rejections): for each problem, the
    right answer against each distinct wrong answer among `samples` (that problem's sampled
    completions, in order of first appearance). A problem the model always solves is paired with a
    near miss (`near_miss`, one edit) instead, so that what it can do stays in the data."""
    out = []
    for ex, completions in zip(problems, samples, strict=True):
        wrong = list(dict.fromkeys(c.strip() for c in completions if not check(ex, c)))
        if not wrong:
            rng = np.random.default_rng([seed, 7, zlib.crc32(f"{ex['task']}:{ex['input']}".encode())])
            wrong = [miss for miss in [near_miss(ex, 1, rng)] if miss is not None]
        prompt = instruction_prompt(ex)
        out += [{"task": ex["task"], "prompt": prompt, "chosen": ex["answer"], "rejected": w} for w in wrong]
    return out


def check(example: dict, completion: str) -> bool:
    """Whether `completion` (the generated text after the prompt) solves `example` exactly."""
    return bool(_task(example["task"]).check(example, completion))
