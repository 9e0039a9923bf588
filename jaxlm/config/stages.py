"""The post-training stages' sections: `sft.*`, `reward.*`, `dpo.*`, `rs.*`."""
from __future__ import annotations

import dataclasses
import math

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
    tasks: tuple[str, ...] = ()  # built-in tasks: the right answer against a wrong one (task_rejected)
    task_pairs: int = 5000  # near_miss: pairs per task; sampled: problems per task
    task_eval_pairs: int = 200
    # near_miss: one or two small edits of the right answer; sampled: the init run's own wrong answers
    # (task_samples per problem at task_temperature, each distinct one against the right answer)
    task_rejected: str = "near_miss"
    task_samples: int = 4
    task_temperature: float = 1.0
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


@dataclasses.dataclass(frozen=True)
class RSConfig:
    """`jaxlm rejection-sample`: best-of-N from the model of train.init_from, then SFT on what was kept.

    Each round samples `samples_per_prompt` responses per prompt from the round's model (round 0:
    train.init_from; then the previous round's SFT run), scores them (`checker`: the built-in
    tasks' `check`, 1 or 0; or the reward-model run `reward_run`), keeps each prompt's best
    response over all rounds so far if its score is at least `min_score`, and fine-tunes the
    round's model on the kept set with `jaxlm sft` (`sft.*`, `train.*`, `optim.*`). Round r lives
    in RUN_DIR/round_r: samples.jsonl, kept.jsonl, pairs.jsonl, summary.json and sft/ (its run).
    """

    prompt_files: tuple[str, ...] = ()  # JSONL of {"prompt": text or chat messages}, optional "task"/"answer"
    tasks: tuple[str, ...] = ()  # built-in tasks: their train problems as prompts, checkable
    task_prompts: int = 500  # prompts per built-in task
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    checker: bool = False  # score with the built-in tasks' check (prompts must carry "task" and "answer")
    reward_run: str = ""  # or: score with this reward-model run (`jaxlm reward`)
    min_score: float = 0.5  # keep a prompt's best response only if it scores at least this
    rounds: int = 1
    prompts_per_batch: int = 32  # prompts sampled (x samples_per_prompt rows) and written per step


CHOICES = {
    "sft.truncation": ("trim_context", "drop"),
    "reward.truncation": ("trim_context", "drop"),
    "dpo.truncation": ("trim_context", "drop"),
    "dpo.loss_type": ("sigmoid", "ipo", "hinge", "robust", "simpo"),
    "dpo.task_rejected": ("near_miss", "sampled"),
}


def validate_sft(s: SFTConfig) -> None:
    from jaxlm.data.tasks import TASK_NAMES

    for name in s.tasks:
        check(name in TASK_NAMES, f"sft.tasks has {name!r}, not a built-in task; allowed: {', '.join(TASK_NAMES)}")
    for key in ("task_examples", "task_eval_examples", "max_new_tokens"):
        check(getattr(s, key) > 0, f"sft.{key}={getattr(s, key)} must be positive")
    check(s.template.count("{prompt}") == 1,
          f"sft.template={s.template!r} must hold {{prompt}} exactly once")


def validate_rs(r: RSConfig) -> None:
    from jaxlm.data.tasks import TASK_NAMES

    for name in r.tasks:
        check(name in TASK_NAMES, f"rs.tasks has {name!r}, not a built-in task; allowed: {', '.join(TASK_NAMES)}")
    for key in ("task_prompts", "samples_per_prompt", "max_new_tokens", "rounds", "prompts_per_batch"):
        check(getattr(r, key) > 0, f"rs.{key}={getattr(r, key)} must be positive")
    check(r.temperature > 0, f"rs.temperature={r.temperature} must be positive (0 would make every sample the same)")
    check(0 < r.top_p <= 1, f"rs.top_p={r.top_p} must be in (0, 1]")
    check(not (r.checker and r.reward_run), f"rs.checker=true and rs.reward_run={r.reward_run!r}: choose one scorer")
    check(math.isfinite(r.min_score), f"rs.min_score={r.min_score} must be finite")


def validate_dpo(d: DPOConfig) -> None:
    from jaxlm.data.tasks import TASK_NAMES

    for name in d.tasks:
        check(name in TASK_NAMES, f"dpo.tasks has {name!r}, not a built-in task; allowed: {', '.join(TASK_NAMES)}")
    for key in ("task_pairs", "task_eval_pairs", "groups_per_row", "task_samples"):
        check(getattr(d, key) > 0, f"dpo.{key}={getattr(d, key)} must be positive")
    check(d.task_temperature > 0, f"dpo.task_temperature={d.task_temperature} must be positive (sampled answers)")
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
