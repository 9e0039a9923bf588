"""The post-training stages' sections: `sft.*`, `reward.*`, `dpo.*`."""
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


# Llama 2's "margin small" for its four preference grades
LLAMA2_MARGINS = {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0}


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """`jaxlm reward`: preference JSONL and built-in task preferences; the backbone from train.init_from.

    Prompts are rendered as `jaxlm sft` renders them (`sft.template` for plain-text prompts, role
    markers for chat messages); a group (a pair, or a ranking of up to `max_responses`) is packed
    into one row of train.seq_len, `groups_per_row` groups at most.
    """

    train_files: tuple[str, ...] = ()  # JSONL of pair or ranking records (globs allowed)
    eval_files: tuple[str, ...] = ()  # held-out records; empty: data.heldout_fraction of train_files
    tasks: tuple[str, ...] = ()  # built-in tasks whose near misses make preference pairs (jaxlm.data.tasks)
    task_pairs: int = 5000  # training groups per built-in task
    task_eval_pairs: int = 200  # held-out groups per task (distinct test problems): accuracy per task
    # a grade's margin (Llama 2's "margin small"); a record's numeric "margin" is used as it is
    margins: dict = dataclasses.field(default_factory=lambda: dict(LLAMA2_MARGINS))
    center_coef: float = 0.0  # + center_coef * mean((r_c + r_r)^2): keeps rewards near 0
    max_responses: int = 4  # K: responses of a ranking scored together (longer rankings: counted, skipped)
    groups_per_row: int = 8
    truncation: str = "trim_context"  # trim_context (cut the prompt from the left) | drop
    stats_groups: int = 1000  # training groups scored after training for the reward's mean and std


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """`jaxlm dpo`: the policy from train.init_from against a frozen reference on preference pairs.

    Data as `reward.*` reads it (pairs; a ranking becomes best-against-each pairs), rendered with
    `sft.template`; a pair is packed into one row. Losses: `jaxlm.objectives.dpo`.
    """

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()  # built-in tasks: the right answer against near misses
    task_pairs: int = 5000
    task_eval_pairs: int = 200
    truncation: str = "trim_context"
    groups_per_row: int = 8
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid (DPO; cDPO with label_smoothing) | ipo | hinge | robust | simpo
    label_smoothing: float = 0.0  # eps of conservative DPO and robust DPO, in [0, 0.5)
    gamma: float = 0.0  # simpo's target margin
    average_log_prob: bool = False  # length-normalise the log-probs (TRL's IPO); simpo always does
    precompute_reference: bool = False  # one pass before training: no reference model in memory after
    reference_from: str = ""  # the reference's run; "": train.init_from
    sft_coef: float = 0.0  # + sft_coef x the chosen responses' NLL per token (Llama 3)


CHOICES = {
    "sft.truncation": ("trim_context", "drop"),
    "reward.truncation": ("trim_context", "drop"),
    "dpo.truncation": ("trim_context", "drop"),
    "dpo.loss_type": ("sigmoid", "ipo", "hinge", "robust", "simpo"),
}


def validate_sft(s: SFTConfig) -> None:
    from jaxlm.data.tasks import TASK_NAMES

    for name in s.tasks:
        check(name in TASK_NAMES, f"sft.tasks has {name!r}, not a built-in task; allowed: {', '.join(TASK_NAMES)}")
    for key in ("task_examples", "task_eval_examples", "max_new_tokens"):
        check(getattr(s, key) > 0, f"sft.{key}={getattr(s, key)} must be positive")
    check(s.template.count("{prompt}") == 1,
          f"sft.template={s.template!r} must hold {{prompt}} exactly once")


def validate_dpo(d: DPOConfig) -> None:
    from jaxlm.data.tasks import TASK_NAMES

    for name in d.tasks:
        check(name in TASK_NAMES, f"dpo.tasks has {name!r}, not a built-in task; allowed: {', '.join(TASK_NAMES)}")
    for key in ("task_pairs", "task_eval_pairs", "groups_per_row"):
        check(getattr(d, key) > 0, f"dpo.{key}={getattr(d, key)} must be positive")
    check(d.beta > 0, f"dpo.beta={d.beta} must be positive")
    check(0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
    check(d.sft_coef >= 0, f"dpo.sft_coef={d.sft_coef} must be >= 0")


def validate_reward(r: RewardConfig) -> None:
    from jaxlm.data.tasks import TASK_NAMES

    for name in r.tasks:
        check(name in TASK_NAMES, f"reward.tasks has {name!r}, not a built-in task; allowed: {', '.join(TASK_NAMES)}")
    for key in ("task_pairs", "task_eval_pairs", "groups_per_row", "stats_groups"):
        check(getattr(r, key) > 0, f"reward.{key}={getattr(r, key)} must be positive")
    check(r.max_responses >= 2, f"reward.max_responses={r.max_responses} must be at least 2")
    check(r.center_coef >= 0, f"reward.center_coef={r.center_coef} must be >= 0")
    for grade, m in r.margins.items():
        check(isinstance(m, (int, float)) and not isinstance(m, bool) and m >= 0,
              f"reward.margins.{grade}={m!r} must be a number >= 0")
