"""The post-training stages' sections: `sft.*`, `reward.*`, `dpo.*`, `rs.*`, `ppo.*`."""
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
    groups_per_row: int = 8  # groups packed into one row at most
    truncation: str = "trim_context"  # trim_context (cut the prompt from the left) | drop
    stats_groups: int = 1000  # training groups scored after training for the reward's mean and std


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """`jaxlm dpo`: the policy from train.init_from against a frozen reference on preference pairs.

    Data as `reward.*` reads it (pairs; a ranking becomes best-against-each pairs), rendered with
    `sft.template`; a pair is packed into one row. Losses: `jaxlm.objectives.dpo`.
    """

    train_files: tuple[str, ...] = ()  # JSONL of pair or ranking records (globs allowed), as reward.*
    eval_files: tuple[str, ...] = ()  # held-out records; empty: data.heldout_fraction of train_files
    tasks: tuple[str, ...] = ()  # built-in tasks: the right answer against a wrong one (task_rejected)
    task_pairs: int = 5000  # near_miss: pairs per task; sampled: problems per task
    task_eval_pairs: int = 200  # held-out pairs per task: preference accuracy per task
    # near_miss: one or two small edits of the right answer; sampled: the init run's own wrong answers
    # (task_samples per problem at task_temperature, each distinct one against the right answer)
    task_rejected: str = "near_miss"
    task_samples: int = 4  # sampled: answers drawn per problem
    task_temperature: float = 1.0  # sampled: their temperature
    truncation: str = "trim_context"  # trim_context (cut the prompt from the left) | drop
    groups_per_row: int = 8  # pairs packed into one row at most
    beta: float = 0.1  # the inverse temperature on the log-ratio margin (strength of the KL anchor)
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
    samples_per_prompt: int = 8  # N of best-of-N
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling; 1: off
    max_new_tokens: int = 16  # a response's length limit
    checker: bool = False  # score with the built-in tasks' check (prompts must carry "task" and "answer")
    reward_run: str = ""  # or: score with this reward-model run (`jaxlm reward`)
    min_score: float = 0.5  # keep a prompt's best response only if it scores at least this
    rounds: int = 1  # sample-score-fine-tune rounds, each from the last round's model
    prompts_per_batch: int = 32  # prompts sampled (x samples_per_prompt rows) and written per step


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """`jaxlm ppo`: reinforcement learning of the policy from train.init_from on sampled responses.

    train.steps counts iterations. An iteration samples `group_size` responses for each of
    `prompts_per_iteration` prompts (prompt_files and/or built-in tasks, read as `rs.*` reads them) from the
    current policy, scores them (`checker`: the built-in tasks' check, 1 or 0; or the reward-model
    run `reward_run`), subtracts `missing_stop_penalty` from a response that never stopped, then
    runs `epochs` passes of `minibatches` updates each over the rollout. `algorithm`: ppo (a value
    role, the critic, and GAE; rewards = score at the last token - kl_coef x KL per token), grpo
    (group-normalised scores) or rloo (leave-one-out baseline), both critic-free with
    group_size >= 2. `kl_in_loss`: the KL to the reference (k3) is a loss term, as GRPO, instead of
    a reward penalty. `kl_target` > 0: the reward penalty's coefficient adapts (Ziegler et al.).
    """

    algorithm: str = "ppo"
    prompt_files: tuple[str, ...] = ()  # JSONL of {"prompt": ...}, optional "task"/"answer" (as rs)
    tasks: tuple[str, ...] = ()  # built-in tasks: their train problems as prompts, checkable
    task_prompts: int = 500  # prompts per built-in task
    checker: bool = False  # score with the built-in tasks' check
    reward_run: str = ""  # or: score with this reward-model run (`jaxlm reward`)
    prompts_per_iteration: int = 32  # prompts sampled per iteration (x group_size responses)
    group_size: int = 1  # responses per prompt (grpo and rloo: >= 2)
    max_new_tokens: int = 16  # a response's length limit
    temperature: float = 1.0  # rollout sampling temperature
    missing_stop_penalty: float = 1.0  # subtracted from the score of a response that never stopped
    epochs: int = 2  # passes over an iteration's rollout
    minibatches: int = 2  # updates per pass
    clip_eps: float = 0.2  # the policy ratio's clip range 1 +- clip_eps
    value_clip: float = 0.2  # the critic's clip range around its old values
    vf_coef: float = 0.5  # weight of the value loss
    ent_coef: float = 0.0  # weight of the entropy bonus
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the rollout
    kl_coef: float = 0.05  # KL penalty (or loss term) coefficient; the adaptive controller's start
    kl_kind: str = "k1"  # the reward penalty's estimator (the loss term is always k3)
    kl_in_loss: bool = False  # the KL as a loss term (GRPO) instead of a reward penalty
    kl_target: float = 0.0  # > 0: adapt kl_coef towards this mean KL per response
    kl_horizon: float = 10_000.0  # the adaptive controller's horizon in responses (Ziegler et al.)
    value_from: str = ""  # the critic's start: a run (a reward run, or an LM run: head fresh); "": train.init_from
    value_lr: float = 0.0  # the critic's learning rate; 0: optim.lr
    frozen_dtype: str = "float32"  # the reference's and reward model's params: float32 | bfloat16
    eval_every: int = 0  # exact match on the built-in tasks every this many iterations (0: at the end only)


CHOICES = {
    "sft.truncation": ("trim_context", "drop"),
    "reward.truncation": ("trim_context", "drop"),
    "dpo.truncation": ("trim_context", "drop"),
    "dpo.loss_type": ("sigmoid", "ipo", "hinge", "robust", "simpo"),
    "dpo.task_rejected": ("near_miss", "sampled"),
    "ppo.algorithm": ("ppo", "grpo", "rloo"),
    "ppo.kl_kind": ("k1", "k2", "k3"),
    "ppo.frozen_dtype": ("float32", "bfloat16"),
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


def validate_ppo(p: PPOConfig) -> None:
    from jaxlm.data.tasks import TASK_NAMES

    for name in p.tasks:
        check(name in TASK_NAMES, f"ppo.tasks has {name!r}, not a built-in task; allowed: {', '.join(TASK_NAMES)}")
    for key in ("task_prompts", "prompts_per_iteration", "group_size", "max_new_tokens", "epochs", "minibatches"):
        check(getattr(p, key) > 0, f"ppo.{key}={getattr(p, key)} must be positive")
    check(p.algorithm == "ppo" or p.group_size >= 2,
          f"ppo.group_size={p.group_size} must be >= 2 for ppo.algorithm={p.algorithm} (its baseline is the group)")
    check((p.prompts_per_iteration * p.group_size) % p.minibatches == 0,
          f"ppo.minibatches={p.minibatches} must divide the rollout's {p.prompts_per_iteration * p.group_size} "
          "responses (prompts_per_iteration x group_size)")
    check(p.temperature > 0, f"ppo.temperature={p.temperature} must be positive")
    check(not (p.checker and p.reward_run), f"ppo.checker=true and ppo.reward_run={p.reward_run!r}: choose one scorer")
    for key in ("clip_eps", "value_clip", "kl_horizon"):
        check(getattr(p, key) > 0, f"ppo.{key}={getattr(p, key)} must be positive")
    for key in ("vf_coef", "ent_coef", "kl_coef", "kl_target", "value_lr", "missing_stop_penalty", "eval_every"):
        value = getattr(p, key)
        check(math.isfinite(value) and value >= 0, f"ppo.{key}={value} must be a finite number >= 0")
    for key in ("gamma", "lam"):
        check(0 <= getattr(p, key) <= 1, f"ppo.{key}={getattr(p, key)} must be in [0, 1]")
