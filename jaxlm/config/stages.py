"""The post-training stages' sections: `sft.*`."""
from __future__ import annotations

import dataclasses

from jaxlm.config.schema import check


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """`jaxlm sft`: instruction / chat JSONL and built-in tasks; the longest example is train.seq_len."""

    train_files: tuple[str, ...] = ()  # JSONL of instruction or chat records (globs allowed)
    eval_files: tuple[str, ...] = ()  # held-out records; empty: data.heldout_fraction of train_files
    tasks: tuple[str, ...] = ()  # built-in verifiable tasks (jaxlm.data.tasks): add, reverse, sort, recall
    task_examples: int = 20_000  # training examples drawn per built-in task
    task_eval_examples: int = 100  # distinct test problems per task: eval loss and exact-match accuracy
    template: str = "### Instruction:\n{prompt}\n\n### Response:\n"  # instruction records
    truncation: str = "trim_context"  # trim_context (keep the response, cut the oldest context) | drop
    packing: bool = True  # several examples per row (segment ids, restarted positions)
    max_new_tokens: int = 16  # generation budget of the accuracy eval


CHOICES = {
    "sft.truncation": ("trim_context", "drop"),
}


def validate_sft(s: SFTConfig) -> None:
    from jaxlm.data.tasks import TASK_NAMES

    for name in s.tasks:
        check(name in TASK_NAMES, f"sft.tasks has {name!r}, not a built-in task; allowed: {', '.join(TASK_NAMES)}")
    for key in ("task_examples", "task_eval_examples", "max_new_tokens"):
        check(getattr(s, key) > 0, f"sft.{key}={getattr(s, key)} must be positive")
    check(s.template.count("{prompt}") == 1,
          f"sft.template={s.template!r} must hold {{prompt}} exactly once")
