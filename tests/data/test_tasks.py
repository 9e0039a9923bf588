"""Built-in tasks: answers match a reference, splits are disjoint, checkers are exact."""
import pytest

from jaxlm.data import tasks


def reference_answer(ex) -> str:
    """Each task's answer worked out from the prompt text alone."""
    inp = ex["input"]
    if ex["task"] == "add":
        a, b = inp.split(" + ")
        return str(int(a) + int(b))
    if ex["task"] == "reverse":
        return inp[::-1]
    if ex["task"] == "sort":
        return " ".join(sorted(inp.split(), key=int))
    key = ex["instruction"].removeprefix("Value of ").removesuffix("?")
    return dict(pair.split("=") for pair in inp.split(", "))[key]


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_answers_and_checker(name):
    examples = tasks.examples(name, "train", 300, seed=1)
    assert len(examples) == 300
    for ex in examples:
        assert ex["task"] == name and ex["output"] == ex["answer"] == reference_answer(ex)
        assert tasks.check(ex, ex["answer"]) and tasks.check(ex, f"  {ex['answer']}\n")
        assert not tasks.check(ex, "") and not tasks.check(ex, ex["answer"] + " 1")
        assert not tasks.check(ex, "x" + ex["answer"])


def test_checkers_are_exact_not_fuzzy():
    add = {"task": "add", "answer": "95"}
    assert tasks.check(add, "95") and not tasks.check(add, "96") and not tasks.check(add, "9 5")
    assert not tasks.check(add, "95.0") and not tasks.check(add, "-95")
    srt = {"task": "sort", "answer": "1 2 2 7"}
    assert tasks.check(srt, "1 2 2 7") and not tasks.check(srt, "1 2 7") and not tasks.check(srt, "1 2 7 2")
    rev = {"task": "reverse", "answer": "tac"}
    assert tasks.check(rev, "tac") and not tasks.check(rev, "Tac") and not tasks.check(rev, "cat")


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_train_and_test_are_disjoint(name):
    key = lambda ex: (ex["instruction"], ex["input"])
    train = {key(ex) for seed in range(3) for ex in tasks.examples(name, "train", 1000, seed=seed)}
    test = [key(ex) for ex in tasks.examples(name, "test", 200, seed=0, distinct=True)]
    assert len(test) == len(set(test)) == 200  # distinct problems
    assert not train & set(test)


def test_generation_is_a_pure_function_of_its_arguments():
    assert tasks.mixed(tasks.TASK_NAMES, "train", 50, seed=3) == tasks.mixed(tasks.TASK_NAMES, "train", 50, seed=3)
    assert tasks.mixed(tasks.TASK_NAMES, "train", 50, seed=3) != tasks.mixed(tasks.TASK_NAMES, "train", 50, seed=4)
    mix = tasks.mixed(["add", "recall"], "test", 20, distinct=True)
    assert sorted(ex["task"] for ex in mix) == ["add"] * 20 + ["recall"] * 20


def test_unknown_task_or_split():
    with pytest.raises(ValueError, match="not a built-in task"):
        tasks.examples("multiply", "train", 1)
    with pytest.raises(ValueError, match="not a split"):
        tasks.examples("add", "dev", 1)
    with pytest.raises(ValueError, match="not a built-in task"):
        tasks.check({"task": "nope", "answer": "1"}, "1")
